"""Named configurations of every task in the official Restormer release (Options/*.yml there), and the
facts about the network's shape that configs, data and tools rely on."""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from .restormer import Restormer
from .weights import gdfn_widths_problem

# Three 2x downsamplings: image sides (and so patches and tiles) must be multiples of 8.
SIZE_MULTIPLE = 8

# The preset and the shape arguments a config or a tool may set on top of it: weights load only into
# a network built with the same values.
ARCH_FIELDS = ("preset", "dim", "num_blocks", "num_refinement_blocks", "heads", "ffn_expansion_factor")

_WITH_BIAS_RGB: dict[str, Any] = {"inp_channels": 3, "out_channels": 3, "LayerNorm_type": "WithBias"}
_BIAS_FREE_RGB: dict[str, Any] = {"inp_channels": 3, "out_channels": 3, "LayerNorm_type": "BiasFree"}

PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(_WITH_BIAS_RGB),
    "motion_deblurring": dict(_WITH_BIAS_RGB),
    "deraining": dict(_WITH_BIAS_RGB),
    "single_image_defocus": dict(_WITH_BIAS_RGB),
    "gaussian_color_denoising": dict(_BIAS_FREE_RGB),
    "real_denoising": dict(_BIAS_FREE_RGB),
    "gaussian_gray_denoising": {"inp_channels": 1, "out_channels": 1, "LayerNorm_type": "BiasFree"},
    # Left and right dual-pixel views stacked as 6 channels in, one sharp RGB image out.
    "dual_pixel_defocus": {"inp_channels": 6, "out_channels": 3, "LayerNorm_type": "WithBias",
                           "dual_pixel_task": True},
}


def build_model(preset: str = "default", **overrides: Any) -> Restormer:
    """Restormer for a named task; keyword overrides (dim, num_blocks, ...) win."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Restormer preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return Restormer(**{**PRESETS[preset], **overrides})


def arch_problem(preset: str, **overrides: Any) -> str | None:
    """Why build_model(preset, **overrides) would not train, or its exported weights not load back (in
    model.infer_arch, or in apps through spandrel), or None."""
    frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(overrides.items()))
    return _arch_problem(preset, frozen)


@functools.lru_cache(maxsize=32)
def _arch_problem(preset: str, overrides: tuple[tuple[str, Any], ...]) -> str | None:
    if preset not in PRESETS:
        return f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}"
    try:
        # The constructor's own checks, without memory or initialisation.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on zero-element tensors: the error says more
            net = build_model(preset, **{k: list(v) if isinstance(v, tuple) else v for k, v in overrides})
    except (ValueError, TypeError, RuntimeError) as err:
        return f"the network cannot be built: {err}"
    dim = net.patch_embed.proj.out_channels
    if dim % 2:
        return f"dim {dim} must be even: each downsampling halves the channels, then unshuffles 2 x 2 pixels"
    levels = [net.encoder_level1, net.encoder_level2, net.encoder_level3, net.latent]
    if not all(len(level) for level in levels):
        return (f"num_blocks {[len(level) for level in levels]}: every level needs a transformer block (weight "
                "files name a level by its blocks)")
    return gdfn_widths_problem(dim, [level[0].ffn.project_out.in_channels for level in levels])
