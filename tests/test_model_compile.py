"""torch.compile captures the whole model as one graph (fullgraph=True: a graph break would raise).

Kept small: the aot_eager backend (no C++ build) and static shapes. Measured on the shared 2-core
machine with torch 2.13: dynamic=True also compiles without graph breaks and serves a second patch
size without recompiling, but tracing takes minutes there; dynamic=True together with activation
checkpointing hits a dynamo assertion in torch 2.13, so compile checkpointed models with
dynamic=False (training uses one patch size).
"""
from __future__ import annotations

import pytest
import torch

from model import Restormer, set_activations
from model_vectors import TINY, perturbed


@pytest.mark.slow
def test_compiles_as_one_graph_with_checkpointing_and_new_patch_sizes():
    torch._dynamo.reset()
    model = perturbed(Restormer(**TINY))
    set_activations(model, "checkpoint")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=counting_backend)
    try:
        for shape in [(2, 3, 16, 24), (2, 3, 32, 16)]:
            x = torch.rand(shape)
            out = compiled(x)
            out.abs().mean().backward()
            assert (out - model(x)).abs().max().item() < 1e-5
        assert len(graphs) == 2  # one whole-model graph per patch size
    finally:
        torch._dynamo.reset()
