"""Export weights for deployment: safetensors, the official `{'params': ...}` .pth, and ONNX.

The weight files and config.yaml are written by the trainer's own export writer (train/exporting.py):
when the source holds EMA weights too (a checkpoint with ema.safetensors, a run's export/, an official
.pth with 'params_ema'), model.safetensors is the EMA and model_official.pth keeps both keys. Both load
in chaiNNer and the other apps that read Restormer through spandrel (docs/export.md).

    python -m tools.export -w runs/demo -o exported/
    python -m tools.export -w deraining.pth -o exported/ --formats onnx

The ONNX graph takes any (1, C, H, W) float32 image in [0, 1]: it pads to a multiple of 8 by
reflection and crops back, as `python -m tools.restore` does (no tiling, no self-ensemble). The export
is checked with onnxruntime (a test extra: pip install 'restormer-train[test]') on a random input.
A config.yaml with the model section is written beside the weights, so the exported folder can be
given to restore/evaluate as is.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model import PaddedModel, WeightsFileError, WeightsMismatchError, read_state_dict
from tools.loading import LoadedModel, ModelLoadError, add_model_args, model_from_args
from train import checkpoint as ckpt
from train.exporting import OFFICIAL_FILE, SAFETENSORS_FILE, WEIGHT_FORMATS, Weights, write_export

FORMATS = (*WEIGHT_FORMATS, "onnx")
ONNX_FILE = "model.onnx"


class ONNXExportError(RuntimeError):
    pass


def export_onnx(model: torch.nn.Module, path: str | Path, channels: int, height: int = 64, width: int = 64,
                opset: int = 17, dynamic: bool = True) -> Path:
    """Traces `model` (on a CPU fp32 copy) on a (1, channels, height, width) image; dynamic: H and W stay
    free in the graph."""
    if importlib.util.find_spec("onnx") is None:  # not a dependency: torch's exporter needs it to write the graph
        raise ONNXExportError("ONNX export needs the onnx package: pip install onnx onnxruntime (or pass "
                              "--formats safetensors pth)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = PaddedModel.cpu_copy(model)
    example = torch.rand(1, channels, height, width)
    axes = {"input": {2: "height", 3: "width"}, "output": {2: "height", 3: "width"}} if dynamic else None
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo=True, which needs onnxscript.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(net, (example,), str(path), input_names=["input"], output_names=["output"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    except Exception as err:  # the exporter raises many types; name the shape mode that failed
        hint = "; retry with --static (fixed input size)" if dynamic else ""
        raise ONNXExportError(f"ONNX export {'with free height/width ' if dynamic else ''}failed: "
                              f"{type(err).__name__}: {str(err).splitlines()[0]}{hint}") from err
    return path


def check_onnx(model: torch.nn.Module, path: str | Path, channels: int, height: int, width: int,
               seed: int = 0) -> float:
    """Max |onnxruntime - torch| on one random (1, channels, height, width) input."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ONNXExportError("checking the ONNX file needs onnxruntime: pip install onnxruntime "
                              "(or pass --no-check)") from err
    net = PaddedModel.cpu_copy(model)
    x = torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = net(x).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    if got.shape != expected.shape:
        raise ONNXExportError(f"{path}: output shape {got.shape} != torch's {expected.shape}")
    return float(np.abs(got - expected).max())


def export(loaded: LoadedModel, out_dir: str | Path, formats: list[str]) -> dict[str, Path]:
    """Writes the weight formats asked for plus config.yaml (train/exporting.py); ONNX is left to export_onnx."""
    kept = tuple(f for f in formats if f in WEIGHT_FORMATS)
    return write_export(out_dir, replace(trained_and_ema(loaded), formats=kept))


def trained_and_ema(loaded: LoadedModel) -> Weights:
    """The loaded weights, with their partner when they are one half of a trained/EMA pair: a checkpoint's
    ema.safetensors beside its model.safetensors, an export folder or official .pth holding 'params_ema'."""
    state = loaded.model.state_dict()
    path = loaded.weights
    if path.name == ckpt.EMA_FILE and (path.parent / ckpt.MODEL_FILE).is_file():
        return Weights(read_state_dict(path.parent / ckpt.MODEL_FILE), loaded.arch, state)
    pair = path if path.suffix == ".pth" else path.with_name(OFFICIAL_FILE)
    if pair.is_file() and (pair == path or path.name == SAFETENSORS_FILE):
        try:
            ema = read_state_dict(pair, key="params_ema")
            params = read_state_dict(pair, key="params")
        except WeightsFileError:  # a damaged partner is the user's to know about (main says so)
            raise
        except (KeyError, ValueError):  # no 'params_ema' in it: the weights stand alone
            return Weights(state, loaded.arch)
        return Weights(params, loaded.arch, ema)
    return Weights(state, loaded.arch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the exported files")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                        help="what to write (default: all): model.safetensors, model_official.pth, model.onnx")
    onnx = parser.add_argument_group("onnx")
    onnx.add_argument("--onnx-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                      help="size of the example input traced (and checked) (default 64 64)")
    onnx.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset (default 17)")
    onnx.add_argument("--static", action="store_true",
                      help="fix the graph's input size to --onnx-size instead of leaving H and W free")
    onnx.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    onnx.add_argument("--atol", type=float, default=1e-4, metavar="X",
                      help="largest |onnxruntime - torch| accepted by the check (default 1e-4)")
    add_model_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded = model_from_args(args)
    except (ModelLoadError, WeightsMismatchError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model: {loaded.describe()}", file=sys.stderr)
    try:
        written = export(loaded, args.output, args.formats)
    except WeightsFileError as err:  # the other half of a trained/EMA pair
        print(f"error: {err}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind:12s} {path}")
    if "onnx" not in args.formats:
        return 0
    height, width = args.onnx_size
    try:
        path = export_onnx(loaded.model, Path(args.output) / ONNX_FILE, loaded.in_channels, height, width, args.opset,
                           dynamic=not args.static)
        print(f"{'onnx':12s} {path} (input {'1 x C x H x W, any H, W' if not args.static else f'1 x C x {height} x {width}'})")
        if args.no_check:
            return 0
        # Checked at a size other than the traced one, when free, to prove the shapes really are.
        check_hw = (height + 8, width + 5) if not args.static else (height, width)
        diff = check_onnx(loaded.model, path, loaded.in_channels, *check_hw)
    except ONNXExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    verdict = "ok" if diff <= args.atol else f"FAILED (> {args.atol:g})"
    print(f"onnxruntime check on 1x{loaded.in_channels}x{check_hw[0]}x{check_hw[1]}: max |diff| = {diff:.2e} {verdict}")
    return 0 if diff <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
