"""Train-step speed and peak memory of model.Restormer, optionally side by side with the official code.

Every (implementation, patch) pair runs in a fresh subprocess so its peak RSS (ru_maxrss) is its
own (VmHWM of the child, which unlike ru_maxrss does not inherit the parent's high-water mark); it
includes the interpreter and torch (the "idle" column). A step is forward, L1 loss, backward and
AdamW; times are medians over --steps after one warm-up step. Other jobs on a shared machine slow
wall-clock times, so the process CPU time of each step is reported too, and --rounds repeats every
configuration alternately (official, ours, official, ...) and keeps each one's fastest round.

    python benchmarks/model_speed.py --patch 64 128 --batch 2
    python benchmarks/model_speed.py --patch 64 128 --official path/to/restormer_arch.py

The comparison needs the official implementation's file, which this project does not ship (it is
published under its own, non-commercial license): take basicsr/models/archs/restormer_arch.py from
a checkout of https://github.com/swz30/Restormer and pass its path with --official.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from train.host_memory import retain_freed_memory, rss_kib  # noqa: E402  (after the path)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _official_class(path: str) -> type:
    """The Restormer class of the official restormer_arch.py at `path`."""
    spec = importlib.util.spec_from_file_location("official_restormer_arch", path)
    if spec is None or not Path(path).is_file():
        raise SystemExit(f"--official {path}: no such file (give the official restormer_arch.py)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "Restormer"):
        raise SystemExit(f"--official {path}: defines no Restormer class")
    return module.Restormer


def _build(impl: str, preset: str, checkpointing: bool, official: str | None) -> torch.nn.Module:
    from model import PRESETS, build_model, set_activations

    torch.manual_seed(0)
    ours = build_model(preset)
    if impl == "ours":
        set_activations(ours, "checkpoint" if checkpointing else "lean")
        return ours
    net = _official_class(official)(**PRESETS[preset])
    net.load_state_dict(ours.state_dict())
    return net


def _inputs(preset: str, patch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from model import PRESETS

    gen = torch.Generator().manual_seed(1)
    cfg = PRESETS[preset]
    x = torch.rand(batch, cfg["inp_channels"], patch, patch, generator=gen)
    target = torch.rand(batch, cfg["out_channels"], patch, patch, generator=gen)
    return x, target


OPTIMIZERS = ["loop", "foreach", "fused"]


def _optimizer(params, kind: str) -> torch.optim.Optimizer:
    options = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4, betas=(0.9, 0.999), **options)


def worker(args: argparse.Namespace) -> dict:
    """One configuration in this process; returns the measurements."""
    torch.set_num_threads(args.threads)
    if args.malloc == "retain":
        retain_freed_memory()
    idle = rss_kib("VmHWM") / 1024
    model = _build(args.impl, args.preset, args.checkpointing, args.official).train()
    opt = _optimizer(model.parameters(), args.optimizer)
    step_model = torch.compile(model, dynamic=False) if args.compile else model
    x, target = _inputs(args.preset, args.one_patch, args.batch)
    dtype = DTYPES[args.dtype]
    times, cpu_times = [], []
    for i in range(args.steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = (step_model(x).float() - target).abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up (and compiles)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = rss_kib("VmHWM") / 1024
    return {"impl": args.impl, "patch": args.one_patch, "step_s": statistics.median(times),
            "cpu_s": statistics.median(cpu_times),
            "peak_mib": peak, "idle_mib": idle}


def _max_diff(preset: str, patch: int, batch: int, official: str) -> float:
    """Largest |ours - official| of a forward pass with the same weights and input."""
    x, _ = _inputs(preset, patch, batch)
    with torch.no_grad():
        return (_build("ours", preset, False, None)(x) - _build("official", preset, False, official)(x)).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--patch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (ours and official)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--malloc", choices=["retain", "glibc"], default="retain",
                        help="retain: freed memory stays in the process, as train/main.py sets it "
                             "(train/host_memory.py); glibc: the C library's defaults")
    parser.add_argument("--rounds", type=int, default=1, help="alternate runs per configuration; fastest kept")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="foreach",
                        help="AdamW implementation for ours (and for official unless --official-optimizer)")
    parser.add_argument("--official-optimizer", choices=OPTIMIZERS,
                        help="AdamW implementation for official; BasicSR's plain torch.optim.AdamW is 'loop' on CPU")
    parser.add_argument("--official", metavar="PATH",
                        help="the official restormer_arch.py: time it side by side (see the top of this file)")
    parser.add_argument("--impl", choices=["ours", "official"], help=argparse.SUPPRESS)
    parser.add_argument("--one-patch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.impl:  # child process
        print(json.dumps(worker(args)))
        return

    impls = ["official", "ours"] if args.official else ["ours"]
    shared = [f"--{k}={v}" for k, v in [("preset", args.preset), ("batch", args.batch), ("dtype", args.dtype),
                                        ("steps", args.steps), ("threads", args.threads),
                                        ("malloc", args.malloc)]]
    optimizers = {"ours": args.optimizer, "official": args.official_optimizer or args.optimizer}
    shared += ["--checkpointing"] * args.checkpointing + ["--compile"] * args.compile
    shared += [f"--official={Path(args.official).resolve()}"] if args.official else []
    print(f"preset={args.preset} dtype={args.dtype} threads={args.threads} "
          f"AdamW: ours={optimizers['ours']} official={optimizers['official']} "
          f"checkpointing={args.checkpointing} compile={args.compile} malloc={args.malloc} steps={args.steps} (median)")
    print("| impl | patch | batch | step wall (ms) | step CPU (ms) | throughput (px/s, wall) | peak RSS (MiB) "
          "| idle RSS (MiB) | max abs diff vs official |")
    print("|---|---|---|---|---|---|---|---|---|")
    for patch in args.patch:
        diff = f"{_max_diff(args.preset, patch, args.batch, args.official):.2e}" if args.official else "-"
        results: dict[str, dict] = {}
        for _ in range(args.rounds):
            for impl in impls:
                cmd = [sys.executable, __file__, f"--impl={impl}", f"--one-patch={patch}",
                       f"--optimizer={optimizers[impl]}", *shared]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{impl} at {patch}px failed:\n{done.stderr}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                best = results.setdefault(impl, r)
                for key in ("step_s", "cpu_s", "peak_mib"):
                    best[key] = min(best[key], r[key])
        for impl, r in results.items():
            px = args.batch * patch * patch / r["step_s"]
            print(f"| {impl} | {patch} | {args.batch} | {r['step_s'] * 1e3:.0f} | {r['cpu_s'] * 1e3:.0f} | {px:.0f} | "
                  f"{r['peak_mib']:.0f} | {r['idle_mib']:.0f} | {diff if impl == 'ours' else '-'} |")
        if len(results) == 2:
            o, f = results["ours"], results["official"]
            print(f"| speedup | {patch} | | {f['step_s'] / o['step_s']:.2f}x | {f['cpu_s'] / o['cpu_s']:.2f}x | | "
                  f"ours/official {o['peak_mib'] / f['peak_mib']:.2f} | | |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
