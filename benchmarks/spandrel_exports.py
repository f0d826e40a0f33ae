"""Do our exports load in spandrel, the model loader of chaiNNer and other restoration apps, and
compute our outputs? Prints a table; exits 1 when any file fails.

    python benchmarks/spandrel_exports.py --spandrel-python /path/to/venv/bin/python \
        [--presets] [EXPORT ...]

EXPORT: an export folder (runs/demo/export) or a run folder (its export/ is used); both weight files
of it (model.safetensors, model_official.pth) are checked. --presets adds every preset at its full
size without refinement blocks (num_refinement_blocks=0), random weights, exported by
train/exporting.py as a run's export/ is.

Our side runs here: each file is loaded as the tools load it (tools.loading.load_model: the
architecture read off the weights) and restores a random 1 x C x 24 x 32 image. spandrel's side runs
in its own venv, which --spandrel-python names (spandrel needs torchvision, which this project does
not install; `pip install torch torchvision spandrel spandrel_extra_arches` there): spandrel's
ModelLoader loads the same file, its network restores the same image, and the largest absolute
difference is printed. docs/export.md shows a run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEIGHT_FILES = ("model.safetensors", "model_official.pth")
TOLERANCE = 1e-4  # the same math in another order (see model/restormer.py): float rounding only


def export_presets(out: Path) -> list[Path]:
    """Every preset without refinement blocks, random weights, written by the trainer's export writer."""
    import torch

    from model import PRESETS, build_model
    from train.exporting import Weights, write_export

    folders = []
    for preset in PRESETS:
        torch.manual_seed(0)
        net = build_model(preset, num_refinement_blocks=0)
        write_export(out / preset, Weights(net.state_dict(), {"preset": preset, "num_refinement_blocks": 0}))
        folders.append(out / preset)
    return folders


def weight_files(paths: list[Path]) -> list[Path]:
    """The weight files of export or run folders; an export of a network of one's own (model.arch in
    its config.yaml) is skipped, saying so: spandrel builds Restormer, not it."""
    from train.safe_yaml import read_yaml

    files = []
    for path in paths:
        folder = path / "export" if (path / "export").is_dir() else path
        config = read_yaml(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}
        model = config.get("model") if isinstance(config, dict) else None
        arch = model.get("arch") if isinstance(model, dict) else None
        if arch is not None:
            print(f"skipped {folder}: spandrel loads Restormer, and this is a network of its own ({arch})",
                  file=sys.stderr)
            continue
        found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
        if not found:
            raise SystemExit(f"error: {path}: no {' or '.join(WEIGHT_FILES)} in it (give an export or run folder)")
        files += found
    return files


def our_outputs(files: list[Path], io_dir: Path) -> list[dict]:
    """Each file loaded by our tools, run on a seeded random image; the image and output saved for spandrel."""
    import torch
    from safetensors.torch import save_file

    from tools.loading import load_model

    cases = []
    for i, path in enumerate(files):
        loaded = load_model(path)
        x = torch.rand(1, loaded.in_channels, 24, 32, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            y = loaded.model(x)
        io = io_dir / f"{i}.safetensors"
        save_file({"input": x, "output": y.contiguous()}, io)
        arch = loaded.arch
        cases.append({"file": str(path), "io": str(io), "ours": f"{arch['preset']}, dim {arch['dim']}, blocks "
                      f"{arch['num_blocks']}, refinement {arch['num_refinement_blocks']}"})
    return cases


def spandrel_side(cases: list[dict]) -> None:
    """Runs in spandrel's venv: loads every file with spandrel, compares its network's output with ours."""
    import torch
    from safetensors.torch import load_file
    import spandrel
    import spandrel_extra_arches  # Restormer is one of its (non-commercial) architectures

    spandrel_extra_arches.install(ignore_duplicates=True)
    for case in cases:
        io = load_file(case["io"])
        try:
            descriptor = spandrel.ModelLoader().load_from_file(case["file"])
        except Exception as err:  # spandrel's refusal (UnsupportedModelError, shape errors) is the result
            case.update(spandrel=f"{type(err).__name__}: {str(err).splitlines()[0][:80]}", diff=None)
            continue
        net = descriptor.model.eval()
        with torch.no_grad():
            theirs = net(io["input"])
        case.update(spandrel=f"{descriptor.architecture.name}, refinement {len(net.refinement)}",
                    diff=float((theirs - io["output"]).abs().max()))
    print(json.dumps(cases))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="*", type=Path, metavar="EXPORT", help="export or run folders")
    parser.add_argument("--presets", action="store_true", help="also every preset without refinement blocks")
    parser.add_argument("--spandrel-python", metavar="PYTHON", help="the Python of a venv with spandrel")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spandrel_side(json.loads(args.worker.read_text(encoding="utf-8")))
        return 0
    if not args.spandrel_python or not (args.exports or args.presets):
        parser.error("give --spandrel-python and export folders and/or --presets")
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="spandrel-") as tmp:
        tmp = Path(tmp)
        folders = list(args.exports) + (export_presets(tmp / "presets") if args.presets else [])
        (tmp / "io").mkdir()
        cases = our_outputs(weight_files(folders), tmp / "io")
        (tmp / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
        proc = subprocess.run([args.spandrel_python, __file__, "--worker", str(tmp / "cases.json")],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: spandrel's side failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 2
        results = json.loads(proc.stdout.splitlines()[-1])
    failed = 0
    print("| file | read back by our tools | spandrel built | max abs diff | verdict |\n|---|---|---|---|---|")
    for case in results:
        ok = case["diff"] is not None and case["diff"] <= TOLERANCE
        failed += not ok
        name = str(Path(case["file"]).relative_to(tmp)) if case["file"].startswith(str(tmp)) else case["file"]
        diff = "" if case["diff"] is None else f"{case['diff']:.1e}"
        print(f"| {name} | {case['ours']} | {case['spandrel']} | {diff} | {'ok' if ok else 'FAILED'} |")
    print(f"\n{len(results)} files, {len(results) - failed} load in spandrel with our outputs (max abs diff <= "
          f"{TOLERANCE:g}), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
