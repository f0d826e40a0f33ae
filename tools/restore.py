"""Restore images with a trained or official Restormer.

    python -m tools.restore photos/ -w runs/demo -o restored/
    python -m tools.restore 'rain/*.png' -w deraining.pth -o out/ --tile 512 --precision bf16
    python -m tools.restore left/ --right right/ -w dual_pixel_defocus_deblurring.pth -o out/

Images are padded by reflection to a multiple of 8 and cropped back. --tile restores a large image in
overlapping tiles whose seams are blended, so memory stays bounded whatever the image size. The
output is a PNG with the input's bit depth (8 or 16) unless --bits says otherwise.

An image that cannot be decoded, or whose header claims more than --max-pixels (default 8192x8192,
checked before decoding), is skipped and named, and the next one is restored. Exit status: 0 every
image restored; 1 some skipped (the others are written) or out of memory; 2 bad arguments, inputs or
weights (nothing restored).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model import PRECISIONS, WeightsMismatchError, restore, tiling_problem
from tools.imageio import MAX_PIXELS, ImageError, PixelLimitError, collect_images, read_tensor, write_png
from tools.loading import LoadedModel, ModelLoadError, add_model_args, model_from_args, pick_device

def read_input(loaded: LoadedModel, path: Path, right: Path | None,
               max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, int]:
    """The model's input for one image (a dual-pixel model takes left and right views stacked)."""
    if not loaded.dual_pixel:
        return read_tensor(path, loaded.in_channels, max_pixels)
    if right is None:
        raise ImageError(f"{path}: the dual-pixel model needs the right view too (--right)")
    left_img, bits = read_tensor(path, 3, max_pixels)
    right_img, _ = read_tensor(right, 3, max_pixels)
    if left_img.shape != right_img.shape:
        raise ImageError(f"{path} and {right}: left and right views differ in size "
                         f"({tuple(left_img.shape[-2:])} vs {tuple(right_img.shape[-2:])})")
    return torch.cat([left_img, right_img], dim=1), bits  # the official order: left, right


def pair_right_views(inputs: list[Path], right: str | None) -> list[Path | None]:
    """The right view for each left view: --right is a file (one input) or a folder (same file names)."""
    if right is None:
        return [None] * len(inputs)
    right_path = Path(right)
    if right_path.is_file():
        if len(inputs) != 1:
            raise FileNotFoundError(f"--right {right} is one file but {len(inputs)} inputs were given; "
                                    "give a folder of right views named like the left ones")
        return [right_path]
    if not right_path.is_dir():
        raise FileNotFoundError(f"--right {right}: no such file or folder")
    pairs = [right_path / p.name for p in inputs]
    missing = [p.name for p, r in zip(inputs, pairs) if not r.is_file()]
    if missing:
        raise FileNotFoundError(f"--right {right}: no right view for {', '.join(missing[:5])}"
                                f"{' ...' if len(missing) > 5 else ''} (right views must share the left ones' file names)")
    return pairs


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by restore and evaluate: how the network is run."""
    group = parser.add_argument_group("inference")
    group.add_argument("--tile", type=int, default=None, metavar="N",
                       help="restore in tiles of this size (a multiple of 8) to bound memory; default: whole image")
    group.add_argument("--overlap", type=int, default=32, metavar="N", help="pixels shared by neighbouring tiles, a multiple of 8 (default 32)")
    group.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                       help="autocast dtype; bf16/fp16 are meant for GPUs (default fp32)")
    group.add_argument("--self-ensemble", action="store_true",
                       help="average over the 8 flips/rotations (x8 compute); not for dual-pixel models")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    group.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")
    group.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                       help="largest image read, in pixels, checked from the file header before decoding; larger "
                            "ones are skipped and named (default %(default)s = 8192x8192; raise it with --tile)")


def check_inference_args(args: argparse.Namespace, loaded: LoadedModel) -> None:
    problem = args.tile is not None and tiling_problem(args.tile, args.overlap)
    if problem:
        raise ValueError(f"--tile {args.tile} --overlap {args.overlap}: {problem}")
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels {args.max_pixels} must be at least 1")
    if args.self_ensemble and loaded.dual_pixel:
        raise ValueError("--self-ensemble would flip the left/right disparity of dual-pixel input; "
                         "leave it off for dual-pixel models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.restore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders (not recursive) or quoted glob patterns")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the restored PNGs (same file stems)")
    parser.add_argument("--right", default=None, metavar="PATH",
                        help="dual-pixel models: the right view (a file for one input, or a folder whose files "
                             "share the left views' names); the inputs are the left views")
    parser.add_argument("--bits", choices=["auto", "8", "16"], default="auto",
                        help="output bit depth; auto keeps each input's depth (default)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_model_args(parser)
    add_inference_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        inputs = collect_images(args.inputs)
        rights = pair_right_views(inputs, args.right)
        device = pick_device(args.device)
        loaded = model_from_args(args, device)
        check_inference_args(args, loaded)
        if loaded.dual_pixel and args.right is None:
            raise ValueError("a dual-pixel model takes left and right views: the inputs are the left ones, "
                             "give the right ones with --right")
    except (FileNotFoundError, ModelLoadError, WeightsMismatchError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    targets = [out_dir / f"{p.stem}.png" for p in inputs]
    clashes = {t.name for t in targets if targets.count(t) > 1}
    if clashes:
        print(f"error: several inputs would be written to the same file: {', '.join(sorted(clashes))}", file=sys.stderr)
        return 2
    if any(t.resolve() == p.resolve() for t, p in zip(targets, inputs)):
        print("error: an output would overwrite its input; choose another --output folder", file=sys.stderr)
        return 2
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        print(f"error: {existing[0]} exists ({len(existing)} outputs do); pass --overwrite to replace them",
              file=sys.stderr)
        return 2

    print(f"model: {loaded.describe()} on {device}", file=sys.stderr)
    start = time.perf_counter()
    skipped: list[ImageError] = []
    bar = tqdm(list(zip(inputs, rights, targets)), desc="restore", unit="img", dynamic_ncols=True)
    for path, right, target in bar:
        bar.set_postfix_str(path.name, refresh=False)
        try:
            x, bits = read_input(loaded, path, right, args.max_pixels)
        except ImageError as err:
            tqdm.write(f"skipped: {err}", file=sys.stderr)
            skipped.append(err)
            continue
        try:
            restored = restore(loaded.model, x, args.tile, args.overlap, args.precision, args.self_ensemble)
        except (torch.OutOfMemoryError, MemoryError):
            bar.close()
            print(f"error: out of memory on {path} ({x.shape[-1]}x{x.shape[-2]}); restore it in tiles, e.g. "
                  f"--tile {min(args.tile or 1024, 1024) // 2}", file=sys.stderr)
            return 1
        write_png(target, restored, bits if args.bits == "auto" else int(args.bits))
    bar.close()
    print(f"restored {len(inputs) - len(skipped)} image(s) in {time.perf_counter() - start:.1f} s -> {out_dir}"
          + (f"; {len(skipped)} skipped (named above)" if skipped else ""))
    print_limit_hint(skipped, args.max_pixels)
    return 1 if skipped else 0


def print_limit_hint(skipped: list[ImageError], max_pixels: int) -> None:
    over = sum(isinstance(err, PixelLimitError) for err in skipped)
    if over:
        print(f"{over} image(s) over --max-pixels {max_pixels}: raise it to read them, with --tile to bound "
              "the model's memory", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
