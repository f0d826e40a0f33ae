"""One prepared check of the GPU path: every case a real run, one table, at most ~8 minutes on an H100.

    python benchmarks/device_check.py [--official path/to/restormer_arch.py] [--json results.json]
    python benchmarks/device_check.py --device cpu --quick      # the same code on a tiny model (the tests run it)

Cases; one that fails prints its error in the table and the script goes on, and a case that would
start after --budget-s is skipped and named, so the whole check ends in time:
- train: cells of benchmarks/matrix.py in one process (a BiasFree denoising recipe): fp32, bf16, fp16
  (GradScaler), torch.compile bf16 and DeepSpeed ZeRO-2 bf16. Each trains, validates, writes a
  checkpoint, resumes it and exports (model.safetensors and the official .pth, loaded back and compared).
- memory: each stage of the official recipe (patch x per-GPU batch) on the default preset, real train
  steps (forward, backward, fused AdamW) in fp32 and bf16: the recipe's batch as is, and as the memory
  plan for a --budget-gb card runs it, its prediction against the measured peak
  (torch.cuda.max_memory_allocated) and the images/s it costs.
- speed: images/s and pixels/s of the default preset's train step in bf16 at 128 and 256 px (the
  recipe's batches 8 and 2), eager and torch.compile'd, and the official code's with --official.
- feeding: the shard stream's samples/s at patch 128 with one loader worker per CPU core, against
  the samples/s the bf16 step consumes.

docs/scaling.md says how to run it on the device machine and keeps its table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks import matrix  # noqa: E402  (after the path)
from model import PRESETS, build_model, set_activations  # noqa: E402
from model.memory import TensorMemoryMeter  # noqa: E402
from train.config import Config, LossConfig, ProgressiveConfig, TrainConfig  # noqa: E402
from train.memory_plan import (GB, USABLE_SHARE, CalibrationStep, StateFootprint, calibrate,  # noqa: E402
                               plan_memory, reserved_bytes)
from train.schedule import plan_stages  # noqa: E402
from train.step import autocast_dtype, forward_backward  # noqa: E402

PRECISIONS = ("fp32", "bf16")
CELLS = (  # one process each; the matrix's tiny networks
    matrix.Mode("cuda_fp32", 1, "no"),
    matrix.Mode("cuda_bf16", 1, "bf16"),
    matrix.Mode("cuda_fp16", 1, "fp16"),
    matrix.Mode("cuda_compile_bf16", 1, "bf16", overrides=("model.compile=true",)),
    matrix.Mode("cuda_zero2_bf16", 1, "bf16", "launch/deepspeed_zero2.yaml"),
)
CELL_RECIPES = ("gaussian_color_denoising_sigma25",)  # BiasFree LayerNorm, noise on the fly: every precision path


@dataclass(frozen=True)
class Scale:
    """What one run of the check covers: the full one on a GPU, a tiny one (--quick) anywhere."""

    arch: dict
    stages: tuple[tuple[int, int], ...]  # (patch, batch) per stage
    speed: tuple[tuple[int, int], ...]  # (patch, batch)
    steps: int  # timed steps per speed measurement
    compiled: tuple[bool, ...]  # speed: eager, and compiled too
    cells: tuple[matrix.Mode, ...]
    recipes: tuple[str, ...]
    images: int  # feeding: source images of 512 px


FULL = Scale({"preset": "default"}, tuple(zip(ProgressiveConfig().patch, ProgressiveConfig().batch)),
             ((128, 8), (256, 2)), 10, (False, True), CELLS, CELL_RECIPES, 64)
# The code paths in seconds (the test suite runs it): no compilation, one cell, one recipe.
QUICK = Scale({"preset": "default", "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1},
              ((32, 4), (48, 2)), ((32, 2),), 2, (False,), (matrix.Mode("quick_fp32", 1, "no"),), CELL_RECIPES, 4)


class Table:
    """Rows as they come (printed at once), and at the end; cases past the deadline are skipped, named."""

    def __init__(self, seconds: float) -> None:
        self.rows: list[dict] = []
        self.deadline = time.perf_counter() + seconds

    def late(self, case: str, setting: str) -> bool:
        """True (and a SKIPPED row) once the time budget is spent: the whole check ends in time."""
        if time.perf_counter() < self.deadline:
            return False
        self.add(case, setting, "not run: the time budget (--budget-s) is spent", "SKIPPED")
        return True

    def add(self, case: str, setting: str, result: str, status: str = "ok") -> None:
        self.rows.append({"case": case, "setting": setting, "result": result, "status": status})
        print(f"  {case} | {setting} | {result} | {status}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def guard(self, case: str, setting: str):
        """A failing case becomes a row with its error; the script goes on."""
        try:
            yield
        except Exception as err:  # every failure is a finding
            traceback.print_exc()
            self.add(case, setting, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err) else ''}",
                     "FAILED")

    def markdown(self) -> str:
        lines = ["| case | setting | result | status |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['setting']} | {r['result']} | {r['status']} |" for r in self.rows]
        return "\n".join(lines)


# ---------------------------------------------------------------- train cells


def train_cells(scale: Scale, device: torch.device, work: Path, table: Table) -> None:
    with table.guard("train", "data"), contextlib.redirect_stdout(sys.stderr):
        data = matrix.make_data(work / "data")
    recipes = list(scale.recipes)
    for mode in scale.cells:
        if table.late("train", mode.name):
            continue
        with table.guard("train", mode.name):
            (work / "matrix").mkdir(exist_ok=True)
            for cell in matrix.run_matrix([mode], recipes, 2, work / "matrix", 600, data, cpu=device.type == "cpu"):
                result = (f"L1 {cell.l1:.4f} -> resumed {cell.l1_resumed:.4f}, val PSNR {cell.val_psnr:.2f}, "
                          f"{cell.seconds:.0f} s; {cell.export}") if cell.status == "ok" else cell.message[:300]
                table.add("train", f"{mode.name}, {cell.recipe}", result,
                          "ok" if cell.status == "ok" else cell.status.upper())


# ---------------------------------------------------------------- memory


class PeakMemory:
    """Peak bytes of everything a train step holds on `device`: the allocator's own count on CUDA;
    elsewhere the tensors that exist (weights, gradients, optimizer state) plus the meter's peak."""

    def __init__(self, device: torch.device, held: list[torch.Tensor]):
        self.device, self.held = device, held

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.meter = TensorMemoryMeter().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.meter.__exit__(*exc)
            self.peak = sum(t.untyped_storage().nbytes() for t in self.held) + self.meter.peak


def _network(arch: dict, device: torch.device, mode: str = "lean"):
    torch.manual_seed(0)
    net = build_model(**arch).to(device).train()
    set_activations(net, mode)
    return net


def _train_step(net, opt, patch: int, batch: int, micro: int, precision: str, device: torch.device) -> None:
    """One optimizer step over `batch` images in micro-batches of `micro`, as the trainer runs it."""
    channels = net.patch_embed.proj.in_channels
    for _ in range(batch // micro):
        x = torch.rand(micro, channels, patch, patch, device=device)
        forward_backward(net, x, x, autocast_dtype(precision), share=micro / batch)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measured_step(arch: dict, mode: str, patch: int, batch: int, micro: int, precision: str,
                  device: torch.device, steps: int) -> tuple[float, float]:
    """(peak bytes of a step, images/s over `steps` steps): the peak of the third step (the first two
    allocate the optimizer state and warm the allocator), then the timed steps."""
    net = _network(arch, device, mode)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=True)
    for _ in range(2):
        _train_step(net, opt, patch, batch, micro, precision, device)
    held = list(net.parameters()) + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    with PeakMemory(device, held) as peak:
        _train_step(net, opt, patch, batch, micro, precision, device)
    start = time.perf_counter()
    for _ in range(steps):
        _train_step(net, opt, patch, batch, micro, precision, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = steps * batch / (time.perf_counter() - start)
    del net, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak.peak, rate


def memory_case(scale: Scale, device: torch.device, budget_gb: float, table: Table) -> None:
    """Per recipe stage: the recipe's batch as is (lean), then as the plan for budget_gb runs it."""
    params = sum(p.numel() for p in build_model(**scale.arch).parameters())
    patches, batches = zip(*scale.stages)
    recipe = Config(progressive=ProgressiveConfig(iters=[1] * len(patches), patch=list(patches), batch=list(batches)),
                    train=TrainConfig(reference_world_size=None))  # each stage's batch as given, one process
    loss = asdict(LossConfig())
    for precision in PRECISIONS:
        with table.guard("memory", f"{precision}, plan for {budget_gb:g} GB"):
            reserved = reserved_bytes(device)
            plan = plan_memory(plan_stages(recipe, 1), StateFootprint(params=params, precision=precision),
                               budget_gb * GB, reserved,
                               lambda mode: calibrate(CalibrationStep(scale.arch, precision, mode, loss), device))
            for s in plan.schedule.stages:
                where = f"{precision}, stage {s.index} {s.patch} px x {s.batch}"
                if table.late("memory", where):
                    continue
                whole = None
                with table.guard("memory", f"{where}, no plan"):
                    peak, whole = measured_step(scale.arch, "lean", s.patch, s.batch, s.batch, precision, device,
                                                scale.steps)
                    fits = peak + reserved <= USABLE_SHARE * budget_gb * GB
                    table.add("memory", f"{where}, no plan (lean, whole batch)",
                              f"measured {peak / GB:.2f} GB ({'fits' if fits else 'over'} {budget_gb:g} GB), "
                              f"{whole:.1f} images/s", "ok")
                with table.guard("memory", f"{where}, planned"):
                    peak, rate = measured_step(scale.arch, s.activations, s.patch, s.batch, s.micro_batch, precision,
                                               device, scale.steps)
                    cost = f" ({rate / whole:.2f}x the whole batch's)" if whole else ""
                    table.add("memory", f"{where}, planned: {s.micro_batch} x {s.batch // s.micro_batch} {s.activations}",
                              f"{_versus(s.predicted - reserved, peak, device)}; {rate:.1f} images/s{cost}",
                              "ok" if peak <= s.predicted - reserved else "OVER")


def _versus(predicted: float, peak: float, device: torch.device) -> str:
    if device.type == "cuda":
        return f"predicted {predicted / GB:.2f} GB, measured {peak / GB:.2f} GB ({peak / predicted - 1:+.0%})"
    # A CPU plan counts the process's resident memory, which the tensors are only part of.
    return f"predicted {predicted / GB:.2f} GB of process memory; tensors at the peak {peak / GB:.2f} GB"


# ---------------------------------------------------------------- speed


def _official_network(path: str):
    from benchmarks.model_speed import _official_class

    torch.manual_seed(0)
    return _official_class(path)(**PRESETS["default"])


def images_per_s(net, patch: int, batch: int, steps: int, device: torch.device, compiled: bool) -> float:
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=True)
    step_net = torch.compile(net, dynamic=False) if compiled else net
    for _ in range(3):  # warm-up (and compilation)
        _train_step(step_net, opt, patch, batch, batch, "bf16", device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        _train_step(step_net, opt, patch, batch, batch, "bf16", device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def speed_case(scale: Scale, device: torch.device, official: str | None, table: Table) -> dict[int, float]:
    consumed: dict[int, float] = {}
    impls = [("ours", lambda: _network(scale.arch, device))]
    if official:
        impls.append(("official", lambda: _official_network(official)))
    for patch, batch in scale.speed:
        for name, make in impls:
            for compiled in scale.compiled:
                setting = f"{name}, bf16, {patch} px x {batch}, {'compiled' if compiled else 'eager'}"
                if table.late("speed", setting):
                    continue
                with table.guard("speed", setting):
                    rate = images_per_s(make(), patch, batch, scale.steps, device, compiled)
                    if name == "ours":
                        consumed[patch] = max(consumed.get(patch, 0.0), rate)
                    table.add("speed", setting, f"{rate:.1f} images/s, {rate * patch * patch / 1e6:.2f} Mpx/s")
    return consumed


# ---------------------------------------------------------------- feeding


def feeding_case(scale: Scale, consumed: dict[int, float], work: Path, table: Table) -> None:
    import numpy as np
    from PIL import Image

    from data_shards.degrade import NoiseConfig
    from data_shards.pack import PackConfig, pack
    from data_shards.stream import StreamSettings, build_train_loader

    patch = 128
    workers = os.cpu_count() or 1
    if table.late("feeding", f"patch {patch}, {workers} workers"):
        return
    with table.guard("feeding", f"patch {patch}, {workers} workers"):
        src = work / "feeding" / "src"
        src.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(scale.images):
            smooth = rng.random((64, 64, 3)).repeat(8, 0).repeat(8, 1)  # compressible like a photo
            Image.fromarray((smooth * 255).astype(np.uint8)).save(src / f"img{i:03d}.png")
        pack(PackConfig(out=work / "feeding" / "shards", source=src, tile=256, shard_samples=16, workers=workers,
                        progress=False))
        settings = StreamSettings(patch=patch, batch=8, num_workers=workers, noise=NoiseConfig(sigma=25))
        batches = iter(build_train_loader(work / "feeding" / "shards" / "train", settings))
        for _ in range(2 * workers):  # warm-up: every worker started
            next(batches)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 10 and count < 400:
            count += len(next(batches)["input"])
        rate = count / (time.perf_counter() - start)
        need = consumed.get(patch)
        versus = f"; the bf16 step consumes {need:.0f}/s: {rate / need:.1f}x" if need else ""
        table.add("feeding", f"PNG tiles 256 -> patch {patch}, {workers} workers",
                  f"{rate:.0f} samples/s{versus}", "ok" if not need or rate >= need else "SLOWER THAN THE STEP")


# ---------------------------------------------------------------- the driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model and recipe: the code paths in seconds")
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="the card the memory plan plans for (default 24; --quick: 1)")
    parser.add_argument("--official", metavar="PATH", help="the official restormer_arch.py, timed beside ours")
    parser.add_argument("--cases", nargs="+", default=["train", "memory", "speed", "feeding"])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="cases that would start later are skipped and named (default 420: the check and its "
                             "start fit an 8-minute device slot)")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    budget = args.budget_gb or (1.0 if args.quick else 24.0)
    device = torch.device(args.device)
    table = Table(args.budget_s)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device check on {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    consumed: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(tmp)
        if "train" in args.cases:
            train_cells(scale, device, work, table)
        if "memory" in args.cases:
            memory_case(scale, device, budget, table)
        if "speed" in args.cases:
            consumed = speed_case(scale, device, args.official, table)
        if "feeding" in args.cases:
            feeding_case(scale, consumed, work, table)
    print(table.markdown())
    failed = sum(r["status"] != "ok" for r in table.rows)
    print(f"{len(table.rows)} rows, {failed} not ok; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(table.rows, indent=1), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
