"""Named configurations of every task in the official Restormer release (Options/*.yml there), and the
facts about the network's shape that configs, data and tools rely on."""
from __future__ import annotations

from typing import Any

from .restormer import Restormer

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
    """Restormer for a named task; keyword overrides (dim, num_blocks, checkpointing, ...) win."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Restormer preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return Restormer(**{**PRESETS[preset], **overrides})

