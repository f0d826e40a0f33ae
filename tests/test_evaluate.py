"""python -m tools.evaluate: paired folders, clean + seeded Gaussian noise, shards; CSV and summary."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_NET_ARGS, image_bomb, tiny_net, write_png
from model import save_safetensors
from tools.evaluate import main, noisy_copy

TINY_ARGS = ["--preset", "default", *TINY_NET_ARGS]


@pytest.fixture
def identity_weights(tmp_path):
    """A model whose output equals its input: restored metrics must equal the degraded input's."""
    path = tmp_path / "identity.safetensors"
    save_safetensors(tiny_net(identity=True), path)
    return path


def smooth_image(seed, height=24, width=32):
    """Mid-range content, so sigma-25 noise is almost never clipped by the metrics' clamp."""
    rng = np.random.default_rng(seed)
    return rng.integers(96, 160, (height, width, 3)).astype(np.uint8)


def test_paired_folders_score_a_hand_computed_degradation(tmp_path, identity_weights, capsys):
    for name in ("1.png", "2.png"):
        target = smooth_image(int(name[0]))
        write_png(tmp_path / "target" / name, target)
        write_png(tmp_path / "input" / name, target + 26)  # every sample off by 26/255
    csv = tmp_path / "eval" / "per_image.csv"
    assert main(["-w", str(identity_weights), *TINY_ARGS, "--input", str(tmp_path / "input"),
                 "--target", str(tmp_path / "target"), "--y-channel", "--csv", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert list(table["image"]) == ["1.png", "2.png"]
    assert {"psnr", "ssim", "psnr_y", "ssim_y", "psnr_degraded", "ssim_degraded", "psnr_y_degraded",
            "ssim_y_degraded", "height", "width", "seconds"} <= set(table.columns)
    expected = 20 * math.log10(255 / 26)
    assert table["psnr"].tolist() == pytest.approx([expected] * 2, abs=1e-5)
    assert table["psnr"].tolist() == pytest.approx(table["psnr_degraded"].tolist(), abs=1e-9)
    # On Y the offset shrinks by (65.481 + 128.553 + 24.966) / 255.
    assert table["psnr_y"].tolist() == pytest.approx([20 * math.log10(255 / (26 * 219 / 255))] * 2, abs=1e-4)
    out = capsys.readouterr().out
    assert "restored" in out and "degraded input" in out and "PSNR-Y" in out and f"{expected:.2f}" in out


def test_gaussian_noise_is_seeded_per_image_name(tmp_path, identity_weights):
    same = smooth_image(0)
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / "clean" / name, same)  # identical content, so only the noise differs
    common = ["-w", str(identity_weights), *TINY_ARGS, "--target", str(tmp_path / "clean"), "--sigma", "25"]
    assert main([*common, "--csv", str(tmp_path / "run1.csv")]) == 0
    assert main([*common, "--csv", str(tmp_path / "run2.csv")]) == 0
    assert main([*common, "--csv", str(tmp_path / "first.csv"), "--max-images", "1"]) == 0
    assert main([*common, "--csv", str(tmp_path / "seed1.csv"), "--seed", "1"]) == 0
    run1, run2 = pd.read_csv(tmp_path / "run1.csv"), pd.read_csv(tmp_path / "run2.csv")
    pd.testing.assert_frame_equal(run1.drop(columns="seconds"), run2.drop(columns="seconds"))
    assert pd.read_csv(tmp_path / "first.csv")["psnr_degraded"][0] == run1["psnr_degraded"][0]
    assert run1["psnr_degraded"].nunique() == 3  # same picture, different names: different noise
    assert not np.allclose(pd.read_csv(tmp_path / "seed1.csv")["psnr_degraded"], run1["psnr_degraded"])
    # sigma 25 in 0-255 units: PSNR of the noisy input is about 20 log10(255 / 25) = 20.17 dB.
    assert run1["psnr_degraded"].mean() == pytest.approx(20 * math.log10(255 / 25), abs=0.3)


def test_noise_is_not_clipped_and_depends_only_on_seed_and_key():
    clean = torch.full((1, 3, 16, 16), 0.02)
    noisy = noisy_copy(clean, 25, seed=0, key="x.png")
    assert noisy.min() < 0  # the paper's protocol: the network sees unclipped noise
    assert torch.equal(noisy, noisy_copy(clean, 25, seed=0, key="x.png"))
    assert not torch.equal(noisy, noisy_copy(clean, 25, seed=0, key="y.png"))
    assert (noisy - clean).std().item() == pytest.approx(25 / 255, rel=0.15)


def test_shards_give_the_same_scores_as_the_folders(tmp_path, identity_weights):
    pack = pytest.importorskip("data_shards.pack")
    for i in range(3):
        target = smooth_image(10 + i)
        write_png(tmp_path / "target" / f"{i}.png", target)
        write_png(tmp_path / "input" / f"{i}.png", target // 2)
    assert pack.main(["--input", str(tmp_path / "input"), "--target", str(tmp_path / "target"),
                      "--out", str(tmp_path / "shards"), "--no-progress"]) == 0
    common = ["-w", str(identity_weights), *TINY_ARGS]
    assert main([*common, "--shards", str(tmp_path / "shards" / "train"), "--csv", str(tmp_path / "s.csv")]) == 0
    assert main([*common, "--input", str(tmp_path / "input"), "--target", str(tmp_path / "target"),
                 "--csv", str(tmp_path / "f.csv")]) == 0
    from_shards, from_folders = pd.read_csv(tmp_path / "s.csv"), pd.read_csv(tmp_path / "f.csv")
    assert len(from_shards) == 3
    assert sorted(from_shards["psnr"]) == pytest.approx(sorted(from_folders["psnr"]), abs=1e-6)


@pytest.mark.parametrize("args,message", [
    ([], "give --target"),
    (["--target", "T"], "exactly one of --input"),
    (["--target", "T", "--input", "I", "--sigma", "25"], "exactly one of --input"),
    (["--shards", "S", "--target", "T"], "--shards replaces"),
])
def test_inconsistent_data_options_are_explained(identity_weights, capsys, args, message):
    assert main(["-w", str(identity_weights), *TINY_ARGS, *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_pairs_and_size_mismatches_name_the_file(tmp_path, identity_weights, capsys):
    write_png(tmp_path / "input" / "a.png", smooth_image(0))
    write_png(tmp_path / "input" / "b.png", smooth_image(1))
    write_png(tmp_path / "target" / "a.png", smooth_image(0, 16, 16))
    common = ["-w", str(identity_weights), *TINY_ARGS, "--input", str(tmp_path / "input"),
              "--target", str(tmp_path / "target"), "--csv", str(tmp_path / "e.csv")]
    assert main(common) == 2
    assert "no target for b.png" in capsys.readouterr().err
    (tmp_path / "input" / "b.png").unlink()
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "skipped: " in err and "a.png" in err and "differ in size" in err
    assert "none of the 1 images could be scored" in err


def test_undecodable_and_over_limit_images_are_skipped_and_the_rest_scored(tmp_path, identity_weights, capsys):
    for name in ("a.png", "c.png"):
        write_png(tmp_path / "clean" / name, smooth_image(0))
    image_bomb(tmp_path / "clean" / "b.png", 12000, 12000, bits=16)
    (tmp_path / "clean" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    csv = tmp_path / "e.csv"
    assert main(["-w", str(identity_weights), *TINY_ARGS, "--target", str(tmp_path / "clean"), "--sigma", "5",
                 "--csv", str(csv)]) == 1
    captured = capsys.readouterr()
    assert "b.png: 12000x12000 is 144,000,000 pixels, over the limit" in captured.err
    assert "d.png: cannot decode" in captured.err and "1 image(s) over --max-pixels" in captured.err
    assert "2 skipped (named above), not in the means" in captured.out
    assert list(pd.read_csv(csv)["image"]) == ["a.png", "c.png"]


def test_restored_images_can_be_saved(tmp_path, identity_weights):
    target = smooth_image(3)
    write_png(tmp_path / "clean" / "x.png", target)
    assert main(["-w", str(identity_weights), *TINY_ARGS, "--target", str(tmp_path / "clean"), "--sigma", "5",
                 "--csv", str(tmp_path / "e.csv"), "--save-images", str(tmp_path / "restored"),
                 "--border", "2"]) == 0
    assert (tmp_path / "restored" / "x.png").is_file()
