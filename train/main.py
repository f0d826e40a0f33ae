"""Train Restormer: `accelerate launch train/main.py [--config RECIPE] [--resume auto|PATH] [key=value ...]`.

With no arguments it runs the built-in demo (Gaussian denoising of bundled photos) in minutes on
a CPU. Recipes live in train/configs/; any field can be overridden with a dotted key=value.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: import the sibling modules as the `train` package, not as top-level names.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import time

import torch

from data_shards.stream import BadSampleError
from train.checkpoint import (CHECKPOINTS_DIR, CheckpointError, Checkpointer, check_resume_arg, complete_checkpoints,
                              read_state, refused)
from train.config import ConfigError, load_config
from train.data import check_data, resolve_sources
from train.host_memory import retain_freed_memory
from train.launch import Launch, build_accelerator, check_precision, resolve_launch
from train.schedule import StagePlan, plan_stages, resume_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: accelerate launch train/main.py --config gaussian_color_denoising_blind optim.lr=2e-4",
    )
    parser.add_argument("--config", default="demo", help="recipe name in train/configs/ or a YAML path (default: demo)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': newest checkpoint of this run that verifies, if any; or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--print-plan", action="store_true",
                        help="print the memory plan (micro-batch, accumulation, activations per stage) and exit; "
                             "plans for this machine's GPU, or for train.memory_gb=N on any machine")
    parser.add_argument("--num-processes", type=int, metavar="N",
                        help="with --print-plan: the process count to plan for (default: this launch's)")
    parser.add_argument("--launch-config", metavar="FILE",
                        help="with --print-plan: plan for the launch of this accelerate config file (its processes, "
                             "precision, DeepSpeed and the ZeRO stage of its DeepSpeed JSON) instead of this one's")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=2e-4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml())
            return 0
        for flag, value in (("--num-processes", args.num_processes), ("--launch-config", args.launch_config)):
            if value is not None and not args.print_plan:
                raise ConfigError(f"{flag} goes with --print-plan (a launch's own are accelerate launch's "
                                  "--num_processes and --config_file)")
        launch = resolve_launch(cfg, num_processes=args.num_processes, launch_config=args.launch_config)
        schedule = plan_stages(cfg, launch.world_size)
        if args.print_plan:
            return print_memory_plan(cfg, launch, schedule)
        train_source, val_source = resolve_sources(cfg)
        check_data(cfg, schedule, train_source, val_source, launch.world_size)
        check_resume_arg(args.resume, cfg.run_dir / CHECKPOINTS_DIR)
        refuse_unmappable_resume(args.resume, cfg, schedule)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    retain_freed_memory()

    # Imported late: a config error should not pay for importing accelerate/deepspeed.
    from accelerate.utils import set_seed

    from train.trainer import NonFiniteError, Trainer

    accelerator = build_accelerator(cfg, launch)
    set_seed(cfg.train.seed)
    checkpointer = Checkpointer(cfg.run_dir, accelerator, launch, cfg.train.keep_last)
    # The errors caught first are raised by every rank at the same step, so the closing barrier is
    # safe. Any other error may be this rank's alone (a bad sample, a dead peer): a barrier would keep
    # it waiting for ranks still training, where exiting lets the launcher stop them.
    agreed = True
    try:
        check_precision(launch, accelerator)  # same settings on every rank: all refuse together, before any work
        checkpointer.claim_run_folder(cfg.to_yaml())  # its lock, held until the end
        trainer = Trainer(cfg, launch, accelerator, checkpointer, schedule, (train_source, val_source), args.resume)
        started = time.time()
        summary = trainer.train()
    except NonFiniteError as err:
        if accelerator.is_main_process:
            print(f"error: {err}", file=sys.stderr)
        return 3
    except (CheckpointError, ConfigError) as err:
        if accelerator.is_main_process:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except BadSampleError as err:  # data.strict: a DataLoader worker's copy carries its traceback first
        agreed = False
        message = str(err).strip().splitlines()[-1].removeprefix(f"{BadSampleError.__module__}.BadSampleError: ")
        print(f"error: {message}", file=sys.stderr)
        return 2
    except BaseException:
        agreed = False
        raise
    finally:
        # A barrier after the last collective, then a pause before interpreter exit: gloo's threads
        # otherwise free tensors while Python shuts down and the process aborts.
        if agreed:
            accelerator.wait_for_everyone()
        checkpointer.release_run_folder()
        accelerator.end_training()
        time.sleep(0.5)

    if accelerator.is_main_process:
        seconds = time.time() - started
        baselines = None
        if cfg.val.classical_baselines and "val/psnr" in summary:
            baselines = run_baselines(cfg, val_source)
        print_summary(summary, seconds, cfg.run_dir, baselines, tile=cfg.val.tile)
    return 0


def run_baselines(cfg, val_source: str):
    """Classical denoisers on this run's validation images (the same noise), saved beside the metrics."""
    import json

    from train.baselines import classical_baselines
    from train.data import val_images, val_noise_config

    sigma = val_noise_config(cfg).sigma
    baselines = classical_baselines(val_images(cfg, val_source, 0, 1), sigma, cfg.val.border)
    (cfg.run_dir / "baselines.json").write_text(json.dumps(baselines.to_dict(), indent=1) + "\n", encoding="utf-8")
    return baselines


def print_memory_plan(cfg, launch: Launch, schedule: StagePlan) -> int:
    """--print-plan: the plan of `launch` (this one, or --launch-config/--num-processes), without training."""
    from train.memory_plan import budget_bytes, describe, plan_for_run

    budget = budget_bytes(cfg.train.memory_gb, launch.device)
    plan = None if budget is None else plan_for_run(cfg, schedule, launch, budget)
    print(f"{schedule.note}; {launch.describe()}")
    print(describe(plan, cfg.train.memory_gb))
    return 0


def refuse_unmappable_resume(arg: str | None, cfg, schedule: StagePlan) -> None:
    """Under train.batch_rule=iterations a resume on another process count must keep the recipe
    iteration: refused here, before any process starts, when it cannot (the trainer maps the step
    again on the checkpoint it verifies). A damaged newest checkpoint is left to --resume auto."""
    if arg is None:
        return
    found = complete_checkpoints(cfg.run_dir / CHECKPOINTS_DIR) if arg == "auto" else [Path(arg)]
    if not found:
        return
    try:
        state = read_state(found[-1])
    except CheckpointError as err:
        if arg == "auto":
            return
        raise refused(arg, str(err)) from err
    resume_step(cfg, int(state["step"]), int(state["world_size"]), schedule)


def print_summary(summary: dict, seconds: float, run_dir: Path, baselines=None, tile: int | None = None) -> None:
    lines = [f"run folder: {run_dir}", f"steps: {summary['step']}  wall time: {seconds:.0f} s"]
    if summary.get("stopped_by"):
        lines.append(f"stopped by {summary['stopped_by']}: resume with --resume auto")
    if baselines is not None:
        lines += baseline_table(summary, baselines, tile)
    elif "val/psnr" in summary:
        gain = summary["val/psnr"] - summary["val/psnr_degraded"]
        lines.append(
            f"validation on {summary['val/images']} images: PSNR degraded {summary['val/psnr_degraded']:.2f} dB "
            f"-> restored {summary['val/psnr']:.2f} dB ({gain:+.2f} dB); SSIM "
            f"{summary['val/ssim_degraded']:.4f} -> {summary['val/ssim']:.4f}"
        )
    in_sync = {True: "yes", False: "NO (report a bug)", None: "not checked (ZeRO-3 shards the weights)"}
    lines.append("weights identical on every process: " + in_sync[summary["replicas_in_sync"]])
    lines.append(f"checkpoint: {summary['checkpoint']}")
    if summary.get("export"):
        lines.append("exported: " + ", ".join(path for kind, path in summary["export"].items() if kind != "config"))
    print("\n".join(lines), flush=True)


def baseline_table(summary: dict, b, tile: int | None) -> list[str]:
    best = max(b.wavelet.psnr, b.nl_means.psnr)
    rows = [("noisy input", b.noisy), ("wavelet (BayesShrink)", b.wavelet),
            (f"non-local means (best h = {b.nl_means_h:g} sigma)", b.nl_means)]
    count = summary["val/images"]
    lines = [f"validation on {count} full-size image{'s' if count != 1 else ''}, sigma {b.sigma:g}:".ljust(43)
             + " PSNR dB   SSIM"]
    lines += [f"  {name:42s}{score.psnr:7.2f}  {score.ssim:.4f}" for name, score in rows]
    model = f"restored (this model{f', {tile}-px tiles' if tile else ''})"
    lines.append(f"  {model:42s}{summary['val/psnr']:7.2f}  {summary['val/ssim']:.4f}  "
                 f"({summary['val/psnr'] - best:+.2f} dB vs the best of the filters scored)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
