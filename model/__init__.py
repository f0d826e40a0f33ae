"""Restormer: the network, what training keeps for backward, its task presets, weight files and
whole-image inference."""
from .activations import ACTIVATION_MODES, set_activations
from .inference import PRECISIONS, PaddedModel, pad_to_multiple, restore, restore_image, tiling_problem
from .presets import ARCH_FIELDS, PRESETS, SIZE_MULTIPLE, arch_problem, build_model
from .restormer import Restormer
from .weights import (WeightsFileError, WeightsMismatchError, infer_arch, load_weights, read_state_dict,
                      save_official_pth, save_safetensors, with_identity_refinement)

__all__ = [
    "ACTIVATION_MODES",
    "ARCH_FIELDS",
    "PRECISIONS",
    "PRESETS",
    "PaddedModel",
    "Restormer",
    "SIZE_MULTIPLE",
    "WeightsFileError",
    "WeightsMismatchError",
    "arch_problem",
    "build_model",
    "infer_arch",
    "load_weights",
    "pad_to_multiple",
    "read_state_dict",
    "restore",
    "restore_image",
    "save_official_pth",
    "save_safetensors",
    "set_activations",
    "tiling_problem",
    "with_identity_refinement",
]
