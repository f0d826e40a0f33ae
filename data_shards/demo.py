"""The built-in `demo` data set: real photos that ship inside installed packages, packed on first use.

Task: Gaussian colour denoising at sigma 25 (noise is added online by the stream).
  train: 8 whole colour images cut into 128x128 npy tiles (stride 128, edge tiles flush with the
         border): scikit-image: astronaut, color, hubble_deep_field, ihc, motorcycle_left,
         motorcycle_right, retina; matplotlib: grace_hopper
  val:   3 held-out colour photos (never in train), kept whole at full size (300x451 to 427x640):
         chelsea, coffee, rocket
Lands in data_shards/demo/ inside the package when writable, else ~/.cache/restormer/demo.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.codec import read_image, to_channels
from data_shards.index import INDEX_NAME
from data_shards.pack import PackConfig, pack
from data_shards.publish import build_once

DEMO_VERSION = "3"  # bump when the content changes: old copies are then rebuilt


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
    """{'train': {name: uint8 (H, W, 3)}, 'val': {...}} from the packages' bundled files."""
    return {split: {image.name: to_channels(read_image(image.file()), "rgb")[0] for image in images}
            for split, images in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES))}


def _complete(root: Path) -> bool:
    stamp = root / _STAMP
    return (stamp.exists() and stamp.read_text().strip() == DEMO_VERSION
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
        manifest.write_text("\n".join(rows) + "\n")
        pack(PackConfig(out=out, manifest=manifest, format="npy", color="rgb", tile=TILE, progress=False,
                        command="data_shards.demo.ensure_demo_data()"))
    (out / _STAMP).write_text(DEMO_VERSION + "\n")
