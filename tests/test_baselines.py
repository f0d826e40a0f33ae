"""Classical denoisers beside the model: scored on the same noisy images, best h really the best."""

import numpy as np
import pytest
import torch
from skimage import data
from skimage.restoration import denoise_nl_means

from train.baselines import NLM_H_FACTORS, classical_baselines
from train.config import ConfigError, load_config
from train.metrics import psnr


def _items(sigma):
    rng = np.random.default_rng(0)
    items = []
    for image in (data.astronaut()[100:164, 180:260], data.coffee()[:48, :72]):
        clean = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
        noisy = clean + torch.from_numpy(rng.normal(0, sigma / 255, clean.shape).astype(np.float32))
        items.append({"input": noisy, "target": clean})
    return items


def test_filters_beat_the_noisy_input_and_h_is_the_best_of_the_grid():
    items = _items(25)
    result = classical_baselines(items, 25)
    assert result.images == 2 and result.nl_means_h in NLM_H_FACTORS
    assert result.wavelet.psnr > result.noisy.psnr + 3 and result.nl_means.psnr > result.noisy.psnr + 3
    assert result.nl_means.ssim > result.noisy.ssim
    noisy_psnr = np.mean([psnr(item["input"], item["target"]).item() for item in items])
    assert result.noisy.psnr == pytest.approx(noisy_psnr)
    for factor in NLM_H_FACTORS:  # the walk found the grid's best: no other h scores better
        scores = []
        for item in items:
            noisy = item["input"][0].permute(1, 2, 0).double().numpy()
            out = denoise_nl_means(noisy, h=factor * 25 / 255, sigma=25 / 255, fast_mode=True, patch_size=5,
                                   patch_distance=6, channel_axis=-1)
            scores.append(psnr(torch.from_numpy(out.transpose(2, 0, 1).copy())[None], item["target"]).item())
        assert np.mean(scores) <= result.nl_means.psnr + 1e-9
    assert set(result.to_dict()) >= {"nl_means/psnr", "wavelet/ssim", "noisy/psnr", "nl_means_h_over_sigma"}


def test_baselines_need_a_known_noise_level():
    with pytest.raises(ConfigError, match="data.noise_sigma"):
        load_config("demo", ["data.noise_sigma=null", "data.noise_sigma_range=[0,50]"])
    assert load_config("demo").val.classical_baselines
