"""model.set_activations: lean's Functions are exact (float64 gradcheck), and lean takes over a block
only where it computes that block's function; anything a researcher changes runs plain autograd."""
from __future__ import annotations

import ast
import contextlib
import io
import re

import pytest
import torch
import torch.nn as nn

from model import Restormer, set_activations
from model import activations as lean
from model.restormer import Attention, Conv1x1, TransformerBlock
from model_vectors import ROOT, perturbed

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4])


def _cl(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()


def _p(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("with_bias", [True, False])
def test_recompute_then_project_of_the_layernorm_passes_gradcheck(with_bias):
    x, w, b = _cl(1, 4, 3, 3), _p(4), _p(4) if with_bias else None
    proj_w, proj_b = [_p(2, 4, 1, 1), _p(3, 4, 1, 1)], [_p(2), None]
    f = lambda *t: lean._project(lean._NORM, t[:3], t[3:5], [t[5], None])  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b, *proj_w, proj_b[0]))


def test_recompute_then_project_of_the_gelu_gate_passes_gradcheck():
    args = (_cl(1, 3, 4, 4), _cl(1, 3, 4, 4), _p(3, 1, 3, 3), _p(3, 1, 3, 3), _p(3), _p(3))
    f = lambda *t: lean._project(lean._gelu_gate, t[:6], [t[6]], [t[7]])  # noqa: E731
    assert torch.autograd.gradcheck(f, (*args, _p(2, 3, 1, 1), _p(2)))


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_core_passes_gradcheck(heads):
    pre = [_cl(2, 4, 3, 3) for _ in range(3)]
    weights, biases = [_p(4, 1, 3, 3) for _ in range(3)], [_p(4) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *t: lean._AttentionCore.apply(heads, *t),
                                    (*pre, *weights, *biases, _p(heads, 1, 1)))


def _grads(model: nn.Module, mode: str, x: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    model.zero_grad()
    set_activations(model, mode)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x)
    out.float().square().mean().backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal_gradients(model: nn.Module, tol: float = 1e-5, dtype: torch.dtype | None = None):
    x = torch.rand(2, model.patch_embed.proj.in_channels, 16, 16)
    plain, lean_ = _grads(model, "plain", x, dtype), _grads(model, "lean", x, dtype)
    assert plain.keys() == lean_.keys()
    # In fp32 every parameter's gradient; under autocast, where rounding differs per GEMM, all of them.
    pairs = [(lean_[n], plain[n], n) for n in plain] if dtype is None else [
        (torch.cat([g.flatten() for g in lean_.values()]), torch.cat([g.flatten() for g in plain.values()]), "all")]
    for got, expected, name in pairs:
        assert ((got - expected).norm() / expected.norm().clamp_min(1e-12)) <= tol, name


def _net(seed: int = 0, **kw) -> Restormer:
    torch.manual_seed(seed)
    return perturbed(Restormer(**{**SMALL, **kw}))


def test_a_clean_network_is_lean_everywhere_and_the_report_is_empty():
    assert set_activations(_net(), "lean") == {}
    assert set_activations(_net(), "checkpoint") == {}


@pytest.mark.parametrize("part", ["norm1", "attn.qkv", "attn.qkv_dwconv", "attn.project_out", "attn",
                                  "norm2", "ffn.project_in", "ffn.dwconv", "ffn.project_out"])
@pytest.mark.parametrize("layernorm_type", ["WithBias", "BiasFree"])
def test_frozen_parts_get_no_gradient_and_the_others_autograds(part, layernorm_type):
    model = _net(LayerNorm_type=layernorm_type)
    block = model.encoder_level2[0]
    block.get_submodule(part).requires_grad_(False)
    assert set_activations(model, "lean") == {}  # lean handles frozen weights itself
    _assert_equal_gradients(model)
    assert all(p.grad is None for p in block.get_submodule(part).parameters())


def test_a_forward_hook_on_attn_fires_and_the_block_runs_plain():
    model = _net()
    seen = []
    model.encoder_level1[0].attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert set_activations(model, "lean") == {"encoder_level1.0": "attn has a module hook"}
    _assert_equal_gradients(model)
    assert len(seen) == 2  # plain and lean runs each called it


class ScaledAttention(Attention):
    """A researcher's variant: changed math, parameters unchanged."""

    def forward(self, x):
        return 2 * super().forward(x).tanh()


def test_a_subclass_with_changed_math_falls_back_to_autograd():
    model = _net()
    old = model.latent[0].attn
    model.latent[0].attn = ScaledAttention(old.qkv.in_channels, old.num_heads, bias=False)
    model.latent[0].attn.load_state_dict(old.state_dict())
    assert set_activations(model, "lean") == {"latent.0": "attn is ScaledAttention, not model.restormer's Attention"}
    _assert_equal_gradients(model)


class LoRA(nn.Module):
    def __init__(self, base: nn.Conv2d, rank: int = 2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_a_lora_wrapped_projection_trains_its_adapter_under_autograd():
    model = _net()
    model.decoder_level2[0].attn.qkv = LoRA(model.decoder_level2[0].attn.qkv)
    report = set_activations(model, "lean")
    assert report == {"decoder_level2.0": "attn.qkv is LoRA, not model.restormer's Conv1x1"}
    _assert_equal_gradients(model)
    assert model.decoder_level2[0].attn.qkv.up.weight.grad is not None


def test_changes_made_after_set_activations_are_seen_at_forward():
    model = _net()
    assert set_activations(model, "lean") == {}
    block = model.refinement[0]
    calls = []
    block.ffn.dwconv.register_forward_pre_hook(lambda *_: calls.append(1))
    model.encoder_level3[0].ffn.project_out = Conv1x1(model.encoder_level3[0].ffn.project_out.in_channels,
                                                      16 * 2, bias=False)  # a fresh one, the same module
    model(torch.rand(1, 3, 16, 16)).mean().backward()
    assert calls == [1]
    assert lean._why_plain(block) == "ffn.dwconv has a module hook"
    assert lean._why_plain(model.encoder_level3[0]) is None  # same geometry: lean computes it exactly
    handle = nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert lean._why_plain(model.latent[0]) == "global module hooks are registered"
    finally:
        handle.remove()


def test_a_different_convolution_geometry_runs_plain():
    model = _net()
    model.encoder_level1[0].attn.qkv_dwconv = nn.Conv2d(24, 24, kernel_size=5, padding=2, groups=24, bias=False)
    assert "qkv_dwconv is not the official 3x3" in set_activations(model, "lean")["encoder_level1.0"]
    _assert_equal_gradients(model)


def test_a_subclassed_block_and_a_replaced_forward_are_reported():
    class Block(TransformerBlock):
        pass

    model = _net()
    old = model.latent[0]
    model.latent[0] = Block(16 * 4, 4, 2.66, False, "WithBias")
    model.latent[0].load_state_dict(old.state_dict())
    model.refinement[0].forward = lambda x: x
    assert set_activations(model, "lean") == {"latent.0": "Block is a subclass of TransformerBlock",
                                              "refinement.0": "its forward was replaced on the instance"}
    set_activations(model, "checkpoint")  # a subclass is checkpointed as written
    assert model.latent[0].forward.__func__ is lean._checkpoint_forward


def test_checkpoint_runs_each_block_again_and_plain_restores_the_class_forward():
    model = _net()
    calls = []
    model.encoder_level1[0].attn.register_forward_hook(lambda *_: calls.append(1))
    set_activations(model, "checkpoint")
    model(torch.rand(1, 3, 16, 16)).mean().backward()
    assert len(calls) == 2
    set_activations(model, "plain")
    assert "forward" not in model.encoder_level1[0].__dict__


def test_source_edits_to_the_mirrored_forwards_switch_lean_off(monkeypatch):
    monkeypatch.setattr(lean, "_WRITTEN_FOR", "something else")
    report = set_activations(_net(), "lean")
    assert len(report) == 8 and all("differs from the one lean was written for" in why for why in report.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_hooked_network_under_autocast_equals_autograd(dtype):
    model = _net()
    model.encoder_level2[0].norm2.register_forward_hook(lambda *_: None)
    model.decoder_level3[0].attn.project_out.requires_grad_(False)
    _assert_equal_gradients(model, tol=2 * torch.finfo(dtype).eps, dtype=dtype)


@pytest.mark.parametrize("mode", ["plain", "lean", "checkpoint"])
def test_gradients_arrive_in_the_parameters_strides(mode):
    """DDP's buckets take the parameters' strides: any other gradient is warned about and copied."""
    model = _net()
    set_activations(model, mode)
    model(torch.rand(1, 3, 16, 16)).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()] == []


def test_double_backward_through_lean_is_an_error():
    model = _net()
    set_activations(model, "lean")
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).square().mean(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


def test_the_docs_example_prints_what_the_docs_say():
    doc = (ROOT / "docs" / "model.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/model.md", "exec"), {})
    said = re.search(r"print\(set_activations\(net, \"lean\"\)\)\n((?:# .*\n)+)", code).group(1)
    assert ast.literal_eval(said.replace("# ", "").replace("\n", "")) == ast.literal_eval(printed.getvalue())
