"""How good is the demo's model? The demo recipe with several seeds, against classical denoisers.

    python benchmarks/demo_quality.py [--seeds 0 1 2] [--test-set NAME=DIR ...] [--test-images N] [--no-cbm3d] [key=value ...]

Each seed runs `accelerate launch train/main.py train.seed=S` (the demo recipe; extra dotted
overrides are passed on, e.g. `progressive.iters=[50,30,20]` for a quick look) in a fresh run
folder, and reports:
- wall time and CPU time of the whole run (launch, packing, training, validation, export);
- PSNR/SSIM of the exported model, restored as the run validates (whole, or in val.tile tiles), on
  the demo's held-out full-size photos, beside the noisy input and scikit-image's wavelet and
  non-local-means (best h) filters on the same noisy images;
- the same on each test set of clean photos at sigma 25 (official protocol: RGB, noise not
  clipped, seeded per image name, reflect-padded to a multiple of 8), with the classical filters
  scored here on the same noisy images. Default: CBSD68 and McMaster from ../shared/data/denoise
  when they exist (`--test-images N` scores the first N of each);
- CBM3D (the `bm3d` package, true sigma) on every set, the held-out photos included, with its
  seconds per image (`--no-cbm3d` skips it: it is the slowest part of the benchmark).
The noise is seeded by image name, so the classical filters score the same for every seed.
`--seeds` with no seed scores the classical filters alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from data_shards.demo import ensure_demo_data  # noqa: E402
from data_shards.stream import NoiseConfig, build_val_loader  # noqa: E402
from model.inference import restore_image  # noqa: E402
from tools.loading import load_model  # noqa: E402
from train.baselines import Baselines, Score, cbm3d_score, classical_baselines  # noqa: E402
from train.data import pack_val_folder  # noqa: E402
from train.metrics import psnr, ssim  # noqa: E402

SIGMA = 25
SHARED = ROOT.parent / "shared" / "data" / "denoise"
DEFAULT_TEST_SETS = (f"CBSD68={SHARED / 'CBSD68'}", f"McMaster={SHARED / 'McMaster'}")


@dataclass
class TestSet:
    name: str
    split: Path  # packed clean images
    max_images: int | None
    baselines: Baselines | None = None
    cbm3d: tuple[Score, float] | None = None  # scores, seconds per image

    def loader(self):
        return build_val_loader(self.split, noise=NoiseConfig(sigma=SIGMA), max_images=self.max_images)


def run_demo(seed: int, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "train/main.py", f"train.seed={seed}",
           f"output_dir={out}", "tracking.wandb=disabled", *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.mkdir(parents=True, exist_ok=True)
    (out / "console.txt").write_text(proc.stdout, encoding="utf-8")  # the run's own closing summary, for the record
    if proc.returncode:
        raise SystemExit(f"seed {seed}: the demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    val = [r for r in records if r.get("event") == "val"][-1]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    held_out = Score(val["val/psnr"], val["val/ssim"])
    val_cfg = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["val"]
    return {"wall": wall, "cpu": cpu, "steps": val["step"], "held-out": held_out,
            "tiling": (val_cfg["tile"], val_cfg["tile_overlap"])}


def score_model(net: torch.nn.Module, items, tiling: tuple[int | None, int]) -> Score:
    totals, count = [0.0, 0.0], 0
    for item in items:
        restored = restore_image(net, item["input"], *tiling)
        totals[0] += psnr(restored, item["target"]).item()
        totals[1] += ssim(restored, item["target"]).item()
        count += 1
    return Score(totals[0] / count, totals[1] / count)


def mean_spread(values: list[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {spread:.{digits}f}"


def test_sets(specs: list[str], max_images: int | None, cache: Path) -> list[TestSet]:
    found = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f"--test-set {spec!r}: expected NAME=DIR")
        if not Path(folder).is_dir():
            print(f"{name}: no folder at {folder}, not scored")
            continue
        found.append(TestSet(name, pack_val_folder(Path(folder), cache / name), max_images))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="demo runs (default 0 1 2); none: score the classical filters alone")
    parser.add_argument("--test-set", action="append", metavar="NAME=DIR",
                        help="a folder of clean test photos (repeatable; default: CBSD68 and McMaster from ../shared)")
    parser.add_argument("--test-images", type=int, default=None, help="score only the first N images of each test set")
    parser.add_argument("--no-cbm3d", action="store_true", help="skip CBM3D (tens of seconds per image)")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to train/main.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.no_cbm3d and importlib.util.find_spec("bm3d") is None:
        raise SystemExit("CBM3D needs the bm3d package: pip install -e '.[bench]', or pass --no-cbm3d")

    with tempfile.TemporaryDirectory(prefix="demo-quality-") as tmp:
        out = args.out or Path(tmp)
        held_out = TestSet("held-out", ensure_demo_data().val, None)
        sets = test_sets(args.test_set or list(DEFAULT_TEST_SETS), args.test_images, out / "test_shards")
        for test in [held_out, *sets]:
            test.baselines = classical_baselines(test.loader(), SIGMA)
            if not args.no_cbm3d:
                test.cbm3d = cbm3d_score(test.loader(), SIGMA)
                print(f"{test.name}: CBM3D {test.cbm3d[0].psnr:.2f} dB, SSIM {test.cbm3d[0].ssim:.4f}, "
                      f"{test.cbm3d[1]:.1f} s/image", flush=True)
        rows = []
        for seed in args.seeds:
            run = run_demo(seed, out / f"seed_{seed}", args.overrides)
            net = load_model(out / f"seed_{seed}").model
            for test in sets:
                run[test.name] = score_model(net, test.loader(), run["tiling"])
            rows.append(run)
            scores = "".join(f", {name} {run[name].psnr:.2f} dB" for name in ["held-out", *(t.name for t in sets)])
            print(f"seed {seed}: {run['steps']} steps, {run['wall']:.0f} s wall, {run['cpu']:.0f} s CPU{scores}",
                  flush=True)
    print_table(args.seeds, rows, [held_out, *sets])


def print_table(seeds: list[int], rows: list[dict], sets: list[TestSet]) -> None:
    columns = [(t.name, t.baselines) for t in sets]
    header = ["seed", "steps", "wall s", "CPU s"]
    for name, baselines in columns:
        header += [f"{name} ({baselines.images}) PSNR", "SSIM"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed, run in zip(seeds, rows):
        cells = [str(seed), str(run["steps"]), f"{run['wall']:.0f}", f"{run['cpu']:.0f}"]
        for name, _ in columns:
            cells += [f"{run[name].psnr:.2f}", f"{run[name].ssim:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        mean = ["mean +- sd", str(rows[0]["steps"]), mean_spread([r["wall"] for r in rows], 0),
                mean_spread([r["cpu"] for r in rows], 0)]
        for name, _ in columns:
            mean += [mean_spread([r[name].psnr for r in rows], 2), mean_spread([r[name].ssim for r in rows], 4)]
        lines.append("| " + " | ".join(mean) + " |")
    classical = [("noisy input", "noisy"), ("wavelet (BayesShrink)", "wavelet"), ("non-local means, best h", "nl_means")]
    for label, key in classical:
        cells = [label, "", "", ""]
        for _, baselines in columns:
            score = getattr(baselines, key)
            cells += [f"{score.psnr:.2f}", f"{score.ssim:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if all(t.cbm3d for t in sets):
        cells = ["CBM3D (bm3d package)", "", "", ""]
        for t in sets:
            cells += [f"{t.cbm3d[0].psnr:.2f}", f"{t.cbm3d[0].ssim:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
        print("CBM3D seconds per image: " + ", ".join(f"{t.name} {t.cbm3d[1]:.1f}" for t in sets))
    print("\n".join(lines))
    if not rows:
        return
    notes = []
    for name, baselines in columns:
        gap = statistics.mean(r[name].psnr for r in rows) - baselines.nl_means.psnr
        notes.append(f"{name} {gap:+.2f} dB (best h = {baselines.nl_means_h:g} sigma)")
    print("model - non-local means: " + "; ".join(notes))
    if all(t.cbm3d for t in sets):
        gaps = (f"{t.name} {statistics.mean(r[t.name].psnr for r in rows) - t.cbm3d[0].psnr:+.2f} dB" for t in sets)
        print("model - CBM3D: " + "; ".join(gaps))
    tile, overlap = rows[0]["tiling"]
    print("the model restores every image " + (f"in {tile}-px tiles overlapping by {overlap} px (val.tile)" if tile else "whole"))


if __name__ == "__main__":
    main()
