"""Launch files: the accelerate/DeepSpeed configs parse, the shell scripts are clean, and every
command in docs/scaling.md is run by a test (helpers here give the other tests those commands)."""

import json
import re
import shlex
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, free_port, run
from test_trainer import TINY

DOC = ROOT / "docs" / "scaling.md"
LAUNCH_CONFIGS = [ROOT / "accelerate_config.yaml", *sorted((ROOT / "launch").glob("*.yaml"))]
SHELL_SCRIPTS = sorted(p for p in (ROOT / "launch").rglob("*") if p.suffix in (".sh", ".sbatch"))


def doc_commands() -> list[str]:
    """The commands in docs/scaling.md's ```bash blocks, one per line (comments skipped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


def doc_command(key: str) -> list[str]:
    """The one command of docs/scaling.md containing `key`, as argv (`accelerate` -> this Python)."""
    found = [c for c in doc_commands() if key in c]
    assert len(found) == 1, f"{len(found)} commands in {DOC} contain {key!r}: {found}"
    argv = shlex.split(found[0])
    if argv[:2] == ["accelerate", "launch"]:
        argv[:2] = [sys.executable, "-m", "accelerate.commands.launch"]
    return argv


def pack_images(out: Path, flat: bool = False) -> Path:
    """10 small images packed as shards (8 train, 2 val). `flat`: each image one distinct grey level
    (levels 10, 30, ..., 190), so a training crop tells which image it came from."""
    src = out / "images"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40] / 40.0
    for i in range(10):
        if flat:
            img = np.full((40, 40, 3), (10 + 20 * i) / 255.0)
        else:
            a, b, c = rng.uniform(0, 1, 3)
            img = np.stack([a * xx + (1 - a) * yy, (b * xx * yy) % 1, (xx > c) * 0.8 + 0.1], -1)
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(src / f"img{i}.png")
    from data_shards.pack import main as pack_main

    assert pack_main([str(src), "--out", str(out / "shards"), "--val-fraction", "0.2", "--no-progress"]) == 0
    return out / "shards"


def recipe_args(shards: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that shrink the docs' recipe (gaussian_color_denoising_blind) to seconds on a CPU."""
    return [f"data.train={shards}/train", f"data.val={shards}/val", f"output_dir={out}", *TINY,
            "data.noise_sigma_range=null", *extra]


def with_flags(argv: list[str], **flags) -> list[str]:
    """Sets launcher flags (those before train/main.py) to test-sized values: replaced or added."""
    script = argv.index("train/main.py")
    head, tail = list(argv[:script]), argv[script:]
    for name, value in flags.items():
        flag = f"--{name}"
        if flag in head:
            head[head.index(flag) + 1] = str(value)
        else:
            head += [flag, str(value)]
    return head + tail


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_launch_configs_are_complete(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["compute_environment"] == "LOCAL_MACHINE" and cfg["num_processes"] >= 1
    if cfg["distributed_type"] == "DEEPSPEED":
        # accelerate refuses a mixed_precision key next to a DeepSpeed JSON (it must come from the CLI).
        assert "mixed_precision" not in cfg
        ds = json.loads((ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]).read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert ds[key] == "auto", f"{key}: the run config is the one source of truth"
        assert ds["zero_optimization"]["stage"] == int(path.stem[-1])
    else:
        assert cfg["distributed_type"] == "MULTI_GPU"


def test_shell_scripts_parse():
    assert {p.name for p in SHELL_SCRIPTS} >= {"train.sbatch", "node.sh"}
    for path in SHELL_SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shell_scripts_pass_shellcheck():
    proc = subprocess.run(["shellcheck", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_every_doc_command_is_run_by_a_test():
    keys = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        keys |= set(re.findall(r'doc_command\(\s*"([^"]+)"', path.read_text()))
    keys.discard("key")  # doc_command's own signature
    for key in keys:
        doc_command(key)  # each key picks exactly one command
    untested = [c for c in doc_commands() if not any(k in c for k in keys)]
    assert not untested, f"commands in {DOC} that no test runs (call doc_command(...) in a test): {untested}"
    assert len(doc_commands()) >= 8


@pytest.mark.slow
def test_one_machine_config_trains_on_cpu_processes(tmp_path):
    """accelerate_config.yaml (MULTI_GPU, bf16) on a machine without GPUs: CPU ranks that see each other."""
    shards = pack_images(tmp_path / "data")
    cmd = with_flags(doc_command("accelerate_config.yaml"), num_processes=2, main_process_port=free_port())
    proc = run(cmd + recipe_args(shards, tmp_path / "run", "train.max_steps=2", "data.val=null"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on 2 processes with gradient accumulation" in proc.stdout
    assert "weights identical on every process: yes" in proc.stdout
