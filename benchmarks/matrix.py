"""Every recipe x every launch mode, end to end, printed as a table.

    python benchmarks/matrix.py                       # all recipes x all modes on this machine
    python benchmarks/matrix.py --modes ddp_bf16 zero2_bf16 --recipes deraining --steps 3

Each recipe of train/configs is shrunk to a tiny network that keeps what matters for the kernels
(LayerNorm type, bias, input/output channels, dual-pixel input, gray) and its training settings
(loss, optimizer, clipping, noise, mixup, Y-channel validation), and runs on tiny synthetic data of
its kind (clean RGB/gray images with synthetic noise, 8/16-bit pairs, dual-pixel triples). A cell:
N optimizer steps, a validation, a checkpoint and the export; then a resume of that checkpoint for
one more step (validation, checkpoint, export again); then the exported weights are loaded into
model.Restormer and, where it is installed, into spandrel (the loader of chaiNNer and other
restoration apps), and both must give the same output. A cell this device cannot run by design is
refused before any work (train.launch.check_precision), with the message in the table.

One launch per mode runs every recipe's cell in sequence inside the same processes: the Accelerator
is reused (one process group), and everything a launch would start fresh is fresh per cell (the
Trainer, the model, the optimizer, the DeepSpeed engine and the DeepSpeed settings, the seeds).

The table: per cell its status, the training L1 after N steps (rank 0's, at equal seeds; logged
whatever the objective, so every recipe's gap is on one positive scale: the PSNR objective is in
negative dB), its gap to DDP fp32 (the same data on the same 2 processes) and the wall time.
Timings on a shared machine are inflated by its load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.config import CONFIG_DIR  # noqa: E402 (after the path set-up, as a script)


@dataclass(frozen=True)
class Mode:
    name: str
    processes: int
    precision: str  # accelerate's --mixed_precision
    deepspeed: str | None = None  # launch/ config file of the ZeRO stage
    overrides: tuple[str, ...] = ()  # run config overrides of every cell, e.g. model.compile=true


MODES = {m.name: m for m in (
    Mode("1proc_fp32", 1, "no"),
    Mode("ddp_fp32", 2, "no"),
    Mode("ddp_bf16", 2, "bf16"),
    Mode("ddp_fp16", 2, "fp16"),
    Mode("zero2_bf16", 2, "bf16", "launch/deepspeed_zero2.yaml"),
    Mode("zero2_fp16", 2, "fp16", "launch/deepspeed_zero2.yaml"),
    Mode("zero3_bf16", 2, "bf16", "launch/deepspeed_zero3.yaml"),
)}
REFERENCE_MODE = "ddp_fp32"  # same processes, same data: the loss gaps are measured against it

# The kind of data each recipe trains on (its network's channels come from its preset). A recipe
# added to train/configs without an entry here fails the matrix loudly.
DATA_KIND = {
    "demo": "clean_rgb",
    "gaussian_color_denoising_blind": "clean_rgb",
    "gaussian_color_denoising_sigma15": "clean_rgb",
    "gaussian_color_denoising_sigma25": "clean_rgb",
    "gaussian_color_denoising_sigma50": "clean_rgb",
    "gaussian_gray_denoising_blind": "clean_gray",
    "deraining": "paired_rgb",
    "motion_deblurring": "paired_rgb",
    "real_denoising": "paired_rgb",
    "single_image_defocus": "paired_rgb16",
    "dual_pixel_defocus": "dual_pixel",
}

# The smallest network and run that still go through every kernel: 4 levels, multi-head attention
# (heads 1, 2, 4, 8 of the recipes), a padded GDFN width (int(8 * 2.66) = 21 -> 32), one stage; one
# refinement block, or none where the recipe has none (its export carries an identity block for apps).
SHRINK = [
    "model.dim=8", "model.num_blocks=[1,1,1,1]",
    "progressive.iters=[8]", "progressive.patch=[16]", "progressive.batch=[2]",
    "data.num_workers=0", "train.threads=1", "train.log_every=1", "train.reference_world_size=null",
    "val.every=1000000", "train.ckpt_every=1000000", "val.grid_images=1", "val.grid_crop=16",
    "tracking.wandb=disabled", "train.keep_last=2",
]


@dataclass
class Cell:
    recipe: str
    mode: str
    status: str = "not run"  # ok | refused | failed | not run
    message: str = ""
    l1: float | None = None  # rank 0's training L1 at step N
    l1_resumed: float | None = None  # at step N + 1, after the resume
    val_psnr: float | None = None
    export: str = ""  # what loaded the exported weights and agreed
    seconds: float = 0.0


# ---------------------------------------------------------------- data


def make_data(root: Path) -> dict[str, dict[str, str]]:
    """One tiny packed data set per kind: 6 training images (40 px), 2 validation images (20 x 28)."""
    import numpy as np
    from PIL import Image

    from data_shards.pack import main as pack_main

    rng = np.random.default_rng(0)

    def picture(h: int, w: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        a, b, c = rng.uniform(0, 1, 3)
        return np.stack([a * xx + (1 - a) * yy, (b * xx * yy) % 1, (xx > c) * 0.8 + 0.1], -1)

    def write(path: Path, img: np.ndarray, bits: int = 8) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if bits == 16:  # Pillow writes 16-bit gray only: the pack script reads 16-bit RGB through tifffile
            import tifffile

            tifffile.imwrite(path.with_suffix(".tif"), np.round(img * 65535).astype(np.uint16))
        else:
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)

    def blurred(img: np.ndarray) -> np.ndarray:
        return (img + np.roll(img, 1, 0) + np.roll(img, 1, 1)) / 3

    sets = {}
    for kind in sorted(set(DATA_KIND.values())):
        src = root / "images" / kind
        for split, count, (h, w) in (("train", 6, (40, 40)), ("val", 2, (20, 28))):
            for i in range(count):
                clean = picture(h, w)
                name = f"{split}{i}.png"
                if kind == "clean_gray":
                    write(src / split / name, clean.mean(-1))
                elif kind.startswith("clean"):
                    write(src / split / name, clean)
                elif kind == "dual_pixel":
                    write(src / split / "left" / name, blurred(clean))
                    write(src / split / "right" / name, np.roll(blurred(clean), 1, 1))
                    write(src / split / "target" / name, clean)
                else:
                    bits = 16 if kind == "paired_rgb16" else 8
                    write(src / split / "input" / name, blurred(clean), bits)
                    write(src / split / "target" / name, clean, bits)
        sets[kind] = {}
        for split in ("train", "val"):
            folder = src / split
            if kind.startswith("clean"):
                args = [str(folder)] + (["--color", "gray"] if kind == "clean_gray" else [])
            elif kind == "dual_pixel":
                args = ["--input", f"left={folder / 'left'}", "--input", f"right={folder / 'right'}",
                        "--target", str(folder / "target")]
            else:
                args = ["--input", str(folder / "input"), "--target", str(folder / "target")]
            out = root / "shards" / kind / split  # one pack output per split: the pack refuses a non-empty folder
            code = pack_main([*args, "--out", str(out), "--split", split, "--no-progress"])
            if code != 0:
                raise RuntimeError(f"packing the {kind} {split} data failed (exit {code})")
            sets[kind][split] = str(out / split)
    return sets


# ---------------------------------------------------------------- inside a launch (every rank)


def run_cells(plan: dict) -> None:
    """Runs every recipe's cell of one mode in this launch; rank 0 appends each result to the file."""
    import torch

    from train.config import ConfigError, load_config
    from train.launch import build_accelerator, check_precision, resolve_launch

    accelerator = launch = None
    pristine_ds = None  # the DeepSpeed settings as launched: each cell starts from them
    for recipe in plan["recipes"]:
        cell = Cell(recipe, plan["mode"])
        started = time.perf_counter()
        out = Path(plan["out"]) / plan["mode"] / recipe
        data = plan["data"][DATA_KIND[recipe]]
        refinement = 0 if load_config(recipe).model.num_refinement_blocks == 0 else 1  # None: the official 4
        overrides = [*SHRINK, f"model.num_refinement_blocks={refinement}", f"data.train={data['train']}",
                     f"data.val={data['val']}", f"output_dir={out}", *plan["overrides"]]
        steps = plan["steps"]
        try:
            cfg = load_config(recipe, [*overrides, f"train.max_steps={steps}"])
            torch.set_num_threads(cfg.train.threads)
            if accelerator is None:
                launch = resolve_launch(cfg)
                accelerator = build_accelerator(cfg, launch)
                if launch.deepspeed:
                    pristine_ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
            check_precision(launch, accelerator)
        except ConfigError as err:
            cell.status, cell.message = "refused", str(err)
        if cell.status != "refused":
            try:
                first = _train(launch, accelerator, cfg, pristine_ds, resume=None)
                cell.l1 = _l1_at(out, steps)
                resumed_cfg = load_config(recipe, [*overrides, f"train.max_steps={steps + 1}"])
                second = _train(launch, accelerator, resumed_cfg, pristine_ds, resume=Path(first["checkpoint"]))
                cell.l1_resumed = _l1_at(out, steps + 1)
                cell.val_psnr = second.get("val/psnr")
                if accelerator.is_main_process:
                    logged = _logged_steps(out)  # a resume continues the log; a restart would repeat 1..N
                    assert logged == list(range(1, steps + 2)), f"steps logged {logged}: the resume did not continue"
                    cell.export = check_export(resumed_cfg, Path(second["export"]["safetensors"]))
                cell.status = "ok"
            except Exception as err:  # recorded, then the next cell: the table shows every failure
                cell.status, cell.message = "failed", f"{type(err).__name__}: {err}"
                if accelerator is not None and accelerator.is_main_process:
                    traceback.print_exc()
        cell.seconds = time.perf_counter() - started
        if accelerator is None or accelerator.is_main_process:
            with open(plan["results"], "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(cell)) + "\n")
    if accelerator is not None:
        # As train/main.py: a barrier after the last collective, a pause before exit (gloo threads otherwise abort at exit).
        accelerator.wait_for_everyone()
        accelerator.end_training()
        time.sleep(0.5)


def _train(launch, accelerator, cfg, pristine_ds, resume: Path | None) -> dict:
    from accelerate.utils import set_seed

    from train.checkpoint import Checkpointer
    from train.data import check_data, resolve_sources
    from train.schedule import plan_stages
    from train.trainer import Trainer

    accelerator.free_memory()  # forgets the previous cell's model, optimizer and DeepSpeed engine
    if pristine_ds is not None:  # in place: accelerate's DeepSpeed plugin reads the same dict through a wrapper
        live = accelerator.state.deepspeed_plugin.deepspeed_config
        live.clear()
        live.update(copy.deepcopy(pristine_ds))
    train_source, val_source = resolve_sources(cfg)
    schedule = plan_stages(cfg, launch.world_size)
    check_data(cfg, schedule, train_source, val_source)
    set_seed(cfg.train.seed)
    checkpointer = Checkpointer(cfg.run_dir, accelerator, launch, cfg.train.keep_last)
    checkpointer.claim_run_folder(cfg.to_yaml())
    try:
        return Trainer(cfg, launch, accelerator, checkpointer, schedule, (train_source, val_source),
                       None if resume is None else str(resume)).train()
    finally:
        checkpointer.release_run_folder()


def _step_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():  # written by rank 0 only
        return []
    return [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if "event" not in r]


def _l1_at(run_dir: Path, step: int) -> float | None:
    values = [r["l1"] for r in _step_records(run_dir) if r["step"] == step]
    return values[-1] if values else None


def _logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _step_records(run_dir)]


def check_export(cfg, weights: Path) -> str:
    """The exported weights in model.Restormer and in spandrel: the same output, or an AssertionError."""
    import torch

    from model import build_model, load_weights

    arch = cfg.model.shape_overrides()
    ours = build_model(cfg.model.preset, **arch).eval()
    load_weights(ours, weights)
    x = torch.rand(1, ours.patch_embed.proj.in_channels, 24, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(x)
    official = weights.with_name("model_official.pth")
    again = build_model(cfg.model.preset, **arch).eval()
    load_weights(again, official)
    with torch.no_grad():
        assert torch.equal(again(x), expected), f"{official} and {weights} give different outputs"
    try:
        import spandrel
        import spandrel_extra_arches  # Restormer is one of its (non-commercial) architectures
    except Exception as err:  # not installed, or its torchvision does not load here
        return f"Restormer (spandrel unavailable: {type(err).__name__})"
    spandrel_extra_arches.install(ignore_duplicates=True)
    descriptor = spandrel.ModelLoader().load_from_file(str(official))
    with torch.no_grad():
        theirs = descriptor.model.eval()(x)
    gap = (theirs - expected).abs().max().item()
    assert gap < 1e-4, f"spandrel's {descriptor.architecture.name} output differs from model.Restormer by {gap:.2e}"
    return f"Restormer = spandrel {descriptor.architecture.name} (max diff {gap:.1e})"


# ---------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(mode: Mode, cpu: bool) -> list[str]:
    """`accelerate launch` for one mode, as docs/scaling.md writes it (gloo on a CPU-only machine)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if mode.deepspeed:
        cmd += ["--config_file", mode.deepspeed]
    elif mode.processes > 1:
        cmd += ["--multi_gpu"]
    elif cpu:
        cmd += ["--cpu"]
    return cmd + ["--num_machines", "1", "--num_processes", str(mode.processes), "--mixed_precision",
                  mode.precision, "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                  str(Path(__file__).resolve()), "--worker"]


def run_matrix(modes: list[str | Mode], recipes: list[str], steps: int, out: Path, timeout: float,
               data: dict[str, dict[str, str]], cpu: bool = False) -> list[Cell]:
    """Every cell of `modes` (names of MODES, or Modes) and `recipes` (data from make_data; `cpu` hides
    the GPUs); a launch that dies or times out marks its cells failed with the launcher's last words."""
    import torch

    cpu = cpu or not torch.cuda.is_available()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    # The repository first; packages installed beside the interpreter's (a --target folder) stay reachable.
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cells = []
    for mode in modes:
        mode = MODES[mode] if isinstance(mode, str) else mode
        name = mode.name
        results = out / f"{name}.jsonl"
        results.unlink(missing_ok=True)
        plan = {"mode": name, "recipes": recipes, "steps": steps, "out": str(out / "runs"),
                "data": data, "results": str(results), "overrides": list(mode.overrides)}
        plan_file = out / f"{name}.plan.json"
        plan_file.write_text(json.dumps(plan), encoding="utf-8")
        started = time.perf_counter()
        try:
            proc = subprocess.run([*launch_command(mode, cpu), str(plan_file)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            tail, code = (proc.stdout + proc.stderr)[-3000:], proc.returncode
        except subprocess.TimeoutExpired as err:
            tail, code = f"timed out after {timeout:.0f} s: {str(err.stderr or '')[-2000:]}", None
        (out / f"{name}.log").write_text(tail, encoding="utf-8")
        done = {c["recipe"]: Cell(**c) for c in map(json.loads, results.read_text(encoding="utf-8").splitlines())} \
            if results.is_file() else {}
        for recipe in recipes:
            cell = done.get(recipe) or Cell(recipe, name, "failed", f"launch exit {code}: {tail[-500:]}")
            if code != 0 and cell.status == "ok":
                cell = Cell(**{**asdict(cell), "status": "failed", "message": f"launch exit {code}: {tail[-500:]}"})
            cells.append(cell)
        print(f"{name}: {sum(c.status == 'ok' for c in cells[-len(recipes):])}/{len(recipes)} ok, "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return cells


def l1_gaps(cells: list[Cell]) -> dict[str, float]:
    """Per mode: the largest relative gap of its training L1 after N steps to the reference mode's, over recipes
    (modes on as many processes as the reference, so on the same data)."""
    reference = {c.recipe: c.l1 for c in cells if c.mode == REFERENCE_MODE and c.l1 is not None}
    gaps: dict[str, float] = {}
    for c in cells:
        if MODES[c.mode].processes != MODES[REFERENCE_MODE].processes:
            continue  # other processes, other data: not a precision gap
        if c.l1 is not None and reference.get(c.recipe):
            gap = abs(c.l1 - reference[c.recipe]) / reference[c.recipe]
            gaps[c.mode] = max(gaps.get(c.mode, 0.0), gap)
    return gaps


def pair_gap(cells: list[Cell], a: str, b: str) -> float | None:
    """The largest relative gap between two modes' training L1 after N steps, over recipes."""
    l1 = {(c.mode, c.recipe): c.l1 for c in cells if c.l1 is not None}
    gaps = [abs(l1[a, r] - l1[b, r]) / l1[b, r] for m, r in l1 if m == a and (b, r) in l1]
    return max(gaps) if gaps else None


def format_table(cells: list[Cell], steps: int) -> str:
    reference = {c.recipe: c.l1 for c in cells if c.mode == REFERENCE_MODE}
    header = f"{'recipe':34} {'mode':11} {'status':8} {f'L1@{steps}':>10} {'vs ddp_fp32':>11} {'val PSNR':>8} " \
             f"{'time s':>6}  export / message"
    lines = [header, "-" * len(header)]
    for c in cells:
        gap = f"{(c.l1 - reference[c.recipe]) / reference[c.recipe]:+.2%}" \
            if c.l1 is not None and reference.get(c.recipe) else ""
        l1 = f"{c.l1:.5f}" if c.l1 is not None else ""
        psnr = f"{c.val_psnr:.2f}" if c.val_psnr is not None else ""
        note = c.export if c.status == "ok" else c.message.splitlines()[0][:160] if c.message else ""
        lines.append(f"{c.recipe:34} {c.mode:11} {c.status:8} {l1:>10} {gap:>11} {psnr:>8} {c.seconds:6.1f}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--recipes", nargs="+", default=sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps before the checkpoint (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the cells as JSON here")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where GPUs are present")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launch (default 900)")
    parser.add_argument("--worker", nargs="?", const=None, default=argparse.SUPPRESS, metavar="PLAN",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "worker" in args:
        run_cells(json.loads(Path(args.worker).read_text(encoding="utf-8")))
        return 0
    unknown = sorted(set(args.recipes) - set(DATA_KIND))
    if unknown:
        print(f"error: no data kind for recipe(s) {', '.join(unknown)}: add them to DATA_KIND in {__file__}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="matrix-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the pack script's report: not part of the table
            data = make_data(out / "data")
        cells = run_matrix(args.modes, args.recipes, args.steps, out, args.timeout, data, args.cpu)
        elapsed = time.perf_counter() - started
    print(format_table(cells, args.steps))
    gaps = l1_gaps(cells)
    print(f"\nlargest relative gap of the training L1 after {args.steps} steps to {REFERENCE_MODE} (same data, same "
          "seeds), over recipes: " + ", ".join(f"{m} {g:.2%}" for m, g in gaps.items() if m != REFERENCE_MODE))
    zero2 = pair_gap(cells, "zero2_bf16", "ddp_bf16")
    if zero2 is not None:
        print(f"zero2_bf16 vs ddp_bf16 (autocast): largest relative L1 gap {zero2:.2%}")
    print(f"{len(cells)} cells, {sum(c.status == 'ok' for c in cells)} ok, "
          f"{sum(c.status == 'refused' for c in cells)} refused, {sum(c.status == 'failed' for c in cells)} failed; "
          f"{elapsed:.0f} s wall")
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=1), encoding="utf-8")
    return 1 if any(c.status == "failed" for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
