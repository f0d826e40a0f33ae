"""Restormer architecture: official numbers, official state_dict layout, presets, activation modes, autocast."""
from __future__ import annotations

import pytest
import torch

from model import ACTIVATION_MODES, Restormer, build_model, set_activations
from model.memory import TensorMemoryMeter
from conftest import SHARED
from model_vectors import TINY, VECTORS, load_gradient_vectors, load_vectors, perturbed


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layernorm_type", ["WithBias", "BiasFree"])
def test_reproduces_official_test_vectors(layernorm_type):
    state, x, expected = load_vectors(layernorm_type)
    model = Restormer(**TINY, LayerNorm_type=layernorm_type).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected.shape and out.is_contiguous()
    assert (out - expected).abs().max().item() <= 1e-5


SHARED_VECTORS = SHARED / "reference" / "restormer"
GRADIENT_CASES = ["gray_biasfree", "dual_pixel", "bias_deep", "wide_biasfree"]


def _vector_case(case: str):
    folder = VECTORS if (VECTORS / f"{case}_io.safetensors").is_file() else SHARED_VECTORS
    if not (folder / f"{case}_io.safetensors").is_file():
        pytest.skip(f"{case} vectors live in ../shared/reference/restormer, absent here")
    return load_gradient_vectors(folder, case)


@pytest.mark.parametrize("mode", ACTIVATION_MODES)
@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_equals_official_in_forward_and_gradients(case, mode):
    """Vectors made with the official code (train mode): output and every gradient agree, whatever
    training keeps for backward."""
    state, io, config = _vector_case(case)
    model = Restormer(**config).train()
    set_activations(model, mode)
    model.load_state_dict(state, strict=True)
    x = io["input"].clone().requires_grad_(True)
    out = model(x)
    assert (out - io["output"]).abs().max().item() <= 1e-5
    (out * io["probe"]).sum().backward()
    grads = {"input": x.grad, **{name: p.grad for name, p in model.named_parameters()}}
    assert grads.keys() == {k.removeprefix("grad.") for k in io if k.startswith("grad.")}
    for name, grad in grads.items():
        expected = io[f"grad.{name}"]
        assert ((grad - expected).norm() / expected.norm().clamp_min(1e-12)).item() <= 1e-3, name


@pytest.mark.parametrize("keys_file,preset", [("default", "default"), ("default", "motion_deblurring"),
                                              ("default", "deraining"), ("default", "single_image_defocus"),
                                              ("gaussian_color_denoising", "gaussian_color_denoising"),
                                              ("gaussian_color_denoising", "real_denoising"),
                                              ("gaussian_gray_denoising", "gaussian_gray_denoising"),
                                              ("dual_pixel_defocus", "dual_pixel_defocus")])
def test_state_dict_keys_and_shapes_equal_official(keys_file, preset):
    expected = (VECTORS / f"keys_{keys_file}.tsv").read_text().splitlines()
    got = [f"{k}\t{tuple(v.shape)}" for k, v in build_model(preset).state_dict().items()]
    assert got == expected


def test_constructor_defaults_are_the_official_ones():
    assert Restormer().state_dict().keys() == build_model("default").state_dict().keys()
    # The official class is called positionally in the official scripts.
    model = Restormer(3, 3, 8, [1, 1, 1, 1], 1, [1, 2, 4, 8], 2.66, False, "BiasFree", False)
    assert not hasattr(model.encoder_level1[0].norm1.body, "bias")  # as official


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="dual_pixel_defocus"):
        build_model("denoise")


def test_build_model_overrides_win():
    model = build_model("gaussian_gray_denoising", **TINY)
    assert model.patch_embed.proj.weight.shape == (8, 1, 3, 3)


def test_dual_pixel_maps_six_channels_to_three_without_global_residual():
    model = build_model("dual_pixel_defocus", **TINY)
    torch.nn.init.zeros_(model.output.weight)
    out = model(torch.rand(1, 6, 16, 16))
    assert out.shape == (1, 3, 16, 16)
    assert out.abs().max().item() == 0  # no input added back


def _train_step(model: Restormer, mode: str, x: torch.Tensor, dtype: torch.dtype | None = None):
    """Gradients, activation bytes kept by the forward and peak bytes."""
    model.zero_grad()
    set_activations(model, mode)
    meter = TensorMemoryMeter()
    with meter:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x)
        kept = meter.current
        out.abs().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), kept, meter.peak


@pytest.mark.parametrize("layernorm_type", ["WithBias", "BiasFree"])
def test_lean_keeps_far_fewer_bytes_than_plain_autograd_for_the_same_gradients(layernorm_type):
    torch.manual_seed(0)
    model = perturbed(Restormer(**{**TINY, "dim": 16}, LayerNorm_type=layernorm_type))
    x = torch.rand(2, 3, 32, 32)
    plain, plain_kept, plain_peak = _train_step(model, "plain", x)
    lean, lean_kept, lean_peak = _train_step(model, "lean", x)
    ckpt, ckpt_kept, ckpt_peak = _train_step(model, "checkpoint", x)
    assert lean_kept < 0.6 * plain_kept and lean_peak < 0.8 * plain_peak
    assert ckpt_kept < 0.2 * lean_kept and ckpt_peak < lean_peak
    for grads in (lean, ckpt):
        assert ((grads - plain).norm() / plain.norm()).item() <= 1e-5


@pytest.mark.parametrize("case", GRADIENT_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_gradients_under_autocast_equal_plain_autograd(case, dtype):
    """Backward recomputes under the forward's autocast state and casts as autocast does: on every
    shape of the official vectors lean's gradients are as close to the fp32 gradients as plain
    autograd's are. (Not "equal to plain's": the two round in different places, ~0.1-2 eps apart.)"""
    if not _autocast_supported(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    state, io, config = _vector_case(case)
    model = Restormer(**config).train()
    model.load_state_dict(state, strict=True)
    exact, *_ = _train_step(model, "plain", io["input"])
    plain, plain_kept, *_ = _train_step(model, "plain", io["input"], dtype)
    lean, lean_kept, *_ = _train_step(model, "lean", io["input"], dtype)
    plain_error, lean_error = (((g - exact).norm() / exact.norm()).item() for g in (plain, lean))
    assert lean_error <= 1.2 * plain_error, (lean_error, plain_error)
    assert plain_error <= 3 * torch.finfo(dtype).eps
    assert lean_kept < 0.7 * plain_kept


def test_unknown_activation_mode_is_refused():
    with pytest.raises(ValueError, match="lean"):
        set_activations(Restormer(**TINY), "none")


def _autocast_supported(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.functional.conv2d(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 3, 3))
        return True
    except (RuntimeError, ValueError):
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward_is_finite_and_close(dtype):
    if not _autocast_supported(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    torch.manual_seed(0)
    model = perturbed(Restormer(**TINY))
    # Large activations: an unnormalised q.k would overflow fp16 here.
    x = 50 * torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == torch.float32  # the global residual adds the fp32 input
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    (out - x).abs().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("layernorm_type", ["WithBias", "BiasFree"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_take_an_fp32_input_as_deepspeed_runs_them(layernorm_type, dtype):
    """DeepSpeed bf16/fp16 keeps the weights in that dtype, without autocast: the LayerNorm runs in fp32
    with its weights cast, and the global residual adds the caller's fp32 input (as under autocast)."""
    torch.manual_seed(0)
    ref = perturbed(Restormer(**TINY, LayerNorm_type=layernorm_type))
    low = perturbed(Restormer(**TINY, LayerNorm_type=layernorm_type))
    low.load_state_dict(ref.state_dict())
    low = low.to(dtype)
    x = torch.rand(2, 3, 16, 16)
    out = low(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        assert (out - ref(x)).abs().max().item() < 0.05
    out.abs().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in low.parameters())
    # With the last convolution zeroed only the residual is left: the fp32 input, not its bf16 rounding.
    with torch.no_grad():
        low.output.weight.zero_()
        assert torch.equal(low(x), x)
