"""python -m tools.export: safetensors / official .pth round trips, ONNX checked with onnxruntime."""

import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_NET, TINY_NET_ARGS
from model import PRESETS, Restormer, build_model, infer_arch, load_weights, read_state_dict, save_safetensors
from model_vectors import perturbed
from train import checkpoint as ckpt
from train.exporting import Weights, write_export
from tools.export import check_onnx, export_onnx, main
from tools.loading import load_model



def tiny(preset="default", seed=0):
    torch.manual_seed(seed)
    model = build_model(preset, **TINY_NET).eval()
    # Perturb LayerNorm weights and biases, which start as ones/zeros, so a dropped tensor would show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def test_weights_round_trip_and_the_folder_loads_as_is(tmp_path, capsys):
    model = tiny("real_denoising")
    save_safetensors(model, tmp_path / "in.safetensors")
    assert main(["-w", str(tmp_path / "in.safetensors"), "--preset", "real_denoising", *TINY_NET_ARGS,
                 "-o", str(tmp_path / "out"), "--formats", "safetensors", "pth"]) == 0
    expected = model.state_dict()
    for name in ("model.safetensors", "model_official.pth"):
        state = read_state_dict(tmp_path / "out" / name)
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert set(torch.load(tmp_path / "out" / "model_official.pth", weights_only=True)) == {"params"}
    arch = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["model"]
    assert arch["preset"] == "real_denoising" and arch["dim"] == 8
    # The exported folder describes itself: no --preset needed to load it again.
    reloaded = load_model(tmp_path / "out" / "model.safetensors")
    assert torch.equal(reloaded.model.output.weight, model.output.weight)
    assert "model_official.pth" in capsys.readouterr().out


def test_a_checkpoint_with_ema_exports_both_weights_and_deploys_the_ema(tmp_path):
    trained, ema = tiny(seed=0), tiny(seed=1)
    folder = tmp_path / "step_00000009"
    folder.mkdir()
    save_safetensors(trained, folder / ckpt.MODEL_FILE)
    save_safetensors(ema, folder / ckpt.EMA_FILE)
    (folder / ckpt.CONFIG_FILE).write_text(yaml.safe_dump({"model": {"preset": "default", **TINY_NET}}))
    (folder / ckpt.STATE_FILE).write_text("{}")
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    out = tmp_path / "out"
    assert main(["-w", str(folder), "-o", str(out), "--formats", "safetensors", "pth"]) == 0
    official = torch.load(out / "model_official.pth", weights_only=True)
    assert set(official) == {"params", "params_ema"}
    assert same(official["params"], trained.state_dict()) and same(official["params_ema"], ema.state_dict())
    assert same(read_state_dict(out / "model.safetensors"), ema.state_dict())
    # The export folder, exported again, still knows both.
    assert main(["-w", str(out / "model.safetensors"), "-o", str(tmp_path / "again"), "--formats", "pth"]) == 0
    again = torch.load(tmp_path / "again" / "model_official.pth", weights_only=True)
    assert same(again["params"], trained.state_dict()) and same(again["params_ema"], ema.state_dict())


@pytest.mark.parametrize("preset", ["default", "gaussian_gray_denoising"])
def test_onnx_with_free_height_and_width_matches_torch(tmp_path, preset):
    pytest.importorskip("onnxruntime")
    model = tiny(preset, seed=1)
    channels = 1 if preset == "gaussian_gray_denoising" else 3
    path = export_onnx(model, tmp_path / "m.onnx", channels, height=32, width=40)
    for height, width in ((32, 40), (20, 28), (37, 45)):  # the traced size, smaller, not a multiple of 8
        assert check_onnx(model, path, channels, height, width) <= 1e-4


def test_onnx_static_export_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny(seed=2)
    path = export_onnx(model, tmp_path / "m.onnx", 3, height=24, width=32, dynamic=False)
    assert check_onnx(model, path, 3, 24, 32) <= 1e-4


def test_onnx_cli_reports_its_check(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    save_safetensors(tiny(seed=3), tmp_path / "w.safetensors")
    assert main(["-w", str(tmp_path / "w.safetensors"), "--preset", "default", *TINY_NET_ARGS, "-o", str(tmp_path / "o"),
                 "--formats", "onnx", "--onnx-size", "16", "24"]) == 0
    out = capsys.readouterr().out
    assert "max |diff|" in out and out.rstrip().endswith("ok")
    assert (tmp_path / "o" / "model.onnx").is_file()


def test_onnx_graph_rejects_nothing_torch_would_accept(tmp_path):
    """The graph pads internally: an odd-sized image gives an output of its own size."""
    ort = pytest.importorskip("onnxruntime")
    model = tiny(seed=4)
    path = export_onnx(model, tmp_path / "m.onnx", 3, height=16, width=16)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, 13, 19), dtype=np.float32)
    assert session.run(None, {"input": x})[0].shape == (1, 3, 13, 19)


# What spandrel 0.4.2 (spandrel_extra_arches 0.2.0, Restormer's detector) requires of a state dict: every
# one of these keys. Checked against spandrel itself by benchmarks/spandrel_exports.py (docs/export.md).
SPANDREL_RESTORMER_KEYS = (
    "patch_embed.proj.weight", "encoder_level1.0.norm1.body.weight", "encoder_level1.0.attn.temperature",
    "encoder_level1.0.attn.qkv.weight", "encoder_level1.0.attn.qkv_dwconv.weight",
    "encoder_level1.0.attn.project_out.weight", "encoder_level1.0.norm2.body.weight",
    "encoder_level1.0.ffn.project_in.weight", "encoder_level1.0.ffn.dwconv.weight",
    "encoder_level1.0.ffn.project_out.weight", "down1_2.body.0.weight", "encoder_level2.0.attn.temperature",
    "down2_3.body.0.weight", "encoder_level3.0.attn.temperature", "down3_4.body.0.weight",
    "latent.0.attn.temperature", "up4_3.body.0.weight", "reduce_chan_level3.weight",
    "decoder_level3.0.attn.temperature", "up3_2.body.0.weight", "reduce_chan_level2.weight",
    "decoder_level2.0.attn.temperature", "up2_1.body.0.weight", "decoder_level1.0.attn.temperature",
    "refinement.0.norm1.body.weight", "refinement.0.attn.temperature", "output.weight",
)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_an_export_without_refinement_blocks_is_what_apps_detect_and_computes_the_same(tmp_path, preset):
    """The export carries one identity refinement block: apps (spandrel) build a network with it and get our
    output exactly; our own loader reads the architecture back without it."""
    torch.manual_seed(0)
    model = perturbed(build_model(preset, **{**TINY_NET, "num_refinement_blocks": 0})).eval()
    written = write_export(tmp_path, Weights(model.state_dict(), {"preset": preset, "num_refinement_blocks": 0}))
    x = torch.rand(1, model.patch_embed.proj.in_channels, 24, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    for path in (written["safetensors"], written["pth"]):
        state = read_state_dict(path)
        assert not set(SPANDREL_RESTORMER_KEYS) - set(state), path
        # As spandrel builds it: every refinement block the file holds.
        as_apps_read_it = Restormer(**{**infer_arch(state), "num_refinement_blocks": 1}).eval()
        load_weights(as_apps_read_it, state)
        reloaded = load_model(path)
        assert reloaded.arch["num_refinement_blocks"] == 0 and len(reloaded.model.refinement) == 0
        with torch.no_grad():
            assert torch.equal(as_apps_read_it(x), expected) and torch.equal(reloaded.model(x), expected)
    assert yaml.safe_load(written["config"].read_text())["model"]["num_refinement_blocks"] == 0


def test_networks_with_refinement_blocks_are_exported_as_they_are(tmp_path):
    model = tiny()
    state = read_state_dict(write_export(tmp_path, Weights(model.state_dict(), {"preset": "default"}))["safetensors"])
    assert state.keys() == model.state_dict().keys() and infer_arch(state)["num_refinement_blocks"] == 1


def test_onnx_without_the_onnx_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    """onnx is not a dependency: a user who installed the package alone gets the command, not torch's error."""
    save_safetensors(tiny(), tmp_path / "w.safetensors")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["-w", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "out")]) == 1
    assert "pip install onnx onnxruntime" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the weight files are written first
