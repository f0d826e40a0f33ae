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
import datetime
import os
import time

import torch

from data_shards.stream import BadSampleError
from train.checkpoint import CheckpointError, resolve_resume
from train.config import ConfigError, load_config
from train.data import check_data, resolve_sources
from train.schedule import plan_stages
from train.tracking import wandb_mode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: accelerate launch train/main.py --config gaussian_color_denoising_blind optim.lr=2e-4",
    )
    parser.add_argument("--config", default="demo", help="recipe name in train/configs/ or a YAML path (default: demo)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': newest complete checkpoint of this run, if any; or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=2e-4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml())
            return 0
        plan = plan_stages(cfg, world_size)
        train_source, val_source = resolve_sources(cfg)
        check_data(cfg, plan, train_source, val_source)
        resume_from = resolve_resume(args.resume, cfg.run_dir / "checkpoints")
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)

    # Imported late: a config error should not pay for importing accelerate/deepspeed.
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    from train.trainer import NonFiniteError, Trainer

    timeout = datetime.timedelta(seconds=cfg.train.dist_timeout_s)
    cpu_ranks = world_size > 1 and not torch.cuda.is_available()
    if cpu_ranks:
        # Without a GPU every backend (DeepSpeed included) must use gloo, or ranks do not see each other.
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    else:
        handlers = [InitProcessGroupKwargs(timeout=timeout)]
    # `accelerate launch --multi_gpu` (launch/cpu.yaml) on a machine without GPUs starts processes that
    # each think they are alone unless told they are CPU ranks; DeepSpeed picks its CPU backend itself.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        cpu=cpu_ranks and not deepspeed,
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if wandb_mode(cfg.tracking.wandb) == "disabled" else "wandb",
        project_dir=str(cfg.run_dir),
        kwargs_handlers=handlers,
    )
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    # The errors caught first are raised by every rank at the same step, so the closing barrier is
    # safe. Any other error may be this rank's alone (a bad sample, a dead peer): a barrier would keep
    # it waiting for ranks still training, where exiting lets the launcher stop them.
    agreed = True
    try:
        trainer = Trainer(cfg, accelerator, train_source, val_source, resume_from)
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
        accelerator.end_training()
        time.sleep(0.5)

    if accelerator.is_main_process:
        seconds = time.time() - started
        baselines = None
        if cfg.val.classical_baselines and "val/psnr" in summary:
            baselines = run_baselines(cfg, val_source)
        print_summary(summary, seconds, cfg.run_dir, baselines)
    return 0


def run_baselines(cfg, val_source: str):
    """Classical denoisers on this run's validation images (the same noise), saved beside the metrics."""
    import json

    from train.baselines import classical_baselines
    from train.data import val_images

    baselines = classical_baselines(val_images(cfg, val_source, 0, 1), cfg.data.noise_sigma, cfg.val.border)
    (cfg.run_dir / "baselines.json").write_text(json.dumps(baselines.to_dict(), indent=1) + "\n")
    return baselines


def print_summary(summary: dict, seconds: float, run_dir: Path, baselines=None) -> None:
    lines = [f"run folder: {run_dir}", f"steps: {summary['step']}  wall time: {seconds:.0f} s"]
    if summary.get("stopped_by"):
        lines.append(f"stopped by {summary['stopped_by']}: resume with --resume auto")
    if baselines is not None:
        lines += baseline_table(summary, baselines)
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
        lines.append(f"exported: {summary['export']['safetensors']}, {summary['export']['official_pth']}")
    print("\n".join(lines), flush=True)


def baseline_table(summary: dict, b) -> list[str]:
    best = max(b.wavelet.psnr, b.nl_means.psnr)
    rows = [("noisy input", b.noisy), ("wavelet (BayesShrink)", b.wavelet),
            (f"non-local means (best h = {b.nl_means_h:g} sigma)", b.nl_means)]
    count = summary["val/images"]
    lines = [f"validation on {count} whole image{'s' if count != 1 else ''}, sigma {b.sigma:g}:".ljust(44)
             + "PSNR dB   SSIM"]
    lines += [f"  {name:42s}{score.psnr:7.2f}  {score.ssim:.4f}" for name, score in rows]
    lines.append(f"  {'restored (this model)':42s}{summary['val/psnr']:7.2f}  {summary['val/ssim']:.4f}  "
                 f"({summary['val/psnr'] - best:+.2f} dB vs the best classical filter)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
