"""Restormer (Zamir et al., CVPR 2022), numerically equal to the official implementation, faster.

Parameter names and shapes equal swz30/Restormer's `restormer_arch.py`, so official weights load
with strict=True. The math is the official one; the execution differs (measured on CPU, see
benchmarks/model_speed.py):

- Activations live in channels-last memory (the logical shape stays B,C,H,W). The depthwise 3x3
  convolutions then take oneDNN's channels-last kernels (the official NCHW ones were ~1/3 of its
  step), LayerNorm is `F.layer_norm` over the contiguous last axis of a free permuted view (the
  official code copies through (b, hw, c) and back with ~8 elementwise kernels), and 1x1
  convolutions are plain GEMMs (`F.linear`) on that view.
- The 1x1 + depthwise pair in front of q/k/v and of the GDFN gate is computed per output chunk
  (channel slices of the same weights: identical math), so every chunk is a contiguous tensor and
  backward needs no concatenation.
- The GDFN hidden width (int(2.66 * dim) = 127, 255, 510, 1021) is zero-padded to a multiple of 16
  inside the graph: MKL's GEMMs with such odd widths ran ~1.8x slower (~10% of the 64x64 step).
- MDTA normalises q and k AFTER their (c x c) product: q^.k^ = (q.k) / (|q| |k|). No normalised
  copies of q and k are made or kept for backward; the scale, temperature and softmax are applied
  in fp32 to the small (c x c) matrix. (Under fp16 q and k are normalised first: see Attention.)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

LAYERNORM_TYPES = ("WithBias", "BiasFree")
_EPS = 1e-5  # official LayerNorm epsilon
_NORM_EPS = 1e-12  # F.normalize's default, used by the official q/k normalisation
_HIDDEN_MULTIPLE = 16  # GDFN hidden width is padded to this (AVX-512 holds 16 fp32)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """B,C,H,W -> B,H,W,C as a view: contiguous when x is channels-last."""
    return x.permute(0, 2, 3, 1)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one GEMM over the channels-last view; returns a channels-last tensor."""
    return F.linear(_tokens(x), weight.flatten(1), bias).permute(0, 3, 1, 2)


def _split_pointwise_dw(x: torch.Tensor, w_pw: Sequence[torch.Tensor], b_pw: Sequence[torch.Tensor | None],
                        w_dw: Sequence[torch.Tensor], b_dw: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """depthwise(pointwise(x)) for each output chunk's weights (per-channel ops: the chunks are independent)."""
    return [F.conv2d(_pointwise(x, wp, bp), wd, bd, padding=1, groups=wd.shape[0])
            for wp, bp, wd, bd in zip(w_pw, b_pw, w_dw, b_dw)]


def _chunks(conv: nn.Conv2d, parts: int, pad: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """conv's weight and bias split into `parts` output chunks, each padded with `pad` zero channels."""
    weights, biases = list(conv.weight.chunk(parts)), [None] * parts
    if conv.bias is not None:
        biases = list(conv.bias.chunk(parts))
    if pad:
        weights = [F.pad(w, (0, 0, 0, 0, 0, 0, 0, pad)) for w in weights]
        biases = [b if b is None else F.pad(b, (0, pad)) for b in biases]
    return weights, biases


def _inverse_norm(t: torch.Tensor) -> torch.Tensor:
    """1 / max(||t||, eps) over the pixel axis of (b, hw, c), in fp32, as F.normalize divides."""
    return 1.0 / torch.linalg.vector_norm(t, dim=1, keepdim=True, dtype=torch.float32).clamp_min(_NORM_EPS)


class _ChannelNorm(nn.Module):
    """Parameter holder with the official names (`body.weight`, `body.bias`)."""

    def __init__(self, dim: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None


class LayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels (eps 1e-5, biased variance), computed in fp32.

    'WithBias': (x - mean) / std * weight + bias.
    'BiasFree': x / std * weight, std taken about the mean but the mean NOT subtracted (official).
    """

    def __init__(self, dim: int, LayerNorm_type: str = "WithBias"):
        super().__init__()
        if LayerNorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"LayerNorm_type must be one of {LAYERNORM_TYPES}, got {LayerNorm_type!r}")
        self.bias_free = LayerNorm_type == "BiasFree"
        self.body = _ChannelNorm(dim, with_bias=not self.bias_free)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = _tokens(x).float()
        if self.bias_free:
            # Two-pass variance written out: Tensor.var over a short last axis (16 to 384 channels)
            # ran 5-15x slower on CPU than these kernels (same math; results agree to ~1e-7).
            centered = t - t.mean(dim=-1, keepdim=True)
            var = centered.square().mean(dim=-1, keepdim=True)
            y = t * torch.rsqrt(var + _EPS) * self.body.weight.float()
        else:
            # F.layer_norm needs weight and bias in the activations' dtype: under DeepSpeed bf16/fp16
            # the parameters are low precision while the norm runs in fp32 (`.float()` is free in fp32).
            y = F.layer_norm(t, self.body.weight.shape, self.body.weight.float(), self.body.bias.float(), _EPS)
        return y.to(x.dtype).permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    """GDFN: 1x1 expand to 2*hidden, depthwise 3x3, GELU(x1) * x2, 1x1 project."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The two halves are computed apart (channel slices of the same weights, so the math is
        # unchanged): each is a contiguous channels-last tensor, which GELU and the product
        # vectorise well, and backward needs no concatenation. The hidden width (2.66 * dim: 127,
        # 255, 510, 1021) is padded with zero channels to a multiple of 16: MKL's GEMMs with an odd
        # output width ran ~1.8x slower here. The padded channels stay exactly zero (GELU(0) * 0)
        # and meet zero columns of project_out, so they add nothing; their weight slices get no
        # gradient because the padding is applied to the parameters inside the graph. ONNX export
        # gets no padding: its convolutions need weights of static shape, and the padding only
        # serves MKL.
        pad = 0 if torch.onnx.is_in_onnx_export() else -self.project_out.weight.shape[1] % _HIDDEN_MULTIPLE
        x1, x2 = _split_pointwise_dw(x, *_chunks(self.project_in, 2, pad), *_chunks(self.dwconv, 2, pad))
        w_out = F.pad(self.project_out.weight, (0, 0, 0, 0, 0, pad)) if pad else self.project_out.weight
        return _pointwise(F.gelu(x1) * x2, w_out, self.project_out.bias)


class Attention(nn.Module):
    """MDTA: transposed (channel) attention per head, q and k L2-normalised over pixels."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = (rearrange(t, "b c h w -> b (h w) c")
                   for t in _split_pointwise_dw(x, *_chunks(self.qkv, 3), *_chunks(self.qkv_dwconv, 3)))
        inv_q, inv_k = _inverse_norm(q), _inverse_norm(k)
        if q.dtype == torch.float16:
            # An unnormalised q.k over h*w pixels can exceed fp16's range: normalise first there.
            q, k = q * inv_q.to(q.dtype), k * inv_k.to(k.dtype)
        head = c // self.num_heads
        outs = []
        # Per-head slices of the (b, hw, c) tensors are strided views that BLAS reads directly.
        for i, (q_i, k_i, v_i) in enumerate(zip(q.split(head, -1), k.split(head, -1), v.split(head, -1))):
            scores = (q_i.transpose(1, 2) @ k_i).float() * self.temperature[i].float()
            if q.dtype != torch.float16:
                sl = slice(i * head, (i + 1) * head)
                scores = scores * (inv_q[:, 0, sl, None] * inv_k[:, :, sl])
            attn = scores.softmax(dim=-1).to(v_i.dtype)
            outs.append(v_i @ attn.transpose(1, 2))  # (b, hw, head): already channels-last
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        out = F.linear(out, self.project_out.weight.flatten(1), self.project_out.bias)
        return rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                 LayerNorm_type: str):
        super().__init__()
        self.norm1 = LayerNorm(dim, LayerNorm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, LayerNorm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)
        self.checkpointing = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_c: int = 3, embed_dim: int = 48, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """conv 3x3 n -> n/2, then PixelUnshuffle(2): n/2 * 4 = 2n channels at half resolution."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """conv 3x3 n -> 2n, then PixelShuffle(2): n/2 channels at double resolution."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _stage(n: int, dim: int, heads: int, ffn_expansion_factor: float, bias: bool,
           LayerNorm_type: str) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(dim, heads, ffn_expansion_factor, bias, LayerNorm_type)
                           for _ in range(n)])


class Restormer(nn.Module):
    """Restormer with the official constructor signature and defaults (the paper's model).

    Input B,C,H,W with H and W multiples of 8 (see `model.pad_to_multiple`); output has the
    input's memory layout convention (contiguous) and, except for the dual-pixel task, is
    `input + residual`.
    """

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
                 bias: bool = False, LayerNorm_type: str = "WithBias", dual_pixel_task: bool = False,
                 checkpointing: bool = False):
        super().__init__()
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"num_blocks and heads need 4 entries (one per level), got {num_blocks}, {heads}")
        if not dual_pixel_task and inp_channels != out_channels:
            raise ValueError(f"the global residual needs inp_channels == out_channels, got "
                             f"{inp_channels} -> {out_channels}; only dual_pixel_task=True maps 6 -> 3")
        args = (ffn_expansion_factor, bias, LayerNorm_type)
        d1, d2, d3, d4 = dim, dim * 2, dim * 4, dim * 8
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = _stage(num_blocks[0], d1, heads[0], *args)
        self.down1_2 = Downsample(d1)
        self.encoder_level2 = _stage(num_blocks[1], d2, heads[1], *args)
        self.down2_3 = Downsample(d2)
        self.encoder_level3 = _stage(num_blocks[2], d3, heads[2], *args)
        self.down3_4 = Downsample(d3)
        self.latent = _stage(num_blocks[3], d4, heads[3], *args)

        self.up4_3 = Upsample(d4)
        self.reduce_chan_level3 = nn.Conv2d(d4, d3, kernel_size=1, bias=bias)
        self.decoder_level3 = _stage(num_blocks[2], d3, heads[2], *args)
        self.up3_2 = Upsample(d3)
        self.reduce_chan_level2 = nn.Conv2d(d3, d2, kernel_size=1, bias=bias)
        self.decoder_level2 = _stage(num_blocks[1], d2, heads[1], *args)
        self.up2_1 = Upsample(d2)
        # Level 1 of the decoder keeps the concatenated 2*dim channels (no reduction), as official.
        self.decoder_level1 = _stage(num_blocks[0], d2, heads[0], *args)
        self.refinement = _stage(num_refinement_blocks, d2, heads[0], *args)

        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(d1, d2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(d2, out_channels, kernel_size=3, padding=1, bias=bias)
        self.set_checkpointing(checkpointing)

    def set_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer block in backward instead of storing its activations."""
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                module.checkpointing = bool(enabled)

    def forward(self, inp_img: torch.Tensor) -> torch.Tensor:
        # Under DeepSpeed bf16/fp16 the weights are low precision (no autocast): the convolutions take
        # the input in their dtype, while the global residual adds the caller's (fp32) input, as under
        # autocast, so outputs are not quantised to bf16's 2^-8 steps.
        residual = inp_img.contiguous(memory_format=torch.channels_last)
        x = residual.to(self.output.weight.dtype)
        inp_enc_level1 = self.patch_embed(x)
        out_enc_level1 = self.encoder_level1(inp_enc_level1)
        out_enc_level2 = self.encoder_level2(self.down1_2(out_enc_level1))
        out_enc_level3 = self.encoder_level3(self.down2_3(out_enc_level2))
        latent = self.latent(self.down3_4(out_enc_level3))

        dec3 = _pointwise(torch.cat([self.up4_3(latent), out_enc_level3], 1),
                          self.reduce_chan_level3.weight, self.reduce_chan_level3.bias)
        dec3 = self.decoder_level3(dec3)
        dec2 = _pointwise(torch.cat([self.up3_2(dec3), out_enc_level2], 1),
                          self.reduce_chan_level2.weight, self.reduce_chan_level2.bias)
        dec2 = self.decoder_level2(dec2)
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), out_enc_level1], 1))
        dec1 = self.refinement(dec1)

        if self.dual_pixel_task:
            out = self.output(dec1 + _pointwise(inp_enc_level1, self.skip_conv.weight, self.skip_conv.bias))
        else:
            out = self.output(dec1) + residual
        return out.contiguous()
