"""Reading and writing Restormer weights: official BasicSR .pth files, bare state dicts, safetensors."""
from __future__ import annotations

import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

# Official BasicSR checkpoints nest the weights under one of these keys; official test scripts
# read 'params', so it wins when a file holds both.
_NESTING_KEYS = ("params", "params_ema", "state_dict")
# Wrappers that prefix every key: DDP ('module.') and torch.compile ('_orig_mod.').
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LIST_LIMIT = 8


class WeightsMismatchError(ValueError):
    """State dict keys or shapes that do not fit the model; lists every offending key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]):
        self.source, self.missing, self.unexpected, self.mismatched = source, missing, unexpected, mismatched
        parts = [f"weights from {source} do not fit the model:"]
        if missing:
            parts.append(f"  {len(missing)} missing: {_shorten(missing)}")
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected: {_shorten(unexpected)}")
        if mismatched:
            shapes = [f"{k} (file {tuple(f)}, model {tuple(m)})" for k, f, m in mismatched]
            parts.append(f"  {len(mismatched)} with other shapes: {_shorten(shapes)}")
        parts.append("  Check that the preset matches the checkpoint (e.g. BiasFree LayerNorm for denoising, "
                     "6 input channels for dual-pixel defocus) and that dim/num_blocks/heads agree.")
        super().__init__("\n".join(parts))


def _shorten(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown if len(items) <= _LIST_LIMIT else f"{shown}, ... and {len(items) - _LIST_LIMIT} more"


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a weights file on CPU.

    `.safetensors` files are read with safetensors; anything else (.pth/.pt/.ckpt) with
    torch.load(weights_only=True), which refuses pickles that would run code. With key=None the
    weights are taken from 'params', else 'params_ema', else 'state_dict', else the file is taken
    as a bare state dict. DDP 'module.' and torch.compile '_orig_mod.' prefixes are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        obj: object = load_file(path, device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path} is not a plain weights file: torch.load(weights_only=True) refused "
                             f"to unpickle it ({str(err).splitlines()[0]}). If you trust its origin, load it "
                             "yourself and re-save its state dict with model.save_safetensors.") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    if key is not None:
        if key not in obj:
            raise KeyError(f"{path} has no entry {key!r}; top-level keys: {_shorten(sorted(map(str, obj)))}")
        obj = obj[key]
    else:
        obj = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), obj)
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {_shorten(bad)} (pass key= to pick the "
                         f"nested state dict)")
    for prefix in _WRAPPER_PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def load_weights(model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, torch.Tensor],
                 strict: bool = True, key: str | None = None):
    """Load weights into `model`, raising one WeightsMismatchError that names every bad key.

    Shape mismatches always raise; missing/unexpected keys raise only when strict.
    Returns load_state_dict's (missing_keys, unexpected_keys) result.
    """
    if isinstance(path_or_state, Mapping):
        state, source = dict(path_or_state), "the given state dict"
    else:
        state, source = read_state_dict(path_or_state, key=key), str(path_or_state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape))
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        raise WeightsMismatchError(source, missing, unexpected, mismatched)
    return model.load_state_dict(state, strict=strict)


def _cpu_state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_official_pth(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                      params_ema: nn.Module | Mapping[str, torch.Tensor] | None = None) -> None:
    """Save as BasicSR does: torch.save({'params': trained}), plus 'params_ema' for a run with EMA
    (KAIR/SwinIR-style fine-tuning reads that key)."""
    payload = {"params": _cpu_state(model_or_state)}
    if params_ema is not None:
        payload["params_ema"] = _cpu_state(params_ema)
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))


def save_safetensors(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    state = _cpu_state(model_or_state)
    _atomic_write(path, lambda tmp: save_file(state, tmp))


_LEVELS = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")


def infer_arch(state: Mapping[str, torch.Tensor]) -> dict:
    """Restormer's constructor arguments, read off the shapes of a state dict (official keys).

    Every shape field is visible in the weights: channels in/out and dim from the first and last
    convolutions, blocks per level from the block indices, heads from each level's attention
    temperature, the GDFN width from its projection, bias and LayerNorm type from which
    parameters exist, the dual-pixel task from its extra skip convolution. So an exported or official
    file needs no preset or config file beside it. Raises ValueError for a state dict that is not a
    Restormer's.
    """
    try:
        embed = state["patch_embed.proj.weight"]
        output = state["output.weight"]
    except KeyError as err:
        raise ValueError(f"not Restormer weights: no {err.args[0]!r} entry") from err

    def blocks(stage: str) -> int:
        indices = {int(k.split(".")[1]) for k in state if k.startswith(stage + ".") and k.split(".")[1].isdigit()}
        return max(indices) + 1 if indices else 0

    num_blocks = [blocks(stage) for stage in _LEVELS]
    if 0 in num_blocks:
        raise ValueError(f"not Restormer weights: no transformer blocks at {_LEVELS[num_blocks.index(0)]}")
    dim = int(embed.shape[0])
    heads = [int(state[f"{stage}.0.attn.temperature"].shape[0]) for stage in _LEVELS]
    hidden = [int(state[f"{stage}.0.ffn.project_out.weight"].shape[1]) for stage in _LEVELS]
    first = "encoder_level1.0"
    return {
        "inp_channels": int(embed.shape[1]),
        "out_channels": int(output.shape[0]),
        "dim": dim,
        "num_blocks": num_blocks,
        "num_refinement_blocks": blocks("refinement"),
        "heads": heads,
        "ffn_expansion_factor": _expansion_factor(hidden, [dim * 2**level for level in range(4)]),
        "bias": f"{first}.attn.qkv.bias" in state,
        "LayerNorm_type": "WithBias" if f"{first}.norm1.body.bias" in state else "BiasFree",
        "dual_pixel_task": "skip_conv.weight" in state,
    }


def _expansion_factor(hidden: list[int], widths: list[int]) -> float:
    """The shortest decimal f with int(width * f) == hidden at every level (2.66 for 127/48, 255/96, ...).

    Each level confines f to [hidden / width, (hidden + 1) / width); the official configs' factors are
    short decimals inside the intersection."""
    low = max(h / w for h, w in zip(hidden, widths))
    high = min((h + 1) / w for h, w in zip(hidden, widths))
    for digits in range(7):
        candidate = math.ceil(low * 10**digits) / 10**digits
        if candidate < high and all(int(w * candidate) == h for h, w in zip(hidden, widths)):
            return candidate
    raise ValueError(f"GDFN widths {hidden} at channel widths {widths} fit no single expansion factor")
