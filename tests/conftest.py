import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a training subprocess: CPU only, W&B offline, one steady thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=timeout)
    return proc


def accelerate_cmd(num_processes: int = 1) -> list[str]:
    """The launch line that really starts synced gloo processes on CPU (see ENVIRONMENT.md)."""
    base = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if num_processes > 1:
        return base + ["--multi_gpu", "--num_processes", str(num_processes)]
    return base + ["--num_processes", "1", "--cpu"]


@pytest.fixture
def one_thread():
    """Two intra-op threads on a shared 2-core machine mostly wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (it holds the reference data sets; users do not have it)")
    return SHARED
