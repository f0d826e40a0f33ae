"""Restormer (Zamir et al., CVPR 2022), numerically equal to the official implementation, faster and leaner.

Parameter names and shapes equal swz30/Restormer's `restormer_arch.py`, so official weights load
with strict=True. The math is the official one; the execution differs (measured on CPU, see
benchmarks/model_speed.py and benchmarks/model_memory.py):

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
- The BiasFree LayerNorm takes its statistics from the fused LayerNorm kernel and has its backward
  written out (`_BiasFreeNorm`): spelt in tensor ops it kept three copies of its input for backward
  and its backward ran ~2.5x slower.

Training memory. What autograd keeps between forward and backward decides the largest patch and
batch a GPU takes. Per transformer block of c channels, plain autograd keeps ~27 values per pixel
and channel (the official code ~33). Most of them are outputs of cheap per-pixel work: the
normalised copies in front of the projections, the depthwise outputs q, k, v and the GDFN's two,
GELU's output and the gate's product (a LayerNorm, a depthwise 3x3 convolution costs 9
multiply-adds per value against c for a 1x1 projection, GELU and a product). The default training
path ("lean", ACTIVATION_MODES) keeps the inputs of that work instead and recomputes it in backward:
- `_RecomputeThenProject` for the LayerNorms in front of q/k/v and of the GDFN, and for the GDFN's
  depthwise convolution and gate in front of its output projection: it keeps what goes in (the block
  input, the midway residual, the two depthwise inputs), recomputes the work in backward under the
  forward's autocast state, writes the projections' two GEMMs out and leaves the work's own backward
  to autograd on the recomputed graph;
- `_AttentionCore` for MDTA between its depthwise inputs and the heads' output: it keeps the inputs
  and the small (c x c) products and softmaxes, recomputes q, k, v by their depthwise convolution and
  writes the attention's backward out (no product over the pixels and no norm runs twice; the norm's
  gradient is added in the same pass as the product's).
The GEMMs run once forward and twice backward, as with plain autograd. Kept per block: the block
input, the q/k/v projections, the heads' output, the midway residual and the two GDFN projections,
~11 values per pixel and channel: measured with benchmarks/model_memory.py, 0.37-0.40x the official
code's allocated activation bytes per pixel in fp32 (0.42-0.48x on the peak-RSS slope) and ~0.2x
under bf16 autocast, for <10% more step time on 2 CPU cores (docs/performance.md). Functions, not
torch.utils.checkpoint with a selective-recompute policy, because that policy routes every operator
of the block through a Python dispatch mode: measured on CPU at 64 px, +35% step time for the same
memory. The heads' output stays kept: recomputing its v.attn products for project_out's weight
gradient cost +4.5% step time for 8% less memory. "checkpoint" (`model.checkpointing=true`)
recomputes whole blocks and keeps only their inputs, for when even lean does not fit; "plain" keeps
what autograd keeps. Under torch.compile the compiler's own partitioner decides what backward
recomputes, and inference runs the plain ops.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

LAYERNORM_TYPES = ("WithBias", "BiasFree")
# What training keeps for backward: "lean" (the default) recomputes the cheap per-pixel work,
# "plain" keeps what autograd keeps, "checkpoint" keeps only each block's input.
ACTIVATION_MODES = ("lean", "plain", "checkpoint")
_EPS = 1e-5  # official LayerNorm epsilon
_NORM_EPS = 1e-12  # F.normalize's default, used by the official q/k normalisation
_HIDDEN_MULTIPLE = 16  # GDFN hidden width is padded to this (AVX-512 holds 16 fp32)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """B,C,H,W -> B,H,W,C as a view: contiguous when x is channels-last."""
    return x.permute(0, 2, 3, 1)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one GEMM over the channels-last view; returns a channels-last tensor."""
    return F.linear(_tokens(x), weight.flatten(1), bias).permute(0, 3, 1, 2)


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


class _RecomputeThenProject(torch.autograd.Function):
    """outputs[i] = linear(f(*args), weights[i], biases[i]); only f's args are kept for backward.

    f is cheap per-pixel work (a LayerNorm; the GDFN's depthwise convolution and GELU gate) whose
    output autograd would keep for the projections' weight gradients; the projections are the GEMMs
    not worth recomputing. Backward recomputes f (under the forward's autocast state), writes the
    projections' two GEMMs out, and leaves f's backward to autograd on the recomputed graph, or to
    f's own `recompute` and `vjp` where it has them (the LayerNorm: `_NORM`).
    """

    @staticmethod
    def forward(ctx, f, n_args: int, n_proj: int, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        args, weights, biases = tensors[:n_args], tensors[n_args:n_args + n_proj], tensors[n_args + n_proj:]
        z = f(*args)
        ctx.f, ctx.n_args, ctx.n_proj = f, n_args, n_proj
        ctx.autocast = _autocast_state(z.device.type)
        ctx.save_for_backward(*args, *weights)
        return tuple(_pointwise(z, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        saved = ctx.saved_tensors
        args, weights = saved[:ctx.n_args], saved[ctx.n_args:]
        needs = ctx.needs_input_grad[3:]  # f's args, the weights, the biases
        wanted, weights_wanted, biases_wanted = needs[:ctx.n_args], needs[ctx.n_args:-ctx.n_proj], needs[-ctx.n_proj:]
        by_hand = hasattr(ctx.f, "vjp")
        if by_hand:
            with torch.autocast(**ctx.autocast):
                z, kept = ctx.f.recompute(*args)
        else:
            leaves = [a.detach().requires_grad_(w) if a is not None else None for a, w in zip(args, wanted)]
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                z = ctx.f(*leaves)
        z_rows = _tokens(z).reshape(-1, z.shape[1])
        grad_rows, grad_weights, grad_biases = None, [], []
        for grad, w, want_w, want_b in zip(grads, weights, weights_wanted, biases_wanted):
            g = _tokens(grad).reshape(-1, grad.shape[1])
            w2 = w.flatten(1).to(g.dtype)
            grad_weights.append((g.t() @ z_rows.to(g.dtype)).view_as(w).to(w.dtype) if want_w else None)
            grad_biases.append(g.sum(0).to(w.dtype) if want_b else None)
            grad_rows = g @ w2 if grad_rows is None else grad_rows.addmm_(g, w2)
        grad_z = grad_rows.view(_tokens(z).shape).permute(0, 3, 1, 2).to(z.dtype)
        grad_args = ctx.f.vjp(args, kept, grad_z, wanted) if by_hand else _grads_of(leaves, z, grad_z)
        return (None, None, None, *grad_args, *grad_weights, *grad_biases)


def _grads_of(leaves: Sequence[torch.Tensor | None], outputs, grads) -> list[torch.Tensor | None]:
    """Gradients of `outputs` (given theirs) for each leaf that requires one, None for the others."""
    wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
    found = iter(torch.autograd.grad(outputs, wanted, grads) if wanted else ())
    return [next(found) if leaf is not None and leaf.requires_grad else None for leaf in leaves]


def _autocast_state(device_type: str) -> dict:
    enabled = torch.is_autocast_enabled(device_type)
    return {"device_type": device_type, "enabled": enabled,
            "dtype": torch.get_autocast_dtype(device_type)}


def _project(f, args: tuple[torch.Tensor | None, ...], weights: Sequence[torch.Tensor],
             biases: Sequence[torch.Tensor | None], lean: bool) -> list[torch.Tensor]:
    """[linear(f(*args), w, b) for each projection]; lean: f's output is recomputed in backward, not kept."""
    if lean:
        return list(_RecomputeThenProject.apply(f, len(args), len(weights), *args, *weights, *biases))
    z = f(*args)
    return [_pointwise(z, w, b) for w, b in zip(weights, biases)]


class _ChannelNorm(nn.Module):
    """Parameter holder with the official names (`body.weight`, `body.bias`)."""

    def __init__(self, dim: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per-pixel LayerNorm over channels in fp32 (eps 1e-5, biased variance); BiasFree when bias is None."""
    # Under DeepSpeed bf16/fp16 the parameters are low precision while the norm runs in fp32
    # (`.float()` is free in fp32).
    t, w = _tokens(x).float(), weight.float()
    y = _BiasFreeNorm.apply(t, w) if bias is None else F.layer_norm(t, w.shape, w, bias.float(), _EPS)
    return y.to(x.dtype).permute(0, 3, 1, 2)


class _BiasFreeNorm(torch.autograd.Function):
    """t / std(t) * weight over the last axis, std taken about the mean (the official BiasFree norm).

    The statistics come from the fused LayerNorm kernel and backward is written out: the norm spelt
    in tensor ops (mean, centre, square, mean, rsqrt, two products) had a backward ~2.5x slower, and
    Tensor.var ~3x slower in forward on CPU (16 to 384 channels).
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y, mean, rstd = _bias_free(t, weight)
        ctx.save_for_backward(t, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _bias_free_backward(grad, *ctx.saved_tensors)


def _bias_free(t: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t * rstd * weight, mean, rstd): the fused kernel's (t - mean) * rstd * weight plus mean * rstd *
    weight in place, without a temporary the size of t."""
    y, mean, rstd = torch.native_layer_norm(t, weight.shape, weight, None, _EPS)
    return y.addcmul_(mean * rstd, weight), mean, rstd


def _bias_free_backward(grad: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """With r = rstd and C channels: d/dt = r * g * w - r^3 * (t - mean) * mean(g * w * t), and
    d/dw = the sum over pixels of g * t * r."""
    grad_t_rows = (grad * t).reshape(-1, t.shape[-1])
    r = rstd.reshape(-1)
    grad_weight = grad_t_rows.t() @ r
    coef = (r.pow(3) * (grad_t_rows @ weight) / t.shape[-1]).view_as(rstd)
    return (grad * weight).mul_(rstd).sub_((t - mean).mul_(coef)), grad_weight


class _LayerNormWork:
    """_layer_norm as _RecomputeThenProject's f, with its backward written out: autograd recomputing it
    and differentiating the recomputed graph cost ~1% more step time (nested autograd per block)."""

    def __call__(self, x, weight, bias):
        return _layer_norm(x, weight, bias)

    @staticmethod
    def recompute(x, weight, bias):
        t, w = _tokens(x).float(), weight.float()
        if bias is None:
            y, mean, rstd = _bias_free(t, w)
        else:
            y, mean, rstd = torch.native_layer_norm(t, w.shape, w, bias.float(), _EPS)
        return y.to(x.dtype).permute(0, 3, 1, 2), (t, w, mean, rstd)

    @staticmethod
    def vjp(args, kept, grad_z, wanted):
        (x, weight, bias), (t, w, mean, rstd) = args, kept
        grad = _tokens(grad_z).float()
        if bias is None:
            grad_t, grad_w = _bias_free_backward(grad, t, w, mean, rstd)
            grad_b = None
        else:
            grad_t, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad, t, w.shape, mean, rstd, w, bias.float(), [wanted[0], wanted[1], wanted[2]])
        return (grad_t.to(x.dtype).permute(0, 3, 1, 2) if wanted[0] else None,
                grad_w.to(weight.dtype) if wanted[1] else None,
                grad_b.to(bias.dtype) if wanted[2] else None)


_NORM = _LayerNormWork()


class LayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels (eps 1e-5, biased variance), computed in fp32.

    'WithBias': (x - mean) / std * weight + bias.
    'BiasFree': x / std * weight, std taken about the mean but the mean NOT subtracted (official).
    """

    def __init__(self, dim: int, LayerNorm_type: str = "WithBias"):
        super().__init__()
        if LayerNorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"LayerNorm_type must be one of {LAYERNORM_TYPES}, got {LayerNorm_type!r}")
        self.body = _ChannelNorm(dim, with_bias=LayerNorm_type == "WithBias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_norm(x, self.body.weight, self.body.bias)

    def project(self, x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                lean: bool) -> list[torch.Tensor]:
        """1x1 projections of the normalised x (lean: see _project)."""
        return _project(_NORM, (x, self.body.weight, self.body.bias), weights, biases, lean)


class FeedForward(nn.Module):
    """GDFN: 1x1 expand to 2*hidden, depthwise 3x3, GELU(x1) * x2, 1x1 project."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, norm: LayerNorm, x: torch.Tensor, lean: bool) -> torch.Tensor:
        """GDFN of norm(x) (lean: see _project)."""
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
        (w1, w2), (b1, b2) = _chunks(self.dwconv, 2, pad)
        w_out = F.pad(self.project_out.weight, (0, 0, 0, 0, 0, pad)) if pad else self.project_out.weight
        x1, x2 = norm.project(x, *_chunks(self.project_in, 2, pad), lean)
        return _project(_gelu_gate, (x1, x2, w1, w2, b1, b2), [w_out], [self.project_out.bias], lean)[0]


def _gelu_gate(x1: torch.Tensor, x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               b1: torch.Tensor | None, b2: torch.Tensor | None) -> torch.Tensor:
    """GELU(depthwise(x1)) * depthwise(x2): the GDFN's gate."""
    gate = F.gelu(_depthwise(x1, w1, b1))
    # In place where autograd keeps nothing (no fewer values, one allocation less for the heap to fit).
    return gate * _depthwise(x2, w2, b2) if torch.is_grad_enabled() else gate.mul_(_depthwise(x2, w2, b2))


def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x, weight, bias, padding=1, groups=weight.shape[0])


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

    def forward(self, norm: LayerNorm, x: torch.Tensor, lean: bool) -> torch.Tensor:
        """MDTA of norm(x) (lean: see _project and _AttentionCore)."""
        pre_q, pre_k, pre_v = norm.project(x, *_chunks(self.qkv, 3), lean)
        (w_q, w_k, w_v), (b_q, b_k, b_v) = _chunks(self.qkv_dwconv, 3)
        if lean:
            out = _AttentionCore.apply(self.num_heads, pre_q, pre_k, pre_v, w_q, w_k, w_v, b_q, b_k, b_v,
                                       self.temperature)
        else:
            q, k, v = (_depthwise(*t) for t in ((pre_q, w_q, b_q), (pre_k, w_k, b_k), (pre_v, w_v, b_v)))
            out = _attention(q, k, v, self.temperature, self.num_heads)[0]
        return _pointwise(out, self.project_out.weight, self.project_out.bias)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor, num_heads: int
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The heads' outputs softmax(q^.k^ T) applied to v, side by side (B,C,H,W like v), and per head
    the fp32 product q.k (or q^.k^ under fp16) and softmax, and the inverse norms of q and k."""
    q, k = _pixels(q), _pixels(k)
    inv_q, inv_k = _inverse_norm(q), _inverse_norm(k)
    if q.dtype == torch.float16:
        # An unnormalised q.k over h*w pixels can exceed fp16's range: normalise first there.
        q, k = q * inv_q.to(q.dtype), k * inv_k.to(k.dtype)
    head = q.shape[-1] // num_heads
    products, probs = [], []
    for i, (q_i, k_i) in enumerate(zip(_heads(q, num_heads), _heads(k, num_heads))):
        products.append((q_i.transpose(1, 2) @ k_i).float())
        scores = products[-1] * temperature[i].float()
        if q.dtype != torch.float16:
            sl = slice(i * head, (i + 1) * head)
            scores = scores * (inv_q[:, 0, sl, None] * inv_k[:, :, sl])
        probs.append(scores.softmax(dim=-1))
    return _attend(v, *(p.to(v.dtype) for p in probs)), products, probs, inv_q, inv_k


class _AttentionCore(torch.autograd.Function):
    """MDTA from the depthwise inputs to the heads' output, keeping for backward only those inputs and
    the small tensors (the (c x c) products and softmaxes, the inverse norms): q, k and v (3 values
    per pixel and channel) are recomputed by their depthwise convolution in backward. The attention's
    own backward is written out, so that neither product over the pixels nor a norm runs again, and
    the norm's gradient joins the product's in one pass; autograd differentiates the convolutions."""

    @staticmethod
    def forward(ctx, num_heads: int, pre_q, pre_k, pre_v, w_q, w_k, w_v, b_q, b_k, b_v, temperature):
        q, k, v = (_depthwise(*t) for t in ((pre_q, w_q, b_q), (pre_k, w_k, b_k), (pre_v, w_v, b_v)))
        out, products, probs, inv_q, inv_k = _attention(q, k, v, temperature, num_heads)
        ctx.num_heads, ctx.autocast = num_heads, _autocast_state(out.device.type)
        ctx.save_for_backward(pre_q, pre_k, pre_v, w_q, w_k, w_v, b_q, b_k, b_v, temperature, inv_q, inv_k,
                              *products, *probs)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        heads = ctx.num_heads
        inputs, (temperature, inv_q, inv_k) = saved[:9], saved[9:12]
        products, probs = saved[12:12 + heads], saved[12 + heads:]
        leaves = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(inputs, ctx.needs_input_grad[1:10])]
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            q, k, v = (_pixels(_depthwise(*leaves[i::3])) for i in range(3))
        # What entered the products: q and k, or under fp16 their normalised copies (see _attention).
        low = q.dtype == torch.float16
        a, b = (q.detach() * inv_q.to(q.dtype), k.detach() * inv_k.to(k.dtype)) if low else (q.detach(), k.detach())
        grad_rows = _pixels(grad_out)
        head = q.shape[-1] // heads
        grad_a, grad_b, grad_v, grad_inv_q, grad_inv_k, grad_t = [], [], [], [], [], []
        for i, (g_i, a_i, b_i, v_i) in enumerate(zip(*(_heads(t, heads) for t in (grad_rows, a, b, v.detach())))):
            prob, t_i = probs[i], temperature[i].float()
            grad_v.append(g_i @ prob.to(v.dtype))
            grad_prob = (g_i.transpose(1, 2) @ v_i).float()
            grad_scores = prob * (grad_prob - (grad_prob * prob).sum(-1, keepdim=True))  # softmax's backward
            weighted = grad_scores * products[i]  # times the scale's factors: their gradients
            if low:
                scale = t_i
                grad_t.append(weighted.sum())
            else:
                sl = slice(i * head, (i + 1) * head)
                row, col = inv_q[:, 0, sl, None], inv_k[:, :, sl]  # (b, d, 1), (b, 1, d)
                scale = t_i * (row * col)
                grad_t.append((weighted * (row * col)).sum())
                grad_inv_q.append((weighted * col).sum(-1) * t_i)
                grad_inv_k.append((weighted * row).sum(-2) * t_i)
            grad_product = (grad_scores * scale).to(q.dtype)
            grad_a.append(b_i @ grad_product.transpose(1, 2))
            grad_b.append(a_i @ grad_product)
        grad_a, grad_b = _joined(grad_a), _joined(grad_b)
        if low:  # a = q * inv_q: the product's gradient reaches q directly and through the norm
            grad_inv_q = (grad_a.float() * q.detach().float()).sum(1)
            grad_inv_k = (grad_b.float() * k.detach().float()).sum(1)
            grad_a, grad_b = grad_a * inv_q.to(grad_a.dtype), grad_b * inv_k.to(grad_b.dtype)
        else:
            grad_inv_q, grad_inv_k = _joined(grad_inv_q), _joined(grad_inv_k)
        grad_q = _through_norm(grad_a, q.detach(), inv_q, grad_inv_q)
        grad_k = _through_norm(grad_b, k.detach(), inv_k, grad_inv_k)
        grad_temperature = torch.stack(grad_t).view_as(temperature).to(temperature.dtype)
        return (None, *_grads_of(leaves, [q, k, v], [grad_q, grad_k, _joined(grad_v)]),
                grad_temperature if ctx.needs_input_grad[10] else None)


def _through_norm(grad: torch.Tensor, t: torch.Tensor, inv: torch.Tensor, grad_inv: torch.Tensor) -> torch.Tensor:
    """grad plus the gradient that reaches t through inv = 1 / max(|t|, eps) (norms over the pixels of
    (b, hw, c)): d inv / d t = -t * inv^3 where |t| > eps, else 0."""
    coef = (-grad_inv.unsqueeze(1) * inv.pow(3)).masked_fill(inv >= 1 / _NORM_EPS, 0)
    return grad.addcmul(t, coef.to(t.dtype))


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-head pieces side by side on the last axis."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """B,C,H,W -> (b, h*w, c): a view when x is channels-last."""
    return rearrange(x, "b c h w -> b (h w) c")


def _attend(v: torch.Tensor, *attns: torch.Tensor) -> torch.Tensor:
    """The heads' outputs v_i . attn_i^T side by side, B,C,H,W like v."""
    outs = [v_i @ attn.transpose(1, 2) for v_i, attn in zip(_heads(_pixels(v), len(attns)), attns)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (b, hw, c): already channels-last
    return rearrange(out, "b (h w) c -> b c h w", h=v.shape[2], w=v.shape[3])


def _heads(t: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """Per-head channel slices of (b, hw, c): strided views that BLAS reads directly. One head takes t
    itself: a split into one piece would still concatenate its gradient (a copy) in backward."""
    return t.split(t.shape[-1] // num_heads, -1) if num_heads > 1 else (t,)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                 LayerNorm_type: str):
        super().__init__()
        self.norm1 = LayerNorm(dim, LayerNorm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, LayerNorm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)
        self.activations = "lean"  # see ACTIVATION_MODES

    def _forward(self, x: torch.Tensor, lean: bool) -> torch.Tensor:
        x = x + self.attn(self.norm1, x, lean)
        return x + self.ffn(self.norm2, x, lean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference and ONNX export (traced with autograd on) run the plain ops; under torch.compile the
        # compiler's own partitioner decides what backward recomputes.
        if not torch.is_grad_enabled() or torch.onnx.is_in_onnx_export():
            return self._forward(x, lean=False)
        if self.activations == "checkpoint":
            # The block is recomputed whole: inside, plain autograd (lean would recompute twice).
            return checkpoint(self._forward, x, False, use_reentrant=False)
        return self._forward(x, lean=self.activations == "lean" and not torch.compiler.is_compiling())


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
        self.set_activations("checkpoint" if checkpointing else "lean")

    def set_activations(self, mode: str) -> None:
        """What training keeps for backward, one of ACTIVATION_MODES (see the module docstring)."""
        if mode not in ACTIVATION_MODES:
            raise ValueError(f"activation mode must be one of {ACTIVATION_MODES}, got {mode!r}")
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                module.activations = mode

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
