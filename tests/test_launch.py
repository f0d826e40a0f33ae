"""Launch files: the accelerate/DeepSpeed configs parse, the shell scripts are clean, and every
command in docs/scaling.md is run by a test (conftest's doc_command gives the tests those commands)."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT, SCALING_DOC, doc_command, doc_commands, free_port, recipe_args, run, with_flags

LAUNCH_CONFIGS = [ROOT / "accelerate_config.yaml", *sorted((ROOT / "launch").glob("*.yaml"))]
SHELL_SCRIPTS = sorted(p for p in (ROOT / "launch").rglob("*") if p.suffix in (".sh", ".sbatch"))


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
    assert not untested, f"commands in {SCALING_DOC} that no test runs (call doc_command(...) in a test): {untested}"
    assert len(doc_commands()) >= 8


@pytest.mark.slow
def test_one_machine_config_trains_on_cpu_processes(shards, tmp_path):
    """accelerate_config.yaml (MULTI_GPU, bf16) on a machine without GPUs: CPU ranks that see each other."""
    cmd = with_flags(doc_command("accelerate_config.yaml"), num_processes=2, main_process_port=free_port())
    proc = run(cmd + recipe_args(shards, tmp_path / "run", "train.max_steps=2", "data.val=null"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on 2 processes with gradient accumulation" in proc.stdout
    assert "weights identical on every process: yes" in proc.stdout
