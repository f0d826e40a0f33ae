"""Restormer: the network, its task presets, weight files and whole-image inference."""
from .inference import PRECISIONS, PaddedModel, pad_to_multiple, restore, restore_image
from .presets import PRESETS, build_model
from .restormer import Restormer
from .weights import (WeightsMismatchError, infer_arch, load_weights, read_state_dict, save_official_pth,
                      save_safetensors)

__all__ = [
    "PRECISIONS",
    "PRESETS",
    "PaddedModel",
    "Restormer",
    "WeightsMismatchError",
    "build_model",
    "infer_arch",
    "load_weights",
    "pad_to_multiple",
    "read_state_dict",
    "restore",
    "restore_image",
    "save_official_pth",
    "save_safetensors",
]
