"""How good is the demo's model? The demo recipe with several seeds, against classical denoisers.

    python benchmarks/demo_quality.py [--seeds 0 1 2] [--cbsd68 DIR] [key=value ...]

Each seed runs `accelerate launch train/main.py train.seed=S` (the demo recipe; extra dotted
overrides are passed on, e.g. `progressive.iters=[50,30,20]` for a quick look) in a fresh run
folder, and reports:
- wall time and CPU time of the whole run (launch, packing, training, validation, export);
- PSNR/SSIM of the exported model on the demo's held-out full-size photos, beside the noisy input
  and scikit-image's wavelet and non-local-means (best h) filters on the same noisy images (from
  the run's own summary, `baselines.json`);
- the same on CBSD68 at sigma 25 (official protocol: RGB, noise not clipped, seeded per image
  name, reflect-padded to a multiple of 8), when the folder exists (default ../shared/data/denoise/CBSD68;
  `--cbsd68-images N` scores the first N only).
The noise is seeded by image name, so the classical filters score the same for every seed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data_shards.stream import NoiseConfig, build_val_loader  # noqa: E402
from model.inference import restore_image  # noqa: E402
from tools.loading import load_model  # noqa: E402
from train.baselines import classical_baselines  # noqa: E402
from train.data import pack_val_folder  # noqa: E402
from train.metrics import psnr, ssim  # noqa: E402

SIGMA = 25
DEFAULT_CBSD68 = ROOT.parent / "shared" / "data" / "denoise" / "CBSD68"


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
    (out / "console.txt").write_text(proc.stdout)  # the run's own closing summary, for the record
    if proc.returncode:
        raise SystemExit(f"seed {seed}: the demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("event") == "val"][-1]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "steps": val["step"], "val": val,
            "baselines": json.loads((out / "baselines.json").read_text())}


def score_model(net: torch.nn.Module, items) -> tuple[float, float]:
    totals, count = [0.0, 0.0], 0
    for item in items:
        restored = restore_image(net, item["input"])
        totals[0] += psnr(restored, item["target"]).item()
        totals[1] += ssim(restored, item["target"]).item()
        count += 1
    return totals[0] / count, totals[1] / count


def mean_spread(values: list[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cbsd68", type=Path, default=DEFAULT_CBSD68, help="clean CBSD68 images (skipped when absent)")
    parser.add_argument("--cbsd68-images", type=int, default=None, help="score only the first N CBSD68 images")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to train/main.py")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="demo-quality-") as tmp:
        out = args.out or Path(tmp)
        cbsd = None
        if args.cbsd68.is_dir():
            split = pack_val_folder(args.cbsd68, out / "cbsd68_shards")
            cbsd = {"loader": lambda: build_val_loader(split, noise=NoiseConfig(sigma=SIGMA), max_images=args.cbsd68_images)}
            cbsd["baselines"] = classical_baselines(cbsd["loader"](), SIGMA)
        else:
            print(f"CBSD68 not found at {args.cbsd68}: scoring the demo's own held-out photos only")
        rows = []
        for seed in args.seeds:
            run = run_demo(seed, out / f"seed_{seed}", args.overrides)
            if cbsd is not None:
                run["cbsd68"] = score_model(load_model(out / f"seed_{seed}").model, cbsd["loader"]())
            rows.append(run)
            cbsd_note = f", CBSD68 {run['cbsd68'][0]:.2f} dB" if cbsd is not None else ""
            print(f"seed {seed}: {run['steps']} steps, {run['wall']:.0f} s wall, {run['cpu']:.0f} s CPU, held-out "
                  f"{run['val']['val/psnr']:.2f} dB / {run['val']['val/ssim']:.4f}{cbsd_note}", flush=True)
    print_table(args.seeds, rows, cbsd)


def print_table(seeds: list[int], rows: list[dict], cbsd: dict | None) -> None:
    b = rows[0]["baselines"]
    header = ["seed", "steps", "wall s", "CPU s", f"held-out {b['images']} PSNR", "SSIM"]
    if cbsd is not None:
        header += [f"CBSD68 ({cbsd['baselines'].images}) PSNR", "SSIM"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(run: dict) -> list[str]:
        c = [str(run["steps"]), f"{run['wall']:.0f}", f"{run['cpu']:.0f}", f"{run['val']['val/psnr']:.2f}",
             f"{run['val']['val/ssim']:.4f}"]
        if cbsd is not None:
            c += [f"{run['cbsd68'][0]:.2f}", f"{run['cbsd68'][1]:.4f}"]
        return c

    for seed, run in zip(seeds, rows):
        lines.append("| " + " | ".join([str(seed), *cells(run)]) + " |")
    mean = ["mean +- sd", str(rows[0]["steps"]), mean_spread([r["wall"] for r in rows], 0),
            mean_spread([r["cpu"] for r in rows], 0), mean_spread([r["val"]["val/psnr"] for r in rows], 2),
            mean_spread([r["val"]["val/ssim"] for r in rows], 4)]
    if cbsd is not None:
        mean += [mean_spread([r["cbsd68"][0] for r in rows], 2), mean_spread([r["cbsd68"][1] for r in rows], 4)]
    lines.append("| " + " | ".join(mean) + " |")
    h = b["nl_means_h_over_sigma"]
    classical = [("noisy input", "noisy"), ("wavelet (BayesShrink)", "wavelet"), ("non-local means, best h", "nl_means")]
    for name, key in classical:
        row = [name, "", "", "", f"{b[key + '/psnr']:.2f}", f"{b[key + '/ssim']:.4f}"]
        if cbsd is not None:
            cb = getattr(cbsd["baselines"], key)
            row += [f"{cb.psnr:.2f}", f"{cb.ssim:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))
    notes = [f"best h = {h:g} sigma on the held-out photos"]
    if cbsd is not None:
        notes.append(f"{cbsd['baselines'].nl_means_h:g} sigma on CBSD68")
        gap = statistics.mean(r["cbsd68"][0] for r in rows) - cbsd["baselines"].nl_means.psnr
        notes.append(f"model - non-local means on CBSD68: {gap:+.2f} dB")
    gap = statistics.mean(r["val"]["val/psnr"] for r in rows) - b["nl_means/psnr"]
    notes.append(f"on the held-out photos: {gap:+.2f} dB")
    print("; ".join(notes))


if __name__ == "__main__":
    main()
