"""Reading and writing Restormer weights: official BasicSR .pth files, bare state dicts, safetensors."""
from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data_shards.atomic import atomic_write
from data_shards.remote.text import printable

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


class WeightsFileError(ValueError):
    """A weights file that cannot be read as one: damaged, truncated, hostile (a safetensors header
    whose lengths or offsets lie, a pickle that would run code) or not a weights file at all. The
    message is one line that names the file."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        super().__init__(f"{printable(str(path))} is not a readable weights file: {printable(reason)}")


def _first_line(error: BaseException) -> str:
    """A library's message, cut to its first line (the rest is advice for the library's own users)."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "empty or truncated"


def _shorten(items: list[str]) -> str:
    items = [printable(item) for item in items]  # names from a file may hold newlines or terminal escapes
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown if len(items) <= _LIST_LIMIT else f"{shown}, ... and {len(items) - _LIST_LIMIT} more"


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a weights file on CPU: the one reader of every weights file the tools and the
    trainer open, which may come from anyone.

    `.safetensors` files are read with safetensors, which checks the header (its length, UTF-8 JSON,
    dtypes, shapes and offsets inside the file, no overlaps) before reading any tensor; anything
    else (.pth/.pt/.ckpt) with torch.load(weights_only=True), which refuses pickles that would run
    code. Any file they refuse raises WeightsFileError (one line naming the file). With key=None the
    weights are taken from 'params', else 'params_ema', else 'state_dict', else the file is taken
    as a bare state dict. DDP 'module.' and torch.compile '_orig_mod.' prefixes are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            obj: object = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsFileError(path, f"torch.load(weights_only=True) refused to unpickle it ({_first_line(err)}). "
                                     "If you trust its origin, load it yourself and re-save its state dict with "
                                     "model.save_safetensors") from None
    except (SafetensorError, RuntimeError, EOFError, ValueError, OverflowError) as err:
        # What the parsers raise for a damaged or hostile file; their tracebacks say nothing more to a user.
        raise WeightsFileError(path, f"{type(err).__name__}: {_first_line(err)}; re-download or re-export it") from None
    if not isinstance(obj, Mapping):
        raise WeightsFileError(path, f"it holds a {type(obj).__name__}, not a dict of tensors")
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

    Shape mismatches always raise; missing/unexpected keys raise only when strict. The identity
    refinement block of an export (with_identity_refinement) is dropped for a network without one.
    Returns load_state_dict's (missing_keys, unexpected_keys) result.
    """
    if isinstance(path_or_state, Mapping):
        state, source = dict(path_or_state), "the given state dict"
    else:
        state, source = read_state_dict(path_or_state, key=key), str(path_or_state)
    expected = model.state_dict()
    if _is_identity_padding(state) and not _blocks(expected, "refinement"):
        state = {k: v for k, v in state.items() if not k.startswith("refinement.")}
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


def save_official_pth(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                      params_ema: nn.Module | Mapping[str, torch.Tensor] | None = None) -> None:
    """Save as BasicSR does: torch.save({'params': trained}), plus 'params_ema' for a run with EMA
    (KAIR/SwinIR-style fine-tuning reads that key)."""
    payload = {"params": _cpu_state(model_or_state)}
    if params_ema is not None:
        payload["params_ema"] = _cpu_state(params_ema)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def save_safetensors(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    state = _cpu_state(model_or_state)
    with atomic_write(path) as tmp:
        save_file(state, tmp)


_LEVELS = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")
# A transformer block whose two output projections are zero adds nothing to its input: x + 0 + 0.
_OUTPUT_PROJECTIONS = ("attn.project_out.", "ffn.project_out.")


def _blocks(state: Mapping[str, torch.Tensor], stage: str) -> int:
    """Transformer blocks of a stage (its highest block index + 1; 0 when it has none)."""
    indices = {int(k.split(".")[1]) for k in state if k.startswith(stage + ".") and k.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else 0


def _is_identity_padding(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the refinement stage is the single identity block with_identity_refinement writes."""
    prefixes = tuple(f"refinement.0.{p}" for p in _OUTPUT_PROJECTIONS)
    projections = [v for k, v in state.items() if k.startswith(prefixes)]
    return _blocks(state, "refinement") == 1 and len(projections) >= 2 and not any(v.any() for v in projections)


def with_identity_refinement(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`, plus one identity refinement block when it has none.

    Restoration apps that load Restormer through spandrel (chaiNNer and others) detect it by a
    `refinement.0` block, so a network without refinement blocks is written as one with a single
    block that computes exactly the same function: a copy of decoder_level1's last block (same
    shapes: 2 x dim channels, heads[0]) whose attention and GDFN output projections are zero.
    Copying real weights rather than zeroing them all keeps q and k non-zero: zero ones give NaN in
    fp16, where their L2 normalisation divides by a norm of 0. infer_arch counts no refinement block
    then, and load_weights drops it for a network without one."""
    if _blocks(state, "refinement"):
        return dict(state)
    source = f"decoder_level1.{_blocks(state, 'decoder_level1') - 1}."
    block = {}
    for key, value in state.items():
        if key.startswith(source):
            rest = key[len(source):]
            zero = rest.startswith(_OUTPUT_PROJECTIONS)
            block[f"refinement.0.{rest}"] = torch.zeros_like(value) if zero else value.clone()
    last = ("skip_conv.", "output.")  # what follows the refinement stage in the network's own order
    return {**{k: v for k, v in state.items() if not k.startswith(last)}, **block,
            **{k: v for k, v in state.items() if k.startswith(last)}}


def infer_arch(state: Mapping[str, torch.Tensor]) -> dict:
    """Restormer's constructor arguments, read off the shapes of a state dict (official keys).

    Every shape field is visible in the weights: channels in/out and dim from the first and last
    convolutions, blocks per level from the block indices, heads from each level's attention
    temperature, the GDFN width from its projection, bias and LayerNorm type from which
    parameters exist, the dual-pixel task from its extra skip convolution. So an exported or official
    file needs no preset or config file beside it. A single identity refinement block (written for
    apps, see with_identity_refinement) counts as none. Raises ValueError for a state dict that is not a
    Restormer's.
    """
    try:
        embed = state["patch_embed.proj.weight"]
        output = state["output.weight"]
    except KeyError as err:
        raise ValueError(f"not Restormer weights: no {err.args[0]!r} entry") from err

    num_blocks = [_blocks(state, stage) for stage in _LEVELS]
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
        "num_refinement_blocks": 0 if _is_identity_padding(state) else _blocks(state, "refinement"),
        "heads": heads,
        "ffn_expansion_factor": _expansion_factor(hidden, [dim * 2**level for level in range(4)]),
        "bias": f"{first}.attn.qkv.bias" in state,
        "LayerNorm_type": "WithBias" if f"{first}.norm1.body.bias" in state else "BiasFree",
        "dual_pixel_task": "skip_conv.weight" in state,
    }


def gdfn_widths_problem(dim: int, hidden: list[int]) -> str | None:
    """Why apps would build other GDFN widths than `hidden` (per level) from the weights, or None.

    spandrel (chaiNNer's loader) reads one expansion factor off level 1: 2.66 (the official factor)
    when level 1's width is int(dim * 2.66), else width / dim; then builds int(channels * factor) at
    every level. infer_arch reads every level's width and needs no such rule."""
    factor = 2.66 if hidden[0] == int(dim * 2.66) else hidden[0] / dim
    read = [int(dim * 2**level * factor) for level in range(len(hidden))]
    if read == hidden:
        return None
    return (f"its GDFN widths {hidden} (dim {dim}) do not follow from level 1's: apps that load Restormer through "
            f"spandrel (chaiNNer) read the expansion factor as {factor:g} and would build {read}. Choose "
            "ffn_expansion_factor with dim x factor a whole number, or 2.66")


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
