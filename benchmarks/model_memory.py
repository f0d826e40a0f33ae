"""Activation memory per training pixel and train-step time of model.Restormer, against the official code.

Each case (implementation, preset, precision, activation mode, patch) runs in a fresh process: a
warm-up step and --steps timed steps (forward, L1 loss, backward, AdamW) at batch --batch, then one
step under model.memory.TensorMemoryMeter. Two figures per pixel, each the difference between two
patch sizes divided by the pixels added, so fixed costs (interpreter, weights, optimizer) cancel:
- peak RSS slope: what the machine sees (the process's high-water mark, VmHWM);
- allocated slope: the bytes of tensors alive at the step's peak, what a GPU's caching allocator
  counts (`torch.cuda.max_memory_allocated`).
Step times are medians of the process CPU time (robust on a shared machine) and of wall time.

    python benchmarks/model_memory.py --official path/to/restormer_arch.py

The official file is not shipped (see benchmarks/model_speed.py). A second table applies the memory
plan (train/memory_plan.py) to the official recipe's stages (patch x per-GPU batch on 8 GPUs, DDP,
AdamW) on 12, 16, 24, 40 and 80 GB cards, with each implementation's measured allocated bytes per pixel.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.model_speed import _official_class  # noqa: E402  (after the path)
from model import PRESETS, build_model, set_activations  # noqa: E402
from model.memory import TensorMemoryMeter  # noqa: E402
from train.config import Config  # noqa: E402
from train.host_memory import retain_freed_memory, rss_kib  # noqa: E402
from train.memory_plan import (GB, RESERVED_CUDA, USABLE_SHARE, MemoryPlanError, StateFootprint,  # noqa: E402
                               StepCost, plan_memory)
from train.schedule import plan_stages  # noqa: E402
from train.step import autocast_dtype, forward_backward  # noqa: E402

PRECISIONS = ("fp32", "bf16")
CARDS_GB = (12, 16, 24, 40, 80)


def _network(impl: str, preset: str, mode: str, official: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    ours = build_model(preset)
    if impl == "ours":
        set_activations(ours, mode)
        return ours.train()
    net = _official_class(official)(**PRESETS[preset])
    net.load_state_dict(ours.state_dict())
    return net.train()


def measure(case: dict) -> dict:
    """One case in this process."""
    torch.set_num_threads(case["threads"])
    retain_freed_memory()
    net = _network(case["impl"], case["preset"], case["mode"], case["official"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6, weight_decay=1e-4, fused=True)
    channels = PRESETS[case["preset"]]["inp_channels"]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(case["batch"], channels, case["patch"], case["patch"], generator=gen)
    target = torch.rand(case["batch"], PRESETS[case["preset"]]["out_channels"], case["patch"], case["patch"], generator=gen)
    micro = case.get("micro", case["batch"])  # images per forward/backward, as the memory plan splits a batch
    cpu, wall = [], []
    for i in range(case["steps"] + 1):  # the first step warms up
        c0, w0 = time.process_time(), time.perf_counter()
        for x_micro, target_micro in zip(x.split(micro), target.split(micro)):
            forward_backward(net, x_micro, target_micro, autocast_dtype(case["dtype"]), share=micro / case["batch"])
        opt.step()
        opt.zero_grad(set_to_none=False)  # the gradients stay allocated: the meter sees the step alone
        if i:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    rss = rss_kib("VmHWM") * 1024.0
    meter = TensorMemoryMeter()
    with meter:
        forward_backward(net, x, target, autocast_dtype(case["dtype"]))
    return {"rss": rss, "allocated": meter.peak, "cpu_s": statistics.median(cpu) if cpu else None,
            "wall_s": statistics.median(wall) if wall else None}


def run_case(**case) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["default", "gaussian_color_denoising"])
    parser.add_argument("--dtype", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--modes", nargs="+", default=["lean", "plain", "checkpoint"],
                        help="our activation modes to measure (model.ACTIVATION_MODES)")
    parser.add_argument("--memory-patch", type=int, nargs=2, default=[48, 96], metavar=("SMALL", "LARGE"))
    parser.add_argument("--time-patch", type=int, nargs="*", default=[64, 128], help="none: memory only")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--official", metavar="PATH", help="the official restormer_arch.py (see the top of this file)")
    parser.add_argument("--cost-patch", type=int, default=64,
                        help="the step-time cost of the plan's choices is measured at this patch, batch 8")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(json.loads(args.case))))
        return

    impls = ([("official", "plain")] if args.official else []) + [("ours", mode) for mode in args.modes]
    small, large = args.memory_patch
    common = {"batch": args.batch, "threads": args.threads, "official": args.official}
    print(f"batch {args.batch}, {args.threads} threads; memory from patches {small} -> {large} (1 step), "
          f"time: median of {args.steps} steps; ratios against the official code in fp32 (memory) / same precision (time)")
    print("| preset | precision | implementation | peak RSS B/px | x official fp32 | allocated B/px | x official fp32 |"
          + "".join(f" step CPU ms at {p} (x official) |" for p in args.time_patch))
    print("|---|---|---|---|---|---|---|" + "---|" * len(args.time_patch))
    allocated: dict[tuple[str, str, str], StepCost] = {}
    for preset in args.preset:
        reference = None
        for dtype in args.dtype:
            official_time: dict[int, float] = {}
            for impl, mode in impls:
                case = {**common, "impl": impl, "preset": preset, "dtype": dtype, "mode": mode, "steps": 1}
                low, high = run_case(**case, patch=small), run_case(**case, patch=large)
                rss, alloc = (StepCost.fit((small, large), [low[key], high[key]], args.batch)
                              for key in ("rss", "allocated"))
                allocated[(preset, dtype, f"{impl} {mode}")] = alloc
                if reference is None:
                    reference = (rss.per_pixel, alloc.per_pixel)
                times = []
                for patch in args.time_patch:
                    t = run_case(**{**case, "steps": args.steps}, patch=patch)["cpu_s"]
                    if impl == "official":
                        official_time[patch] = t
                    ratio = f" ({t / official_time[patch]:.2f}x)" if patch in official_time else ""
                    times.append(f"{t * 1e3:.0f}{ratio}")
                name = "official" if impl == "official" else f"ours, {mode}"
                print(f"| {preset} | {dtype} | {name} | {rss.per_pixel:.0f} | {rss.per_pixel / reference[0]:.2f}x | "
                      f"{alloc.per_pixel:.0f} | {alloc.per_pixel / reference[1]:.2f}x |" + "".join(f" {t} |" for t in times),
                      flush=True)
    print()
    print_recipe_fit(allocated, args.preset[0])
    print()
    print_plan_costs(args.preset[0], args.dtype[0], args.cost_patch, common, args.steps)


def print_plan_costs(preset: str, dtype: str, patch: int, common: dict, steps: int) -> None:
    """What the memory plan's choices cost in images/s: a batch of 8 in micro-batches, and checkpointing."""
    batch = 8
    print(f"The cost of the plan's choices ({preset}, {dtype}, {patch} px, batch {batch}, wall time per step, "
          "each in its own process)")
    print("| micro-batch x accumulation | activations | step ms | images/s | x whole batch, lean |")
    print("|---|---|---|---|---|")
    reference = None
    for micro, mode in ((8, "lean"), (4, "lean"), (2, "lean"), (1, "lean"), (8, "checkpoint"), (1, "checkpoint")):
        wall = run_case(**{**common, "batch": batch}, impl="ours", preset=preset, dtype=dtype, mode=mode, patch=patch,
                        steps=steps, micro=micro)["wall_s"]
        reference = reference or wall
        print(f"| {micro} x {batch // micro} | {mode} | {wall * 1e3:.0f} | {batch / wall:.2f} | {reference / wall:.2f}x |",
              flush=True)


def print_recipe_fit(allocated: dict[tuple[str, str, str], StepCost], preset: str) -> None:
    """The official recipe's stages on CARDS_GB cards, planned as train/memory_plan.py plans them."""
    recipe = plan_stages(Config(), 8)  # the recipe as written, for its 8 GPUs
    params = sum(p.numel() for p in build_model(preset).parameters())
    print(f"The official recipe ({preset}: 8 GPUs, DDP, AdamW, per-GPU batch "
          + ", ".join(f"{s.batch} x {s.patch} px" for s in recipe.stages) + ") per card; cells: micro-batch x accumulation "
          "and activation mode per stage ('-': does not fit); planned with the allocated bytes per pixel above, "
          f"{USABLE_SHARE:.0%} of the card less {RESERVED_CUDA / GB:g} GB")
    print("| card | precision | implementation | " + " | ".join(f"{s.patch} px x {s.batch}" for s in recipe.stages) + " |")
    print("|---|---|---|" + "---|" * len(recipe.stages))
    for card in CARDS_GB:
        for (cost_preset, dtype, impl), cost in allocated.items():
            if cost_preset != preset or impl == "ours checkpoint":
                continue
            costs = {impl: cost}
            if impl == "ours lean" and (preset, dtype, "ours checkpoint") in allocated:
                costs["ours checkpoint"] = allocated[(preset, dtype, "ours checkpoint")]
            footprint = StateFootprint(params=params, precision=dtype, world_size=8)
            cells = []
            for stage in recipe.stages:
                try:
                    one = dataclasses.replace(recipe, stages=(stage,))
                    s = plan_memory(one, footprint, card * GB, RESERVED_CUDA, costs.__getitem__,
                                    modes=tuple(costs)).schedule.stages[0]
                    cells.append(f"{s.micro_batch} x {s.batch // s.micro_batch}, {s.activations.split()[-1]}")
                except MemoryPlanError:
                    cells.append("-")
            print(f"| {card} GB | {dtype} | {impl} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
