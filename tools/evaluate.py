"""Score a model on a test set: a per-image CSV and a summary table (PSNR/SSIM, RGB and Y channel).

    python -m tools.evaluate -w runs/demo --input rain/input --target rain/target --y-channel
    python -m tools.evaluate -w gaussian_color_denoising_blind.pth --target CBSD68/ --sigma 25
    python -m tools.evaluate -w runs/demo --shards shards/val

Three kinds of test set:
- paired folders (--input and --target): files matched by name (else by stem);
- clean images plus Gaussian noise (--target and --sigma, in 0-255 units): the noise of each image is
  drawn from a generator seeded with (--seed, the file's path relative to --target), so an image gets
  the same noise in every run, in any order and in any subset. The official test scripts instead call
  np.random.seed(0) once and draw in file order; the noise realisations differ, the statistics don't
  (expect differences of a few hundredths of a dB). The noisy input is not clipped, as in the paper;
- packed shards (--shards; clean-only shards need --sigma; noise there is seeded by (0, the sample key),
  the same rule (data_shards.degrade.key_seed) as the training run's validation).

Metrics follow the official evaluation, through train.metrics.score (validation during training uses the
same function): the restored image is scored as it would be saved (clamped and rounded to the target's
bit depth; --quantize), PSNR with data range 1, SSIM with an 11x11 Gaussian
window (sigma 1.5), the Y channel of ITU-R BT.601 (MATLAB rgb2ycbcr), --border pixels cropped from
each side. The degraded input is scored as given, beside the restored one. For dual-pixel data the
degraded image is the left view.

An image that cannot be decoded, is over --max-pixels or does not match its pair in size is skipped
and named; the means cover the other images. Exit status: 0 every image scored; 1 some skipped;
2 bad arguments, weights or data (nothing scored).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from data_shards.degrade import NoiseConfig, add_noise, key_seed
from model import WeightsMismatchError, restore
from tools.imageio import ImageError, collect_images, read_tensor, write_png
from tools.loading import LoadedModel, ModelLoadError, add_model_args, model_from_args, pick_device
from tools.restore import add_inference_args, check_inference_args, pair_right_views, print_limit_hint, read_input
from train.metrics import score


@dataclass
class Sample:
    key: str
    input: torch.Tensor  # (1, Cin, H, W) in [0, 1] (noisy inputs may leave the range)
    target: torch.Tensor  # (1, C, H, W)
    bits: int | None  # the target's bit depth when known


@dataclass
class Skipped:
    """An image of the test set that could not be scored."""

    error: ImageError


def noisy_copy(clean: torch.Tensor, sigma: float, seed: int, key: str) -> torch.Tensor:
    """clean + N(0, (sigma/255)^2), unclipped, identical for the same (seed, key) on any machine."""
    rng = np.random.default_rng(key_seed(key, seed))
    image = clean[0].permute(1, 2, 0).numpy()
    noisy = add_noise(image, NoiseConfig(sigma=sigma), rng)
    return torch.from_numpy(np.ascontiguousarray(noisy)).permute(2, 0, 1).unsqueeze(0)


def _match_targets(inputs: list[Path], target_dir: Path) -> list[Path]:
    by_stem = {p.stem: p for p in collect_images([str(target_dir)])}
    matched, missing = [], []
    for path in inputs:
        target = target_dir / path.name if (target_dir / path.name).is_file() else by_stem.get(path.stem)
        (matched if target is not None else missing).append(target if target is not None else path.name)
    if missing:
        raise FileNotFoundError(f"--target {target_dir}: no target for {', '.join(missing[:5])}"
                                f"{' ...' if len(missing) > 5 else ''} (targets must share the inputs' names or stems)")
    return matched


def folder_samples(loaded: LoadedModel, target_dir: str, input_dir: str | None, right_dir: str | None,
                   sigma: float | None, seed: int, max_images: int | None,
                   max_pixels: int) -> tuple[int, Iterator[Sample | Skipped]]:
    """(number of images, iterator): paired folders, or clean targets plus seeded Gaussian noise."""
    target_root = Path(target_dir)
    if input_dir is not None:
        inputs = collect_images([input_dir])[:max_images]
        targets = _match_targets(inputs, target_root)
    else:
        targets = collect_images([target_dir])[:max_images]
        inputs = targets
    rights = pair_right_views(inputs, right_dir)

    def read(path: Path, right: Path | None, target_path: Path) -> Sample:
        target, bits = read_tensor(target_path, loaded.out_channels, max_pixels)
        key = target_path.relative_to(target_root).as_posix()
        if sigma is None:
            degraded, _ = read_input(loaded, path, right, max_pixels)
        else:
            degraded = noisy_copy(target, sigma, seed, key)
        if degraded.shape[-2:] != target.shape[-2:]:
            raise ImageError(f"{path}: input {tuple(degraded.shape[-2:])} and target "
                             f"{tuple(target.shape[-2:])} differ in size")
        return Sample(key, degraded, target, bits)

    def generate() -> Iterator[Sample | Skipped]:
        for path, right, target_path in zip(inputs, rights, targets):
            try:
                yield read(path, right, target_path)
            except ImageError as err:
                yield Skipped(err)

    return len(inputs), generate()


def shard_samples(source: str, sigma: float | None, max_images: int | None) -> tuple[int | None, Iterator[Sample]]:
    from data_shards.stream import build_val_loader

    loader = build_val_loader(source, noise=NoiseConfig(sigma=sigma) if sigma is not None else None,
                              max_images=max_images)
    try:
        total = len(loader)
    except TypeError:  # a bare shard pattern has no index to count from
        total = None
    return total, (Sample(item["key"], item["input"], item["target"], item["bits"]) for item in loader)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Means over images: one row for the restored images, one for the degraded inputs."""
    metrics = [m for m in ("psnr", "ssim", "psnr_y", "ssim_y") if m in table]
    rows = {"restored": [table[m].mean() for m in metrics],
            "degraded input": [table[f"{m}_degraded"].mean() for m in metrics]}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[m.upper().replace("_Y", "-Y") for m in metrics])


def format_summary(summary: pd.DataFrame) -> str:
    formats = {c: (lambda v: f"{v:.2f}") if c.startswith("PSNR") else (lambda v: f"{v:.4f}") for c in summary}
    return summary.to_string(formatters=formats)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("test set")
    data.add_argument("--target", metavar="DIR", help="folder of ground-truth images")
    data.add_argument("--input", metavar="DIR", help="folder of degraded images matching --target (paired data)")
    data.add_argument("--right", metavar="DIR", help="dual-pixel data: folder of right views (--input holds the left views)")
    data.add_argument("--sigma", type=float, metavar="S", help="Gaussian noise level in 0-255 units, added to --target "
                                                  "images (or to clean-only --shards)")
    data.add_argument("--seed", type=int, default=0, metavar="N", help="noise seed, combined with each file's name (default 0)")
    data.add_argument("--shards", metavar="SOURCE", help="packed shards instead of folders: split folder, index.json or pattern")
    data.add_argument("--max-images", type=int, default=None, metavar="N", help="score only the first N images")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--border", type=int, default=0, metavar="N", help="pixels cropped from each side before scoring")
    scoring.add_argument("--y-channel", action="store_true",
                         help="also score the Y channel (deraining/deblurring convention)")
    scoring.add_argument("--quantize", choices=["auto", "8", "16", "off"], default="auto",
                         help="round restored images as saving would: auto = the target file's depth "
                              "(shards: the stored depth); off = score the raw float output")
    out = parser.add_argument_group("output")
    out.add_argument("--csv", default="evaluation.csv", metavar="PATH", help="per-image results (default evaluation.csv)")
    out.add_argument("--save-images", default=None, metavar="DIR", help="also write the restored images (PNG) to this folder")
    add_model_args(parser)
    add_inference_args(parser)
    return parser


def _check_data_args(args: argparse.Namespace) -> None:
    if args.shards is not None:
        if args.input or args.target or args.right:
            raise ValueError("--shards replaces --input/--target/--right; give one or the other")
        return
    if args.target is None:
        raise ValueError("give --target (with --input for paired data, or --sigma for synthetic noise) or --shards")
    if (args.input is None) == (args.sigma is None):
        raise ValueError("with --target give exactly one of --input (paired folders) or --sigma (Gaussian noise)")
    if args.right is not None and args.input is None:
        raise ValueError("--right needs --input (the left views)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _check_data_args(args)
        device = pick_device(args.device)
        loaded = model_from_args(args, device)
        check_inference_args(args, loaded)
        if args.shards is not None:
            total, samples = shard_samples(args.shards, args.sigma, args.max_images)
        else:
            total, samples = folder_samples(loaded, args.target, args.input, args.right, args.sigma, args.seed,
                                            args.max_images, args.max_pixels)
    except (FileNotFoundError, ModelLoadError, WeightsMismatchError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    print(f"model: {loaded.describe()} on {device}", file=sys.stderr)
    rows, skipped = [], []
    start = time.perf_counter()
    try:
        for sample in tqdm(samples, total=total, desc="evaluate", unit="img", dynamic_ncols=True):
            if isinstance(sample, Skipped):
                tqdm.write(f"skipped: {sample.error}", file=sys.stderr)
                skipped.append(sample.error)
                continue
            t0 = time.perf_counter()
            restored = restore(loaded.model, sample.input, args.tile, args.overlap, args.precision,
                               args.self_ensemble).cpu()
            seconds = time.perf_counter() - t0
            bits = {"auto": sample.bits or 8, "8": 8, "16": 16, "off": None}[args.quantize]
            degraded = sample.input[:, : sample.target.shape[1]]
            figures = score(restored, degraded, sample.target, border=args.border, y_channel=args.y_channel,
                            bits=bits)
            height, width = sample.target.shape[-2:]
            rows.append({"image": sample.key, "height": height, "width": width,
                         **{name: value.item() for name, value in figures.items()},
                         "seconds": seconds})
            if args.save_images:
                write_png(Path(args.save_images) / Path(sample.key).with_suffix(".png"), restored, bits or 8)
    except ValueError as err:  # e.g. clean-only shards without --sigma
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_limit_hint(skipped, args.max_pixels)
    if not rows:
        print("error: " + (f"none of the {len(skipped)} images could be scored (named above)" if skipped
                           else "the test set holds no images"), file=sys.stderr)
        return 2

    table = pd.DataFrame(rows)
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False, float_format="%.6f")
    elapsed = time.perf_counter() - start
    print(f"{len(table)} images, {elapsed:.1f} s ({table['seconds'].mean():.2f} s/image restoring); "
          f"border {args.border}; per-image results: {csv_path}"
          + (f"; {len(skipped)} skipped (named above), not in the means" if skipped else ""))
    print(format_summary(summarize(table)))
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
