"""The built-in `demo` data set: real photos that ship inside installed packages, packed on first use.

Task: Gaussian colour denoising at sigma 25 (noise is added online by the stream).
  train: 8 colour photos, each box-downscaled to at most 512 px on its long side, and 16
         dead-leaves images (256 x 256, data_shards.dead_leaves: disks and thin bars, coloured
         half with the photos' pixels, half with random colours), all cut into 128x128 npy tiles
         (stride 128, edge tiles flush with the border).
         Photos: scikit-image: astronaut, color, hubble_deep_field, ihc, motorcycle_left,
         motorcycle_right, retina; matplotlib: grace_hopper
  val:   3 held-out colour photos (never in train), kept whole at full size (300x451 to 427x640):
         chelsea, coffee, rocket
Lands in data_shards/demo/ inside the package when writable, else ~/.cache/restormer/demo.

`python -m data_shards.demo --photos DIR` writes the held-out photos as PNGs for the tools to try:
DIR/clean/ and DIR/noisy/ (sigma 25, seeded per name, clipped and rounded to 8 bits as a camera
would store them).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.codec import encode_png, read_image, to_channels
from data_shards.dead_leaves import dead_leaves
from data_shards.degrade import NoiseConfig, add_noise, key_seed
from data_shards.index import INDEX_NAME
from data_shards.pack import PackConfig, pack
from data_shards.publish import build_once

DEMO_VERSION = "7"  # bump when the content or its index changes: old copies are then rebuilt


@dataclass(frozen=True)
class BundledImage:
    """An image file inside an installed package's data folder (part of its wheel: no download)."""

    package: str
    path: str  # relative to the package's folder

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def file(self) -> Path:
        import importlib

        return Path(importlib.import_module(self.package).__file__).parent / self.path


def _skimage(*names: str) -> tuple[BundledImage, ...]:
    return tuple(BundledImage("skimage", f"data/{name}") for name in names)


# Colour only: gray photos replicated to RGB (equal channels) taught the model to pull colours
# towards gray, a visible tint on the blue sky of the held-out rocket photo.
TRAIN_IMAGES = (
    *_skimage("astronaut.png", "color.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
              "motorcycle_right.png", "retina.jpg"),
    BundledImage("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
VAL_IMAGES = _skimage("chelsea.png", "coffee.png", "rocket.jpg")
# Full size, the retina photo alone gave 39% of the tiles and the mostly black Hubble field 18%:
# capped, each photo weighs about the same, and the downscale shrinks JPEG blocking and sensor
# noise away (the model learns to keep what it sees in its targets). Measured on CBSD68 and the
# held-out photos with the dead leaves below: benchmarks/demo_quality.py, docs/demo.md.
MAX_SIDE = 512
# Synthetic photos with natural statistics (occluding edges at every scale, flat regions): more
# varied content than 8 photos hold, made here rather than downloaded.
DEAD_LEAVES = 16
DEAD_LEAVES_SIZE = 256
# Thin bars (~1/5 of each image): trained on disks and photos only, the model lost to non-local
# means on the held-out rocket's launch towers (a lattice of 1-3 px lines).
DEAD_LEAVES_BARS = 0.015
# Half the leaves' colours are uniform over the RGB cube: saturated and clipped colours (McMaster's
# photos, the red saucer in coffee) are rare in these photos, and trained on their colours alone
# the model lost to non-local means on exactly those pixels.
RANDOM_COLOURS = 0.5
PALETTE_SIZE = 4096
TILE = 128
_STAMP = "DEMO_VERSION"


@dataclass(frozen=True)
class DemoData:
    root: Path
    train: Path
    val: Path


def ensure_demo_data(root: str | Path | None = None) -> DemoData:
    """Packs the demo shards unless a complete copy exists; safe when several processes race
    (data_shards.publish), and an outdated copy is rebuilt."""
    root = Path(root) if root is not None else default_root()
    build_once(root, _build, _complete)
    return DemoData(root, root / "train", root / "val")


def default_root() -> Path:
    package_dir = Path(__file__).resolve().parent
    if os.access(package_dir, os.W_OK):
        return package_dir / "demo"
    return Path.home() / ".cache" / "restormer" / "demo"


def demo_images() -> dict[str, dict[str, np.ndarray]]:
    """{'train': {name: uint8 (H, W, 3)}, 'val': {...}}: the packages' bundled photos (train ones
    capped at MAX_SIDE) and the seeded dead-leaves images. The same on every machine."""
    train = {image.name: _fit(_photo(image), MAX_SIDE) for image in TRAIN_IMAGES}
    rng = np.random.default_rng(0)
    pixels = np.concatenate([image.reshape(-1, 3) for image in train.values()])
    random_colours = round(PALETTE_SIZE * RANDOM_COLOURS)
    palette = np.concatenate([pixels[rng.integers(len(pixels), size=PALETTE_SIZE - random_colours)],
                              rng.integers(0, 256, (random_colours, 3), dtype=np.uint8)])
    for i in range(DEAD_LEAVES):
        train[f"dead_leaves_{i:02d}"] = dead_leaves(DEAD_LEAVES_SIZE, rng, palette, bar_fraction=DEAD_LEAVES_BARS)
    return {"train": train, "val": {image.name: _photo(image) for image in VAL_IMAGES}}


def _photo(image: BundledImage) -> np.ndarray:
    return to_channels(read_image(image.file()), "rgb")[0]


def _fit(image: np.ndarray, max_side: int) -> np.ndarray:
    from PIL import Image

    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _complete(root: Path) -> bool:
    stamp = root / _STAMP
    return (stamp.exists() and stamp.read_text(encoding="utf-8").strip() == DEMO_VERSION
            and (root / "train" / INDEX_NAME).exists() and (root / "val" / INDEX_NAME).exists())


def _build(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="restormer-demo-src-") as src:
        rows = ["target,split"]
        for split, images in demo_images().items():
            for name, image in images.items():
                path = Path(src) / split / f"{name}.npy"
                path.parent.mkdir(exist_ok=True)
                np.save(path, image, allow_pickle=False)
                rows.append(f"{split}/{name}.npy,{split}")
        manifest = Path(src) / "manifest.csv"
        manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
        pack(PackConfig(out=out, manifest=manifest, format="npy", color="rgb", tile=TILE, progress=False,
                        command="data_shards.demo.ensure_demo_data()"))
    (out / _STAMP).write_text(DEMO_VERSION + "\n", encoding="utf-8")


def write_held_out_photos(folder: str | Path, sigma: float = 25) -> dict[str, Path]:
    """The held-out photos as PNGs in folder/clean and, with Gaussian noise of `sigma`, folder/noisy."""
    folder = Path(folder)
    written = {}
    for kind in ("clean", "noisy"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        written[kind] = folder / kind
    noise = NoiseConfig(sigma=sigma, clip=True)
    for name, image in ((image.name, _photo(image)) for image in VAL_IMAGES):
        (folder / "clean" / f"{name}.png").write_bytes(encode_png(image))
        clean = image.astype(np.float32) / 255
        noisy = add_noise(clean, noise, np.random.default_rng(key_seed(name)))
        (folder / "noisy" / f"{name}.png").write_bytes(encode_png(np.round(noisy * 255).astype(np.uint8)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_shards.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", required=True, metavar="DIR",
                        help="write the held-out photos to DIR/clean and DIR/noisy (PNG)")
    parser.add_argument("--sigma", type=float, default=25, help="noise level in 0-255 units (default 25)")
    args = parser.parse_args(argv)
    for kind, path in write_held_out_photos(args.photos, args.sigma).items():
        print(f"{kind:6s} {path}/ ({', '.join(image.name for image in VAL_IMAGES)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
