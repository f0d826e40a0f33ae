"""python -m tools.restore: pixels survive, inputs/outputs, self-ensemble, weights sources, errors."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY_NET, TINY_NET_ARGS, image_bomb, random_png
from conftest import tiny_net as tiny
from data_shards.codec import read_image
from model import save_official_pth, save_safetensors
from train.config import Config
from tools.loading import ModelLoadError, load_model, official_preset
from data_shards.geometry import dihedral, undo_dihedral
from model import restore
from tools.restore import main

SPATIAL = (-2, -1)  # the image axes of (B, C, H, W)

def write_checkpoint(run_dir, model, ema=None, preset="default", step=10):
    cfg = Config()
    cfg.model.preset = preset
    for key, value in TINY_NET.items():
        setattr(cfg.model, key, value)
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    save_safetensors(model, folder / "model.safetensors")
    if ema is not None:
        save_safetensors(ema, folder / "ema.safetensors")
    (folder / "config.yaml").write_text(cfg.to_yaml())
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return folder


@pytest.mark.parametrize("preset,channels,bits,tile", [
    ("default", 3, 8, None),
    ("default", 3, 16, None),
    ("default", 3, 8, 16),
    ("default", 3, 16, 16),
    ("gaussian_gray_denoising", 1, 8, None),
    ("gaussian_gray_denoising", 1, 16, 16),
])
def test_a_pixel_the_model_leaves_alone_is_saved_unchanged(tmp_path, preset, channels, bits, tile):
    """file -> [0, 1] tensor -> padded (20x28 is no multiple of 8) / tiled model -> saved file: bit-exact."""
    weights = tmp_path / "identity.safetensors"
    save_safetensors(tiny(preset, identity=True), weights)
    original = random_png(tmp_path / "in" / "img.png", 20, 28, channels, bits)
    argv = [str(tmp_path / "in" / "img.png"), "-w", str(weights), "--preset", preset, *TINY_NET_ARGS,
            "-o", str(tmp_path / "out")]
    if tile:
        argv += ["--tile", str(tile), "--overlap", "8"]
    assert main(argv) == 0
    saved = read_image(tmp_path / "out" / "img.png")
    assert saved.dtype == original.dtype
    np.testing.assert_array_equal(saved, original)


def test_bits_option_overrides_the_input_depth(tmp_path):
    weights = tmp_path / "identity.safetensors"
    save_safetensors(tiny(identity=True), weights)
    original = random_png(tmp_path / "img.png", 16, 16, bits=8)
    assert main([str(tmp_path / "img.png"), "-w", str(weights), "--preset", "default", *TINY_NET_ARGS,
                 "-o", str(tmp_path / "out"), "--bits", "16"]) == 0
    saved = read_image(tmp_path / "out" / "img.png")
    assert saved.dtype == np.uint16
    np.testing.assert_array_equal(saved, original.astype(np.uint16) * 257)  # v/255*65535 == 257 v


def test_dihedral_transforms_are_distinct_and_undone():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    seen = set()
    for k in range(8):
        y = dihedral(x, k, SPATIAL)
        seen.add(tuple(y.flatten().tolist()) + tuple(y.shape))
        assert torch.equal(undo_dihedral(y, k, SPATIAL), x)
    assert len(seen) == 8


def test_self_ensemble_is_equivariant_and_differs_from_a_single_pass():
    model = tiny(seed=1)
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    ensemble = restore(model, x, self_ensemble=True)
    # Averaging over all 8 views makes the result commute with any of them.
    for k in (1, 6):
        assert torch.allclose(undo_dihedral(restore(model, dihedral(x, k, SPATIAL), self_ensemble=True), k, SPATIAL), ensemble, atol=1e-5)
    assert not torch.allclose(restore(model, x), ensemble, atol=1e-4)


def test_bf16_autocast_stays_close_to_fp32():
    model = tiny(seed=2)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fp32 = restore(model, x)
    bf16 = restore(model, x, precision="bf16")
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.05


def test_folders_and_globs_restore_every_image_once(tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(tiny(), weights)
    for name in ("a.png", "b.png", "c.png"):
        random_png(tmp_path / "in" / name, 12, 12)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    argv = [str(tmp_path / "in"), str(tmp_path / "in" / "a*.png"), "-w", str(weights), "--preset", "default",
            *TINY_NET_ARGS, "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]
    assert "restored 3 image(s)" in capsys.readouterr().out
    # A second run refuses to overwrite, unless asked to.
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_checkpoint_folder_uses_ema_weights_unless_told_not_to(tmp_path):
    trained, ema = tiny(seed=3), tiny(seed=4)
    folder = write_checkpoint(tmp_path / "run", trained, ema)
    for source in (folder, tmp_path / "run"):  # a checkpoint, or a run whose newest checkpoint it is
        loaded = load_model(source)
        assert loaded.weights.name == "ema.safetensors"
        assert torch.equal(loaded.model.output.weight, ema.output.weight)
        assert loaded.arch["dim"] == 8
    loaded = load_model(folder, prefer_ema=False)
    assert torch.equal(loaded.model.output.weight, trained.output.weight)


def test_exported_weights_find_the_run_config(tmp_path):
    model = tiny(seed=5)
    write_checkpoint(tmp_path / "run", model)
    save_safetensors(model, tmp_path / "run" / "export" / "model.safetensors")
    for source in (tmp_path / "run", tmp_path / "run" / "export" / "model.safetensors"):
        loaded = load_model(source)
        assert loaded.weights == tmp_path / "run" / "export" / "model.safetensors"
        assert torch.equal(loaded.model.output.weight, model.output.weight)
    (tmp_path / "run" / "config.yaml").write_bytes(bytes(range(256)))  # damaged: only a naming hint is lost
    assert torch.equal(load_model(tmp_path / "run").model.output.weight, model.output.weight)


def test_official_file_names_imply_their_preset(tmp_path):
    assert official_preset(tmp_path / "gaussian_color_denoising_blind.pth") == "gaussian_color_denoising"
    assert official_preset(tmp_path / "dual_pixel_defocus_deblurring.pth") == "dual_pixel_defocus"
    assert official_preset(tmp_path / "my_model.pth") is None
    save_official_pth(tiny("real_denoising"), tmp_path / "real_denoising.pth")
    loaded = load_model(tmp_path / "real_denoising.pth", dict(TINY_NET))
    assert loaded.arch["preset"] == "real_denoising"


def test_wrong_preset_names_the_mismatched_keys(tmp_path, capsys):
    save_official_pth(tiny("gaussian_color_denoising"), tmp_path / "denoise.pth")  # BiasFree LayerNorm
    random_png(tmp_path / "img.png", 8, 8)
    code = main([str(tmp_path / "img.png"), "-w", str(tmp_path / "denoise.pth"), "--preset", "deraining",
                 *TINY_NET_ARGS, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "missing" in err and "norm1.body.bias" in err


def test_any_weights_file_loads_with_no_flags(tmp_path, capsys):
    """The architecture is read off the weights: no preset, no config.yaml, any file name."""
    cases = {"mystery.pth": tiny(seed=6), "gray.safetensors": tiny("gaussian_gray_denoising", seed=7),
             "dual.pth": tiny("dual_pixel_defocus", seed=8)}
    for name, model in cases.items():
        path = tmp_path / name
        (save_official_pth if name.endswith(".pth") else save_safetensors)(model, path)
        loaded = load_model(path)
        assert torch.equal(loaded.model.output.weight, model.output.weight)
        assert loaded.in_channels == model.patch_embed.proj.weight.shape[1] and loaded.arch["dim"] == 8
    assert load_model(tmp_path / "dual.pth").arch["preset"] == "dual_pixel_defocus"
    random_png(tmp_path / "img.png", 8, 8)
    assert main([str(tmp_path / "img.png"), "-w", str(tmp_path / "mystery.pth"), "-o", str(tmp_path / "o")]) == 0
    with pytest.raises(ModelLoadError, match="not Restormer weights"):
        save_safetensors({"conv.weight": torch.zeros(3, 3, 1, 1)}, tmp_path / "other.safetensors")
        load_model(tmp_path / "other.safetensors")


def test_missing_inputs_and_unreadable_images_are_reported(tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(tiny(), weights)
    common = ["-w", str(weights), "--preset", "default", *TINY_NET_ARGS, "-o", str(tmp_path / "out")]
    assert main([str(tmp_path / "nope.png"), *common]) == 2
    assert "nope.png: no such file" in capsys.readouterr().err
    assert main([str(tmp_path / "none*.png"), *common]) == 2
    assert "matches no image" in capsys.readouterr().err

    random_png(tmp_path / "in" / "good.png", 8, 8)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main([str(tmp_path / "in"), *common]) == 1  # the good image is still restored
    assert "broken.png" in capsys.readouterr().err
    assert (tmp_path / "out" / "good.png").is_file()


def test_an_image_over_the_pixel_limit_is_skipped_named_and_the_next_restored(tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(tiny(), weights)
    random_png(tmp_path / "in" / "a.png", 8, 8)
    image_bomb(tmp_path / "in" / "b.tif", 14000, 14000)  # issue 28: a MemoryError traceback, nothing after it
    random_png(tmp_path / "in" / "c.png", 16, 8)
    common = ["-w", str(weights), "--preset", "default", *TINY_NET_ARGS, "-o", str(tmp_path / "out")]
    assert main([str(tmp_path / "in"), *common]) == 1
    captured = capsys.readouterr()
    assert "skipped: " + str(tmp_path / "in" / "b.tif") + ": 14000x14000 is 196,000,000 pixels" in captured.err
    assert "1 image(s) over --max-pixels 67108864: raise it" in captured.err
    assert "restored 2 image(s)" in captured.out and "1 skipped" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    assert main([str(tmp_path / "in" / "c.png"), *common, "--overwrite", "--max-pixels", "127"]) == 1
    assert "8x16 is 128 pixels, over the limit of 127" in capsys.readouterr().err


def test_bad_tile_settings_are_rejected(tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(tiny(), weights)
    random_png(tmp_path / "img.png", 8, 8)
    common = [str(tmp_path / "img.png"), "-w", str(weights), "--preset", "default", *TINY_NET_ARGS, "-o", str(tmp_path / "o")]
    assert main([*common, "--tile", "20"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert main([*common, "--tile", "16", "--overlap", "16"]) == 2
    assert "smaller than the tile (16)" in capsys.readouterr().err


def test_dual_pixel_takes_left_and_right_views(tmp_path, capsys):
    model = tiny("dual_pixel_defocus", seed=6)
    weights = tmp_path / "dual_pixel_defocus_deblurring.pth"
    save_official_pth(model, weights)
    left = random_png(tmp_path / "left" / "x.png", 16, 16, seed=1)
    right = random_png(tmp_path / "right" / "x.png", 16, 16, seed=2)
    common = ["-w", str(weights), *TINY_NET_ARGS, "-o", str(tmp_path / "out")]
    assert main([str(tmp_path / "left"), "--right", str(tmp_path / "right"), *common]) == 0
    saved = read_image(tmp_path / "out" / "x.png")
    stacked = torch.from_numpy(np.concatenate([left, right], axis=2) / 255.0).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = (model(stacked)[0].clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    assert saved.shape == (16, 16, 3)
    assert np.abs(saved.astype(int) - expected.astype(int)).max() <= 1
    assert main([str(tmp_path / "left"), *common, "--overwrite"]) == 2
    assert "--right" in capsys.readouterr().err
    (tmp_path / "left" / "y.png").write_bytes((tmp_path / "left" / "x.png").read_bytes())
    assert main([str(tmp_path / "left"), "--right", str(tmp_path / "right"), *common, "--overwrite"]) == 2
    assert "no right view for y.png" in capsys.readouterr().err
    assert main([str(tmp_path / "left"), "--right", str(tmp_path / "right"), *common, "--self-ensemble"]) == 2


def test_an_input_is_never_overwritten(tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(tiny(), weights)
    original = random_png(tmp_path / "img.png", 8, 8)
    assert main([str(tmp_path / "img.png"), "-w", str(weights), "--preset", "default", *TINY_NET_ARGS,
                 "-o", str(tmp_path), "--overwrite"]) == 2
    assert "overwrite its input" in capsys.readouterr().err
    np.testing.assert_array_equal(read_image(tmp_path / "img.png"), original)
