"""The built-in `demo` data set: real photos that ship with scikit-image, packed on first use.

Task: Gaussian colour denoising at sigma 25 (noise is added online by the stream).
  train: 14 whole images cut into 128x128 npy tiles (stride 128, edge tiles flush with the border):
         colour: astronaut, ihc, motorcycle_left, motorcycle_right;
         gray, replicated to RGB: brick, camera, cell, clock_motion, coins, grass, gravel, moon, page, text
  val:   3 held-out colour photos (never in train), 192x192 centre crops kept whole: chelsea, coffee, rocket
Lands in data_shards/demo/ inside the package when writable, else ~/.cache/restormer/demo.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.codec import read_image, to_channels
from data_shards.index import INDEX_NAME
from data_shards.pack import PackConfig, pack

DEMO_VERSION = "2"  # bump when the content changes: old copies are then rebuilt
# File names in skimage/data/ (bundled with the wheel, no download).
TRAIN_FILES = ("astronaut.png", "ihc.png", "motorcycle_left.png", "motorcycle_right.png",
               "brick.png", "camera.png", "cell.png", "clock_motion.png", "coins.png", "grass.png",
               "gravel.png", "moon.png", "page.png", "text.png")
VAL_FILES = ("chelsea.png", "coffee.png", "rocket.jpg")
VAL_CROP = 192
TILE = 128
_STAMP = "DEMO_VERSION"


@dataclass(frozen=True)
class DemoData:
    root: Path
    train: Path
    val: Path


def ensure_demo_data(root: str | Path | None = None) -> DemoData:
    """Packs the demo shards unless a complete copy exists; safe when several processes race.

    Each process that finds no copy packs into its own temporary folder and renames it into place;
    the rename is atomic, so readers see either no copy or a whole one, and a loser drops its work.
    """
    root = Path(root) if root is not None else default_root()
    data = DemoData(root, root / "train", root / "val")
    if _complete(root):
        return data
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build(staging)
        try:
            os.rename(staging, root)
        except OSError:  # another process won the race, or an outdated copy is in the way
            if not _complete(root):
                stale = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(root, stale)
                    os.rename(staging, root)
                except OSError:
                    if not _complete(root):  # a third process may have just put a copy in place
                        raise
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data


def default_root() -> Path:
    package_dir = Path(__file__).resolve().parent
    if os.access(package_dir, os.W_OK):
        return package_dir / "demo"
    return Path.home() / ".cache" / "restormer" / "demo"


def demo_images() -> dict[str, dict[str, np.ndarray]]:
    """{'train': {name: uint8 (H, W, 3)}, 'val': {...}} from scikit-image's bundled files."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    train = {Path(name).stem: to_channels(read_image(folder / name), "rgb")[0] for name in TRAIN_FILES}
    val = {}
    for name in VAL_FILES:
        image = to_channels(read_image(folder / name), "rgb")[0]
        y, x = (image.shape[0] - VAL_CROP) // 2, (image.shape[1] - VAL_CROP) // 2
        val[Path(name).stem] = np.ascontiguousarray(image[y:y + VAL_CROP, x:x + VAL_CROP])
    return {"train": train, "val": val}


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
