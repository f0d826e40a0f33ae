"""Weight files: official .pth layouts, safetensors, DDP prefixes, clear errors, no code execution."""
from __future__ import annotations

import pathlib

import pytest
import torch

from model import (Restormer, WeightsMismatchError, build_model, infer_arch, load_weights, read_state_dict,
                   save_official_pth, save_safetensors)
from model_vectors import TINY, VECTORS, load_vectors, perturbed


def _tiny(**kw) -> Restormer:
    return Restormer(**TINY, **kw)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("wrapper", ["params", "params_ema", "state_dict", None])
def test_pth_layouts_round_trip(tmp_path, wrapper):
    source = perturbed(_tiny())
    state = source.state_dict()
    path = tmp_path / "net.pth"
    torch.save(state if wrapper is None else {wrapper: state, "iter": 7}, path)
    target = _tiny()
    load_weights(target, path)
    assert _same_weights(source, target)


def test_params_preferred_over_params_ema_and_key_picks_explicitly(tmp_path):
    a, b = perturbed(_tiny(), seed=1), perturbed(_tiny(), seed=2)
    path = tmp_path / "both.pth"
    torch.save({"params": a.state_dict(), "params_ema": b.state_dict()}, path)
    target = _tiny()
    load_weights(target, path)
    assert _same_weights(a, target)
    load_weights(target, path, key="params_ema")
    assert _same_weights(b, target)
    with pytest.raises(KeyError, match="params_ema"):
        read_state_dict(path, key="model")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_prefixes_are_stripped(tmp_path, prefix):
    source = perturbed(_tiny())
    path = tmp_path / "wrapped.pt"
    torch.save({f"{prefix}{k}": v for k, v in source.state_dict().items()}, path)
    assert set(read_state_dict(path)) == set(source.state_dict())


def test_save_official_pth_and_safetensors(tmp_path):
    source = perturbed(_tiny())
    save_official_pth(source, tmp_path / "out" / "net.pth")
    save_safetensors(source.state_dict(), tmp_path / "net.safetensors")
    assert set(torch.load(tmp_path / "out" / "net.pth", weights_only=True)) == {"params"}
    for name in ("out/net.pth", "net.safetensors"):
        target = _tiny()
        load_weights(target, tmp_path / name)
        assert _same_weights(source, target)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["net.pth", "net.safetensors", "out"]  # no temp files left


def test_official_vectors_load_from_safetensors_file():
    state, _, _ = load_vectors("WithBias")
    model = _tiny()
    load_weights(model, state)
    assert torch.equal(model.patch_embed.proj.weight, state["patch_embed.proj.weight"])


def test_mismatch_error_names_every_problem(tmp_path):
    state = _tiny().state_dict()
    del state["output.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["patch_embed.proj.weight"] = torch.zeros(8, 6, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"params": state}, path)
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(_tiny(), path)
    msg = str(info.value)
    assert str(path) in msg
    assert "1 missing: output.weight" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "patch_embed.proj.weight (file (8, 6, 3, 3), model (8, 3, 3, 3))" in msg
    assert isinstance(info.value, ValueError)
    assert info.value.missing == ["output.weight"]


def test_mismatch_error_truncates_long_lists_and_non_strict_allows_missing():
    with_bias = _tiny().state_dict()  # WithBias has LayerNorm biases that BiasFree lacks
    bias_free = _tiny(LayerNorm_type="BiasFree")
    with pytest.raises(WeightsMismatchError, match=r"unexpected: .*\.\.\. and \d+ more"):
        load_weights(bias_free, with_bias)
    result = load_weights(_tiny(), bias_free.state_dict(), strict=False)
    assert len(result.missing_keys) == len(with_bias) - len(bias_free.state_dict())
    with pytest.raises(WeightsMismatchError, match="with other shapes"):  # shapes are checked even then
        load_weights(build_model("gaussian_gray_denoising", **TINY), bias_free.state_dict(), strict=False)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"params": _tiny().state_dict(), "hook": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(path)
    assert not marker.exists()


def test_missing_file_and_non_dict_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a dict of tensors"):
        read_state_dict(tmp_path / "tensor.pt")


@pytest.mark.parametrize("tsv", sorted(VECTORS.glob("keys_*.tsv")), ids=lambda p: p.stem)
def test_architecture_is_read_off_official_shapes(tsv):
    """infer_arch on an official key/shape listing builds a network with exactly those shapes."""
    shapes = {}
    for line in tsv.read_text().splitlines():
        key, shape = line.split("\t")
        shapes[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    arch = infer_arch({k: torch.zeros(s) for k, s in shapes.items()})
    assert {k: tuple(v.shape) for k, v in Restormer(**arch).state_dict().items()} == shapes
    assert arch["ffn_expansion_factor"] == 2.66
