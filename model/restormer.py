"""Restormer (Zamir et al., CVPR 2022), shaped like the official `restormer_arch.py` and equal to it.

Class, parameter and module names are swz30/Restormer's, so official weights load with strict=True,
and every module's forward(x) computes its own output, so hooks, wrappers (LoRA), frozen parts and
subclasses work as in any PyTorch model. Where the execution differs, for CPU speed (measured by
benchmarks/model_speed.py), it stays inside the module:

- activations are channels-last (the logical shape stays B,C,H,W): the depthwise convolutions take
  oneDNN's channels-last kernels, the LayerNorm is `F.layer_norm` on a permuted view, no copy, and
  the 1x1 convolutions (`Conv1x1`) are one GEMM on that view;
- MDTA normalises q and k after their (c x c) product, so no normalised copies are made (see
  `_attention`), and runs the small matrices in fp32;
- the LayerNorm runs in fp32 whatever the activations' dtype (DeepSpeed's bf16/fp16 weights too).

What training keeps for backward is decided from outside: `model.set_activations(net, mode)`
(model/activations.py), whose "lean" mode, the trainer's, recomputes each block's cheap per-pixel
work in backward (benchmarks/model_memory.py).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

LAYERNORM_TYPES = ("WithBias", "BiasFree")
EPS = 1e-5  # official LayerNorm epsilon
NORM_EPS = 1e-12  # F.normalize's default, used by the official q/k normalisation


def fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, where norms and softmaxes run whatever the activations' dtype (fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


class Conv1x1(nn.Conv2d):
    """nn.Conv2d(kernel_size=1) as one GEMM over the channels-last view. Its weight's gradient keeps the
    weight's strides (oneDNN's 1x1 kernels give it channels-last ones, which DDP would copy)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


class BiasFree_LayerNorm(nn.Module):
    """x / std * weight over the last axis: std taken about the mean, the mean NOT subtracted (official)."""

    def __init__(self, normalized_shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = fp32(x)
        return (t * torch.rsqrt(t.var(-1, keepdim=True, unbiased=False) + EPS) * fp32(self.weight)).to(x.dtype)


class WithBias_LayerNorm(nn.Module):
    """(x - mean) / std * weight + bias over the last axis."""

    def __init__(self, normalized_shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fp32(self.weight)
        return F.layer_norm(fp32(x), w.shape, w, fp32(self.bias), EPS).to(x.dtype)


class LayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels (eps 1e-5, biased variance)."""

    def __init__(self, dim: int, LayerNorm_type: str):
        super().__init__()
        if LayerNorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"LayerNorm_type must be one of {LAYERNORM_TYPES}, got {LayerNorm_type!r}")
        self.body = BiasFree_LayerNorm(dim) if LayerNorm_type == "BiasFree" else WithBias_LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # B,H,W,C is a free view of channels-last x (the official code copies through (b, hw, c)).
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    """GDFN: 1x1 expand to 2*hidden, depthwise 3x3, GELU(x1) * x2, 1x1 project."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden_features = int(dim * ffn_expansion_factor)
        self.project_in = Conv1x1(dim, hidden_features * 2, bias)
        self.dwconv = nn.Conv2d(hidden_features * 2, hidden_features * 2, kernel_size=3, stride=1, padding=1,
                                groups=hidden_features * 2, bias=bias)
        self.project_out = Conv1x1(hidden_features, dim, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class Attention(nn.Module):
    """MDTA: transposed (channel) attention per head, q and k L2-normalised over pixels."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = Conv1x1(dim, dim * 3, bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, stride=1, padding=1, groups=dim * 3, bias=bias)
        self.project_out = Conv1x1(dim, dim, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(_attention(q, k, v, self.temperature, self.num_heads)[0])


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor, num_heads: int
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """softmax(q^.k^ * temperature) applied to v per head, B,C,H,W like v; then, for the lean backward
    (model/activations.py), per head the fp32 product q.k (q^.k^ under fp16) and softmax, and the
    inverse norms of q and k.

    q^.k^ = (q.k) / (|q| |k|): the norms scale the small (c x c) product, no normalised copy of q or k
    is made or kept for backward (benchmarks/model_memory.py)."""
    q, k = _pixels(q), _pixels(k)
    inv_q, inv_k = _inverse_norm(q), _inverse_norm(k)
    if q.dtype == torch.float16:
        # An unnormalised q.k over h*w pixels can exceed fp16's range: normalise first there.
        q, k = q * inv_q.to(q.dtype), k * inv_k.to(k.dtype)
    head = q.shape[-1] // num_heads
    products, probs = [], []
    for i, (q_i, k_i) in enumerate(zip(_heads(q, num_heads), _heads(k, num_heads))):
        products.append(fp32(q_i.transpose(1, 2) @ k_i))
        scores = products[-1] * fp32(temperature[i])
        if q.dtype != torch.float16:
            sl = slice(i * head, (i + 1) * head)
            scores = scores * (inv_q[:, 0, sl, None] * inv_k[:, :, sl])
        probs.append(scores.softmax(dim=-1))
    return _attend(v, *(p.to(v.dtype) for p in probs)), products, probs, inv_q, inv_k


def _inverse_norm(t: torch.Tensor) -> torch.Tensor:
    """1 / max(||t||, eps) over the pixel axis of (b, hw, c), in fp32, as F.normalize divides."""
    return 1.0 / torch.linalg.vector_norm(t, dim=1, keepdim=True, dtype=fp32(t).dtype).clamp_min(NORM_EPS)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """B,C,H,W -> (b, h*w, c): a view when x is channels-last."""
    return rearrange(x, "b c h w -> b (h w) c")


def _heads(t: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """Per-head channel slices of (b, hw, c): strided views that BLAS reads directly."""
    return t.split(t.shape[-1] // num_heads, -1) if num_heads > 1 else (t,)


def _attend(v: torch.Tensor, *attns: torch.Tensor) -> torch.Tensor:
    """The heads' outputs v_i . attn_i^T side by side, B,C,H,W (channels-last) like v."""
    outs = [v_i @ attn.transpose(1, 2) for v_i, attn in zip(_heads(_pixels(v), len(attns)), attns)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return rearrange(out, "b (h w) c -> b c h w", h=v.shape[2], w=v.shape[3])


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, LayerNorm_type: str):
        super().__init__()
        self.norm1 = LayerNorm(dim, LayerNorm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, LayerNorm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.ffn(self.norm2(x))
        return x


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_c: int = 3, embed_dim: int = 48, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, stride=1, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """conv 3x3 n -> n/2, then PixelUnshuffle(2): n/2 * 4 = 2n channels at half resolution."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, stride=1, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """conv 3x3 n -> 2n, then PixelShuffle(2): n/2 channels at double resolution."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, stride=1, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _stage(n: int, dim: int, heads: int, ffn_expansion_factor: float, bias: bool,
           LayerNorm_type: str) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(dim, heads, ffn_expansion_factor, bias, LayerNorm_type)
                           for _ in range(n)])


class Restormer(nn.Module):
    """Restormer with the official constructor signature and defaults (the paper's model).

    Input B,C,H,W with H and W multiples of 8 (see `model.pad_to_multiple`); output contiguous and,
    except for the dual-pixel task, `input + residual`.
    """

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
                 bias: bool = False, LayerNorm_type: str = "WithBias", dual_pixel_task: bool = False):
        super().__init__()
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"num_blocks and heads need 4 entries (one per level), got {num_blocks}, {heads}")
        if not dual_pixel_task and inp_channels != out_channels:
            raise ValueError(f"the global residual needs inp_channels == out_channels, got "
                             f"{inp_channels} -> {out_channels}; only dual_pixel_task=True maps 6 -> 3")
        args = (ffn_expansion_factor, bias, LayerNorm_type)
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = _stage(num_blocks[0], dim, heads[0], *args)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = _stage(num_blocks[1], dim * 2, heads[1], *args)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = _stage(num_blocks[2], dim * 4, heads[2], *args)
        self.down3_4 = Downsample(dim * 4)
        self.latent = _stage(num_blocks[3], dim * 8, heads[3], *args)

        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = Conv1x1(dim * 8, dim * 4, bias)
        self.decoder_level3 = _stage(num_blocks[2], dim * 4, heads[2], *args)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = Conv1x1(dim * 4, dim * 2, bias)
        self.decoder_level2 = _stage(num_blocks[1], dim * 2, heads[1], *args)
        self.up2_1 = Upsample(dim * 2)
        # Level 1 of the decoder keeps the concatenated 2*dim channels (no reduction), as official.
        self.decoder_level1 = _stage(num_blocks[0], dim * 2, heads[0], *args)
        self.refinement = _stage(num_refinement_blocks, dim * 2, heads[0], *args)

        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = Conv1x1(dim, dim * 2, bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, stride=1, padding=1, bias=bias)
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d) and conv.weight.shape[1] == 1:  # depthwise
                conv.weight = nn.Parameter(_gradient_layout(conv.weight.detach()))

    def forward(self, inp_img: torch.Tensor) -> torch.Tensor:
        # Under DeepSpeed bf16/fp16 the weights are low precision (no autocast): the convolutions take
        # the input in their dtype, while the global residual adds the caller's (fp32) input, as under
        # autocast, so outputs are not quantised to bf16's 2^-8 steps.
        residual = inp_img.contiguous(memory_format=torch.channels_last)
        inp_enc_level1 = self.patch_embed(residual.to(self.output.weight.dtype))
        out_enc_level1 = self.encoder_level1(inp_enc_level1)
        out_enc_level2 = self.encoder_level2(self.down1_2(out_enc_level1))
        out_enc_level3 = self.encoder_level3(self.down2_3(out_enc_level2))
        latent = self.latent(self.down3_4(out_enc_level3))

        inp_dec_level3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), out_enc_level3], 1))
        out_dec_level3 = self.decoder_level3(inp_dec_level3)
        inp_dec_level2 = self.reduce_chan_level2(torch.cat([self.up3_2(out_dec_level3), out_enc_level2], 1))
        out_dec_level2 = self.decoder_level2(inp_dec_level2)
        out_dec_level1 = self.decoder_level1(torch.cat([self.up2_1(out_dec_level2), out_enc_level1], 1))
        out_dec_level1 = self.refinement(out_dec_level1)

        if self.dual_pixel_task:
            out = self.output(out_dec_level1 + self.skip_conv(inp_enc_level1))
        else:
            out = self.output(out_dec_level1) + residual
        return out.contiguous()


def _gradient_layout(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise weight with the strides oneDNN's channels-last convolutions give its gradient: they
    differ from contiguous ones in the size-1 axis only, so the memory and stride(-1) == 1 stay (DeepSpeed
    views weights as bytes). DDP's buckets take the parameters' strides and warn about, and copy, every
    gradient whose strides differ."""
    return torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)
