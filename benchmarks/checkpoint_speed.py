"""What the checkpoint manifest costs: save time with and without hashing, and the verification on load.

    python benchmarks/checkpoint_speed.py [--models demo default] [--rounds 3] [--dir /tmp]

For each model (demo: the built-in demo's network, 1.1 M parameters; default: the default preset,
26 M), it builds the network with AdamW (one step taken, so the optimizer state exists) and an EMA, and
saves it with the trainer's Checkpointer on one process, as the trainer does. A save is timed in its
two parts: writing the files (accelerate's save_state, the EMA, the config; what a save cost before
manifests) and sealing (hashing every file into the manifest, writing trainer_state.json). Then the
verification a resume does (every file read back and hashed). Medians over --rounds, wall and CPU
seconds. Files land in --dir (default: the system temp folder), so the disk there is what is measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from model import build_model  # noqa: E402
from train.checkpoint import Checkpointer, verify  # noqa: E402
from train.launch import Launch  # noqa: E402
from train.state import TrainState  # noqa: E402
from train.ema import EMA  # noqa: E402

MODELS = {
    "demo": ("gaussian_color_denoising", dict(dim=16, num_blocks=[1, 2, 2, 2], num_refinement_blocks=1)),
    "default": ("default", {}),
}


def measure(name: str, rounds: int, folder: Path) -> dict[str, float]:
    preset, arch = MODELS[name]
    acc = Accelerator(cpu=True)
    net = build_model(preset, **arch)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    net, optimizer = acc.prepare(net, optimizer)
    x = torch.rand(1, 3, 16, 16)
    net(x).abs().mean().backward()
    optimizer.step()
    ema = EMA(net, 0.999)
    checkpointer = Checkpointer(folder / name, acc, Launch(acc.device), keep_last=1)
    writes, seals, verifies, cpu_save, cpu_verify = [], [], [], [], []
    for step in range(1, rounds + 1):
        c0 = time.process_time()
        path = checkpointer.save(step, TrainState(step=step).state_dict(0, 1), ema.state_dict(), "model: {}\n", None)
        cpu_save.append(time.process_time() - c0)
        writes.append(checkpointer.last_timing.write_s)
        seals.append(checkpointer.last_timing.seal_s)
        t0, c0 = time.perf_counter(), time.process_time()
        assert verify(path) is None
        verifies.append(time.perf_counter() - t0)
        cpu_verify.append(time.process_time() - c0)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"params": sum(p.numel() for p in net.parameters()) / 1e6, "mb": size / 1e6,
            "write": statistics.median(writes), "seal": statistics.median(seals),
            "verify": statistics.median(verifies), "cpu_save": statistics.median(cpu_save),
            "cpu_verify": statistics.median(cpu_verify)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoints are written")
    args = parser.parse_args()
    print("| model | parameters | checkpoint | save without hashing | save with hashing | hashing share "
          "| save CPU | verify on load (wall / CPU) |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in args.models:
            r = measure(name, args.rounds, Path(tmp))
            total = r["write"] + r["seal"]
            print(f"| {name} | {r['params']:.1f} M | {r['mb']:.0f} MB | {r['write']:.2f} s | {total:.2f} s "
                  f"| {r['seal'] / total:.0%} | {r['cpu_save']:.2f} s | {r['verify']:.2f} s / {r['cpu_verify']:.2f} s |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
