"""Shared bits of the model tests: tiny configs, the test vectors, the official transcription."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
VECTORS = Path(__file__).resolve().parent / "vectors"

# The configuration the official test vectors were made with.
TINY = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8])
VECTOR_SETS = {"WithBias": "tiny_", "BiasFree": "tiny_biasfree_"}


def load_vectors(layernorm_type: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    prefix = VECTORS / VECTOR_SETS[layernorm_type]
    state = load_file(f"{prefix}state.safetensors")
    return state, load_file(f"{prefix}input.safetensors")["input"], load_file(f"{prefix}output.safetensors")["output"]


def official_module():
    """benchmarks/official_restormer.py (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("official_restormer", ROOT / "benchmarks" / "official_restormer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (LayerNorm ones/zeros, temperature ones) so tests see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model
