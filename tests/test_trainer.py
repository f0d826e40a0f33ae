"""The trainer end to end, in subprocesses (as users run it): outputs, resume, signals, DDP, W&B."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_RUN, accelerate_cmd, child_env, records, run
from model import read_state_dict

def train(shards, out, *extra, resume=None, timeout=240):
    cmd = [sys.executable, "train/main.py", f"data.train={shards}/train", f"data.val={shards}/val",
           f"output_dir={out}", *TINY_RUN, *extra]
    if resume:
        cmd[2:2] = ["--resume", resume]
    return run(cmd, timeout=timeout)


def test_run_writes_metrics_checkpoints_samples_and_exports(shards, tmp_path):
    out = tmp_path / "run"
    proc = train(shards, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The demo recipe's summary: the model beside the noisy input and the classical filters.
    assert "restored (this model, 96-px tiles)" in proc.stdout and "weights identical on every process: yes" in proc.stdout
    recs = records(out)
    stages = [r for r in recs if r.get("event") == "stage"]
    assert [(r["stage"], r["patch"], r["batch"]) for r in stages] == [(0, 16, 2), (1, 24, 2)]
    steps = [r for r in recs if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"l1", "l2", "lr", "grad_norm", "images_per_s", "data_wait_share", "peak_mem_gb_max"} <= r.keys() for r in steps)
    assert [r["patch"] for r in steps] == [16, 16, 16, 24, 24, 24]
    vals = [r for r in recs if r.get("event") == "val"]
    assert len(vals) == 2 and vals[-1]["val/images"] == 2
    assert (out / "config.yaml").is_file() and list((out / "samples").glob("step_*.png"))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["stage"] == 1
    assert state["data"] == {"seed": 0, "position": 12, "epoch": 1}  # 6 steps x 2 samples of 8
    official = torch.load(out / "export" / "model_official.pth", weights_only=True)
    assert set(official) == {"params"}
    exported = read_state_dict(out / "export" / "model.safetensors")
    for key, value in exported.items():
        assert torch.equal(official["params"][key], value)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(shards, straight).returncode == 0
    first = train(shards, split, "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(shards, split, resume="auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step 4" in second.stdout
    # The stream went on at sample 8 (3 steps of stage 0 + 1 of stage 1, batch 2): same data, same weights.
    state = json.loads((split / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["data"]["position"] == 8
    a = read_state_dict(straight / "export" / "model.safetensors")
    b = read_state_dict(split / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lr_a = {r["step"]: r["lr"] for r in records(straight) if "lr" in r}
    lr_b = {r["step"]: r["lr"] for r in records(split) if "lr" in r}
    assert lr_a == lr_b


def test_resume_with_another_model_shape_is_a_clear_error(shards, tmp_path):
    out = tmp_path / "run"
    assert train(shards, out, "train.max_steps=3").returncode == 0
    proc = train(shards, out, "model.dim=16", resume="auto")
    assert proc.returncode == 2
    assert "network's shape changed" in proc.stderr and "model.dim: checkpoint 8 vs now 16" in proc.stderr


def test_sigterm_checkpoints_and_resume_continues(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train/main.py", f"data.train={shards}/train", f"data.val={shards}/val",
           f"output_dir={out}", *TINY_RUN, "progressive.iters=[400,400]", "val.every=1000", "train.ckpt_every=1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert 2 <= step < 800
    again = train(shards, out, "progressive.iters=[400,400]", "val.every=1000", "train.ckpt_every=1000",
                  f"train.max_steps={step + 2}", resume="auto")
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [r["step"] for r in records(out) if "event" not in r]
    assert steps[-2:] == [step + 1, step + 2]


def test_non_finite_steps_are_skipped_then_the_run_stops(shards, tmp_path):
    out = tmp_path / "run"
    proc = train(shards, out, "optim.lr=1e30", "optim.grad_clip=null", "train.max_nonfinite=2",
                 "progressive.iters=[20,20]", "lr.warmup_iters=0")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite" in proc.stderr and "last good checkpoint" in proc.stderr
    steps = [r for r in records(out) if "event" not in r]
    assert steps[-1]["skipped_steps"] >= 2


def test_data_problems_are_reported_before_training(shards, tmp_path):
    proc = train(shards, tmp_path / "run", "progressive.patch=[16,64]")
    assert proc.returncode == 2 and "larger than every training image" in proc.stderr
    proc = train(shards, tmp_path / "run", f"data.train={tmp_path}/missing")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_wandb_offline_run_is_written_and_resumed(shards, tmp_path):
    out = tmp_path / "run"
    assert train(shards, out, "tracking.wandb=offline", "train.max_steps=3").returncode == 0
    run_id = json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())["run_id"]
    proc = train(shards, out, "tracking.wandb=offline", resume="auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) >= 1 and all((r / f"run-{run_id}.wandb").is_file() for r in runs)


@pytest.mark.slow
def test_two_process_ddp_on_cpu(shards, tmp_path):
    out = tmp_path / "run"
    cmd = accelerate_cmd(2) + ["train/main.py", f"data.train={shards}/train", f"data.val={shards}/val",
                               f"output_dir={out}", *TINY_RUN]
    proc = run(cmd, timeout=300, ACCELERATE_USE_CPU="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "weights identical on every process: yes" in proc.stdout
    assert "running the recipe as written on 2 process(es)" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000006").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_the_demo_runs_end_to_end_through_accelerate_launch(tmp_path):
    """`accelerate launch train/main.py` with no recipe: the built-in demo, shrunk to a few steps."""
    out = tmp_path / "demo"
    cmd = accelerate_cmd(1) + ["train/main.py", f"output_dir={out}", "model.dim=8", "model.num_blocks=[1,1,1,1]",
                               "progressive.iters=[2,2,2]", "val.every=1000", "val.max_images=1", "train.log_every=2"]
    proc = run(cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The summary sets the model beside the noisy input and both classical filters, same images.
    summary = proc.stdout[proc.stdout.index("validation on 1 full-size image, sigma 25:"):]
    for row in ("noisy input", "wavelet (BayesShrink)", "non-local means (best h = ", "restored (this model, 96-px tiles)"):
        assert f"\n  {row}" in summary
    baselines = json.loads((out / "baselines.json").read_text())
    assert baselines["images"] == 1 and baselines["nl_means/psnr"] > baselines["noisy/psnr"] + 5
    assert f"{baselines['nl_means/psnr']:7.2f}" in summary and "dB vs the best of the filters scored" in summary
    recs = records(out)
    assert [r["patch"] for r in recs if r.get("event") == "stage"] == [48, 64, 96]
    assert (out / "export" / "model_official.pth").is_file() and list((out / "samples").glob("*.png"))


def test_validation_on_a_plain_folder_of_images_or_pairs(shards, tmp_path):
    """data.val may be a plain folder: clean images (noised like training) or input/ + target/ pairs."""
    from data_shards.stream import build_val_loader
    from train.data import pack_val_folder

    pairs, clean = tmp_path / "pairs", tmp_path / "clean"
    for folder in (pairs / "input", pairs / "target", clean):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        img = (rng.uniform(0, 1, (24, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(pairs / "target" / f"{i}.png")
        Image.fromarray(255 - img).save(pairs / "input" / f"{i}.png")
        Image.fromarray(img).save(clean / f"{i}.png")
    out = tmp_path / "run"
    proc = train(shards, out, f"data.val={clean}", "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation on 3 full-size images" in proc.stdout
    assert (out / "val_shards" / "clean" / "val" / "index.json").is_file()
    split = pack_val_folder(pairs, tmp_path / "cache")
    assert pack_val_folder(pairs, tmp_path / "cache") == split  # packed once, then reused
    for item in build_val_loader(split):
        assert torch.allclose(item["input"], 1 - item["target"], atol=1e-6)  # pairs stay matched


def test_iterations_rule_resume_on_another_process_count_is_refused_before_any_work(shards, tmp_path):
    out = tmp_path / "run"
    rule = ["train.batch_rule=iterations", "train.reference_world_size=1", "train.max_steps=3"]
    assert train(shards, out, *rule).returncode == 0
    # Recipe iteration 3 is step 1.5 on 2 processes. WORLD_SIZE is what the launcher sets: the refusal
    # comes from train/main.py before any process group exists.
    cmd = [sys.executable, "train/main.py", "--resume", "auto", f"data.train={shards}/train",
           f"data.val={shards}/val", f"output_dir={out}", *TINY_RUN, *rule]
    proc = run(cmd, WORLD_SIZE="2")
    assert proc.returncode == 2
    assert "cannot resume the checkpoint of step 3" in proc.stderr and "Resume on 1 processes" in proc.stderr
