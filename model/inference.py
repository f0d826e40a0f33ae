"""Network-level inference: padding to the network's stride, overlapping tiles, the 8-view
self-ensemble, autocast precisions, and a padded copy of the network for tracing (ONNX)."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_shards.geometry import dihedral, tile_positions, undo_dihedral

from .presets import SIZE_MULTIPLE

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_SPATIAL = (-2, -1)


def tiling_problem(tile: int, overlap: int) -> str | None:
    """What is wrong with restoring in tile x tile crops that overlap by `overlap` pixels, or None."""
    if tile <= 0 or tile % SIZE_MULTIPLE:
        return f"the tile ({tile}) must be a positive multiple of {SIZE_MULTIPLE}"
    if overlap % SIZE_MULTIPLE or not 0 <= overlap < tile:
        return f"the overlap ({overlap}) must be a multiple of {SIZE_MULTIPLE}, >= 0 and smaller than the tile ({tile})"
    return None


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad B,C,H,W on the bottom/right to multiples of `multiple`; returns (padded, (H, W)).

    Images too small to reflect (side < padding + 1) are padded by replication instead.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (h, w)


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool, like: torch.Tensor) -> torch.Tensor:
    """1-D blending weight of a tile side. At a seam the outer quarter of the overlap gets weight 0
    (those pixels saw the tile's zero padding), the next half ramps linearly up to 1. Image borders
    keep weight 1. Neighbouring tiles overlap by >= `overlap`, so every pixel keeps a positive total."""
    weight = torch.ones(length, dtype=like.dtype, device=like.device)
    cut, ramp_len = overlap // 4, overlap // 2
    if ramp_len == 0:
        return weight
    ramp = torch.arange(1, ramp_len + 1, dtype=like.dtype, device=like.device) / (ramp_len + 1)
    if not at_start:
        weight[:cut] = 0
        weight[cut:cut + ramp_len] = ramp
    if not at_end:
        weight[length - cut:] = 0
        weight[length - cut - ramp_len:length - cut] = ramp.flip(0)
    return weight


@torch.no_grad()
def restore_image(model: nn.Module, x: torch.Tensor, tile: int | None = None, overlap: int = 32) -> torch.Tensor:
    """Run `model` on B,C,H,W images in [0, 1] of any size; returns B,C_out,H,W, not clamped.

    tile=None runs the whole (padded) image at once. Otherwise the image is cut into tile x tile
    crops overlapping by at least `overlap` pixels and the results are blended (see `_ramp`).
    MDTA attends over the whole crop, so tiled output is close to, not equal to, the untiled one.
    """
    padded, (h, w) = pad_to_multiple(x)
    H, W = padded.shape[-2:]
    if tile is None or (tile >= H and tile >= W):
        return model(padded)[..., :h, :w]
    problem = tiling_problem(tile, overlap)
    if problem:
        raise ValueError(f"tiled restoring: {problem}")
    th, tw = min(tile, H), min(tile, W)
    out = weight_sum = None
    for top in tile_positions(H, th, tile - overlap):
        wy = _ramp(th, overlap, top == 0, top + th == H, padded)
        for left in tile_positions(W, tw, tile - overlap):
            wx = _ramp(tw, overlap, left == 0, left + tw == W, padded)
            pred = model(padded[..., top:top + th, left:left + tw])
            if out is None:
                out = pred.new_zeros(pred.shape[:2] + (H, W))
                weight_sum = pred.new_zeros(H, W)
            weight = (wy[:, None] * wx[None, :]).to(pred.dtype)
            out[..., top:top + th, left:left + tw] += pred * weight
            weight_sum[top:top + th, left:left + tw] += weight
    return (out / weight_sum)[..., :h, :w]


@torch.no_grad()
def restore(model: nn.Module, x: torch.Tensor, tile: int | None = None, overlap: int = 32,
            precision: str = "fp32", self_ensemble: bool = False) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> restored float32 on the model's device, not clamped.

    precision: autocast dtype name (PRECISIONS). self_ensemble: average the outputs for the 8
    flips/rotations of the input (each undone first); 8x the compute for typically +0.05-0.1 dB.
    """
    device = next(model.parameters()).device
    x = x.to(device)
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    views = range(8) if self_ensemble else range(1)
    total = None
    for k in views:
        with autocast:
            out = restore_image(model, dihedral(x, k, _SPATIAL), tile=tile, overlap=overlap)
        out = undo_dihedral(out.float(), k, _SPATIAL)
        total = out if total is None else total + out
    return total / len(views)


class PaddedModel(nn.Module):
    """The network plus reflect padding to a multiple of 8 and the crop back: takes any H and W.

    Unlike pad_to_multiple it always pads (by 0 rows when nothing is missing): a Python branch on
    the size would be frozen into a traced graph at the example's size.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def cpu_copy(cls, model: nn.Module) -> "PaddedModel":
        """A float32 CPU copy in eval mode, leaving `model` (maybe on a GPU, maybe bf16) untouched."""
        return cls(copy.deepcopy(model).float().cpu().eval())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % SIZE_MULTIPLE, -width % SIZE_MULTIPLE
        out = self.model(F.pad(x, (0, pad_w, 0, pad_h), mode="reflect"))
        return out[..., :height, :width]
