"""DeepSpeed through accelerate really trains, on 2 CPU processes (gloo): ZeRO-2 gives DDP's weights,
saves and resumes its checkpoint and exports consolidated weights; ZeRO-3 trains in bf16."""

import pytest
import torch
from accelerate.utils import set_seed

from conftest import doc_command, free_port, recipe_args, records, run, with_flags
from model import build_model, read_state_dict

pytestmark = pytest.mark.slow

# A smooth loss for runs compared weight by weight: ZeRO-2 reduces each micro-batch's gradients where DDP
# reduces their sum, and under L1 that rounding difference can flip the sign of a pixel whose residual
# is near zero, parting the runs by ~1e-4 after six steps; under Charbonnier they agree to ~1e-7.
SMOOTH_LOSS = "loss.name=charbonnier"
# Every gradient arrives in its parameter's strides (model.restormer._gradient_layout): nothing to copy.
STRIDES_WARNING = "Grad strides do not match bucket view strides"


def launch(argv, shards, out, *extra, resume=None, processes=2, check=True):
    """A docs/scaling.md command on CPU processes (2 by default) with the tiny recipe."""
    argv = with_flags(argv, num_processes=processes, main_process_port=free_port())
    if resume:
        argv.insert(argv.index("train/main.py") + 1, f"--resume={resume}")
    proc = run(argv + recipe_args(shards, out, *extra), timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def resume_refused_up_front(argv, shards, out, saved: int, now: int) -> None:
    """Resuming `out` on `now` processes fails before any training, naming both process counts."""
    logged = len(records(out))
    proc = launch(argv, shards, out, resume="auto", processes=now, check=False)
    assert proc.returncode != 0, proc.stderr[-4000:]  # the launcher's own traceback follows the ranks' exit 2
    assert (f"error: cannot resume from {out / 'checkpoints'}" in proc.stderr and
            f"this DeepSpeed checkpoint was written by {saved} processes and this run has {now}" in proc.stderr)
    assert len(records(out)) == logged, "the refused run trained or logged"


@pytest.fixture(scope="module")
def ddp_export(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    assert STRIDES_WARNING not in launch(doc_command("launch/cpu.yaml"), shards, out, SMOOTH_LOSS).stderr
    return read_state_dict(out / "export" / "model.safetensors")


def test_zero2_gives_ddp_weights_and_resumes_its_checkpoint(shards, ddp_export, tmp_path):
    out = tmp_path / "run"
    zero2 = doc_command("launch/deepspeed_zero2.yaml")
    first = launch(zero2, shards, out, SMOOTH_LOSS, "train.max_steps=4")
    assert "weights identical on every process: yes" in first.stdout and STRIDES_WARNING not in first.stderr
    assert "global batch 16 kept as 2 x 4 accum x 2 proc" in first.stdout  # DeepSpeed with accumulation
    saved = out / "checkpoints" / "step_00000004" / "pytorch_model"
    assert sorted(p.name for p in saved.iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    resume_refused_up_front(zero2, shards, out, saved=2, now=1)

    second = launch(zero2, shards, out, SMOOTH_LOSS, resume="auto")
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    exported = read_state_dict(out / "export" / "model.safetensors")
    assert exported.keys() == ddp_export.keys()
    # Same data, same accumulation, same clipping: the sharded optimizer computes what DDP does.
    for key, value in exported.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, ddp_export[key], rtol=0, atol=1e-6)
    official = torch.load(out / "export" / "model_official.pth", weights_only=True)
    assert set(official) == {"params"}
    assert all(torch.equal(official["params"][k], v) for k, v in exported.items())


def test_zero2_checkpoint_of_one_process_is_refused_on_two(shards, tmp_path):
    out = tmp_path / "run"
    zero2 = doc_command("launch/deepspeed_zero2.yaml")
    launch(zero2, shards, out, "train.max_steps=2", "train.ckpt_every=2", processes=1)
    resume_refused_up_front(zero2, shards, out, saved=1, now=2)


def test_zero3_trains_in_bf16_and_exports_consolidated_weights(shards, ddp_export, tmp_path):
    out = tmp_path / "run"
    proc = launch(doc_command("launch/deepspeed_zero3.yaml"), shards, out, SMOOTH_LOSS)
    assert "weights identical on every process: not checked (ZeRO-3 shards the weights)" in proc.stdout
    assert "validation on 2 images" in proc.stdout
    steps = [r for r in records(out) if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] > 0 and r["skipped_steps"] == 0 for r in steps)

    exported = read_state_dict(out / "export" / "model.safetensors")
    assert exported.keys() == ddp_export.keys()
    assert all(v.dtype == torch.float32 and v.isfinite().all() for v in exported.values())
    # The run's initial weights (the trainer seeds, then builds the model): bf16 training must move
    # them the way fp32 DDP did.
    set_seed(0)
    initial = build_model("gaussian_color_denoising", dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1).state_dict()
    flat = lambda state: torch.cat([state[k].flatten().float() for k in sorted(state)])  # noqa: E731
    start, ddp, zero3 = flat(initial), flat(ddp_export), flat(exported)
    assert (ddp - start).abs().max() < 0.05, "initial weights not reproduced"
    assert torch.nn.functional.cosine_similarity(zero3 - start, ddp - start, dim=0) > 0.7
