"""Shared bits of the model tests: tiny configs and the test vectors made with the official code."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY_NET

ROOT = Path(__file__).resolve().parents[1]
VECTORS = Path(__file__).resolve().parent / "vectors"

# The configuration the official test vectors were made with: the suite's tiny network.
TINY = TINY_NET
VECTOR_SETS = {"WithBias": "tiny_", "BiasFree": "tiny_biasfree_"}


def load_vectors(layernorm_type: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    prefix = VECTORS / VECTOR_SETS[layernorm_type]
    state = load_file(f"{prefix}state.safetensors")
    return state, load_file(f"{prefix}input.safetensors")["input"], load_file(f"{prefix}output.safetensors")["output"]


def load_gradient_vectors(folder: Path, case: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """-> (official weights, {'input', 'probe', 'output', 'grad.<name>'}, the constructor's arguments)."""
    with safe_open(folder / f"{case}_io.safetensors", "pt") as f:
        config = json.loads(f.metadata()["config"])
    return load_file(folder / f"{case}_state.safetensors"), load_file(folder / f"{case}_io.safetensors"), config


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (LayerNorm ones/zeros, temperature ones) so tests see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model
