"""What training keeps for backward, applied to a network from outside: `set_activations(net, mode)`.

"plain" keeps what autograd keeps. "checkpoint" keeps only each transformer block's input and runs
the block again in backward (torch.utils.checkpoint, as torchtitan's apply_ac wraps blocks).

"lean" (the default for training) keeps the inputs of each block's cheap per-pixel work and
recomputes that work in backward: the LayerNorms in front of the projections, the depthwise 3x3
convolutions, the GDFN's GELU gate and the MDTA between its depthwise inputs and its heads' output.
The 1x1 projections, the GEMMs, are not recomputed; their backward and MDTA's are written out below.
Kept per block: the block input, the q/k/v projections, the heads' output, the midway residual and
the GDFN's two projections (benchmarks/model_memory.py measures the bytes against the official code,
benchmarks/model_speed.py the step). Functions rather than torch.utils.checkpoint with a selective
policy: that policy routes every operator through a Python dispatch mode, which cost step time for
the same memory (benchmarks/model_speed.py).

A hand-written backward is only right for the forward it was written for, so lean takes over a
block only when it can show, at every forward, that the block computes exactly that function: the
block, its norms, attention, feed-forward and their convolutions are the classes of
model/restormer.py with their official geometry, none has a module hook (global ones included) or
a parametrization or an instance-level forward, and the source of the forwards lean mirrors is the
one it was written for (`_WRITTEN_FOR`). Any other block runs its own forward under plain
autograd: a subclass, a swapped or wrapped submodule (LoRA), a hook registered before or after this
call. Frozen parameters get no gradient, as under autograd. Inference (no_grad), ONNX export and
torch.compile (whose partitioner decides what backward recomputes) run the module's forward.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import types
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as nn_module
from torch.utils.checkpoint import checkpoint

from . import restormer as official
from .restormer import EPS, NORM_EPS, Attention, Conv1x1, FeedForward, LayerNorm, TransformerBlock, fp32

ACTIVATION_MODES = ("lean", "plain", "checkpoint")
_HIDDEN_MULTIPLE = 16  # lean pads the GDFN width for MKL's GEMMs (benchmarks/model_speed.py)
# sha256 prefix of the forwards lean mirrors (_fingerprint): update it only together with lean's
# Functions, after tests/test_activations.py passes.
_WRITTEN_FOR = "0e838da3fd71be34"


def set_activations(net: nn.Module, mode: str) -> dict[str, str]:
    """Makes every TransformerBlock in `net` keep for backward what `mode` says (ACTIVATION_MODES).

    Returns {block name: why it runs plain autograd} for the blocks lean cannot take over now (empty
    for "plain" and "checkpoint"); the check is repeated at every forward, so later changes are seen.
    """
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"activation mode must be one of {ACTIVATION_MODES}, got {mode!r}")
    blocks = [(name, m) for name, m in net.named_modules() if isinstance(m, TransformerBlock)]
    if not blocks:
        return {} if mode == "plain" else {"": f"{type(net).__name__} has no model.restormer.TransformerBlock: "
                                                f"it runs as written"}
    left_plain = {}
    for name, block in blocks:
        own = block.__dict__.get("forward")
        if own is not None and getattr(own, "__func__", None) not in _FORWARDS.values():
            left_plain[name] = "its forward was replaced on the instance"
            continue
        if mode == "plain":
            block.__dict__.pop("forward", None)
            continue
        block.forward = types.MethodType(_FORWARDS[mode], block)
        why = _why_plain(block) if mode == "lean" else None
        if why:
            left_plain[name] = why
    return left_plain


def _lean_forward(block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    if _runs_module_forward() or _why_plain(block):
        return type(block).forward(block, x)
    x = x + _lean_attention(block.norm1, block.attn, x)
    return x + _lean_feed_forward(block.norm2, block.ffn, x)


def _checkpoint_forward(block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    if _runs_module_forward():
        return type(block).forward(block, x)
    return checkpoint(type(block).forward, block, x, use_reentrant=False)


_FORWARDS = {"lean": _lean_forward, "checkpoint": _checkpoint_forward}


def _runs_module_forward() -> bool:
    return not torch.is_grad_enabled() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


# ---------------------------------------------------------------- the guard


def _why_plain(block: nn.Module) -> str | None:
    """Why lean's Functions would not compute what `block` computes, or None."""
    if _fingerprint() != _WRITTEN_FOR:
        return "model/restormer.py's block code differs from the one lean was written for (activations._WRITTEN_FOR)"
    if type(block) is not TransformerBlock:
        return f"{type(block).__name__} is a subclass of TransformerBlock"
    if any((nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks,
            nn_module._global_backward_hooks, nn_module._global_backward_pre_hooks)):
        return "global module hooks are registered"
    norm_type = type(getattr(block.norm1, "body", None))
    for path, cls in (("norm1", LayerNorm), ("norm2", LayerNorm), ("norm1.body", norm_type),
                      ("norm2.body", norm_type), ("attn", Attention), ("ffn", FeedForward),
                      *_CONVS.items()):
        part = block.get_submodule(path)
        if type(part) is not cls or cls not in _OFFICIAL:
            return f"{path} is {type(part).__name__}, not model.restormer's {cls.__name__}"
        if part._forward_hooks or part._forward_pre_hooks or part._backward_hooks or part._backward_pre_hooks:
            return f"{path} has a module hook"
        if "forward" in part.__dict__:
            return f"{path}'s forward was replaced on the instance"
    return _geometry_problem(block)


_OFFICIAL = (LayerNorm, Attention, FeedForward, official.BiasFree_LayerNorm, official.WithBias_LayerNorm, Conv1x1,
             nn.Conv2d)
_CONVS = {"attn.qkv": Conv1x1, "attn.qkv_dwconv": nn.Conv2d, "attn.project_out": Conv1x1, "ffn.project_in": Conv1x1,
          "ffn.dwconv": nn.Conv2d, "ffn.project_out": Conv1x1}


def _geometry_problem(block: TransformerBlock) -> str | None:
    dim, hidden, heads = block.norm1.body.weight.numel(), block.ffn.project_out.in_channels, block.attn.num_heads
    with_bias = isinstance(block.norm1.body, official.WithBias_LayerNorm)
    if block.norm2.body.weight.numel() != dim or not isinstance(block.norm2.body, type(block.norm1.body)):
        return "norm1 and norm2 differ"
    if dim % heads or block.attn.temperature.shape != (heads, 1, 1):
        return f"attn has {heads} heads for {dim} channels and temperature {tuple(block.attn.temperature.shape)}"
    expected = {"attn.qkv": (dim, 3 * dim, 1), "attn.qkv_dwconv": (3 * dim, 3 * dim, 3),
                "attn.project_out": (dim, dim, 1), "ffn.project_in": (dim, 2 * hidden, 1),
                "ffn.dwconv": (2 * hidden, 2 * hidden, 3), "ffn.project_out": (hidden, dim, 1)}
    for path, (cin, cout, k) in expected.items():
        conv = block.get_submodule(path)
        groups = cout if k == 3 else 1
        got = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
               conv.groups, conv.padding_mode, tuple(conv.weight.shape))
        if got != (cin, cout, (k, k), (1, 1), (k // 2, k // 2), (1, 1), groups, "zeros", (cout, cin // groups, k, k)):
            return f"{path} is not the official {k}x{k} convolution {cin} -> {cout}"
    biases = {block.get_submodule(p).bias is not None for p in _CONVS}
    if len(biases) > 1 or (with_bias and block.norm1.body.bias.shape != (dim,)):
        return "its biases differ from the official layout"
    return None


@functools.cache
def _fingerprint() -> str:
    """sha256 prefix of the source of the forwards (and their helpers) that lean's Functions mirror."""
    mirrored = (TransformerBlock.forward, Conv1x1.forward, LayerNorm.forward, official.BiasFree_LayerNorm.forward,
                official.WithBias_LayerNorm.forward, Attention.forward, FeedForward.forward, official._attention,
                official._inverse_norm, official._pixels, official._heads, official._attend)
    try:
        source = "\n".join(inspect.getsource(f) for f in mirrored)
    except (OSError, TypeError):
        return "source not readable"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the lean block


def _lean_attention(norm: LayerNorm, attn: Attention, x: torch.Tensor) -> torch.Tensor:
    pre_q, pre_k, pre_v = _project(_NORM, (x, *_norm_parameters(norm)), *_chunks(attn.qkv, 3))
    (w_q, w_k, w_v), (b_q, b_k, b_v) = _chunks(attn.qkv_dwconv, 3)
    out = _AttentionCore.apply(attn.num_heads, pre_q, pre_k, pre_v, w_q, w_k, w_v, b_q, b_k, b_v,
                               attn.temperature)
    return _pointwise(out, attn.project_out.weight, attn.project_out.bias)


def _lean_feed_forward(norm: LayerNorm, ffn: FeedForward, x: torch.Tensor) -> torch.Tensor:
    # The two halves are computed apart (channel slices of the same weights: the same math), so each
    # is a contiguous channels-last tensor and backward needs no concatenation. The hidden width is
    # padded with zero channels to a multiple of 16 for MKL's GEMMs: the padded channels stay zero
    # (GELU(0) * 0) and meet zero columns of project_out; padding inside the graph gives their
    # weight slices no gradient.
    pad = -ffn.project_out.weight.shape[1] % _HIDDEN_MULTIPLE
    (w1, w2), (b1, b2) = _chunks(ffn.dwconv, 2, pad)
    w_out = F.pad(ffn.project_out.weight, (0, 0, 0, 0, 0, pad)) if pad else ffn.project_out.weight
    x1, x2 = _project(_NORM, (x, *_norm_parameters(norm)), *_chunks(ffn.project_in, 2, pad))
    return _project(_gelu_gate, (x1, x2, w1, w2, b1, b2), [w_out], [ffn.project_out.bias])[0]


def _norm_parameters(norm: LayerNorm) -> tuple[torch.Tensor, torch.Tensor | None]:
    return norm.body.weight, getattr(norm.body, "bias", None)


def _chunks(conv: nn.Conv2d, parts: int, pad: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """conv's weight and bias split into `parts` output chunks, each padded with `pad` zero channels."""
    weights, biases = list(conv.weight.chunk(parts)), [None] * parts
    if conv.bias is not None:
        biases = list(conv.bias.chunk(parts))
    if pad:
        weights = [F.pad(w, (0, 0, 0, 0, 0, 0, 0, pad)) for w in weights]
        biases = [b if b is None else F.pad(b, (0, pad)) for b in biases]
    return weights, biases


def _gelu_gate(x1: torch.Tensor, x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               b1: torch.Tensor | None, b2: torch.Tensor | None) -> torch.Tensor:
    """GELU(depthwise(x1)) * depthwise(x2): the GDFN's gate."""
    gate = F.gelu(_depthwise(x1, w1, b1))
    # In place where autograd keeps nothing (one allocation less for the heap to fit).
    return gate * _depthwise(x2, w2, b2) if torch.is_grad_enabled() else gate.mul_(_depthwise(x2, w2, b2))


def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x, weight, bias, padding=1, groups=weight.shape[0])


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """B,C,H,W -> B,H,W,C as a view: contiguous when x is channels-last."""
    return x.permute(0, 2, 3, 1)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one GEMM over the channels-last view; returns a channels-last tensor."""
    return F.linear(_tokens(x), weight.flatten(1), bias).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- the Functions


def _autocast_state(device_type: str) -> dict:
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


def _grads_of(leaves: Sequence[torch.Tensor | None], outputs, grads) -> list[torch.Tensor | None]:
    """Gradients of `outputs` (given theirs) for each leaf that requires one, None for the others."""
    wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
    found = iter(torch.autograd.grad(outputs, wanted, grads) if wanted else ())
    return [next(found) if leaf is not None and leaf.requires_grad else None for leaf in leaves]


def _project(f, args: tuple[torch.Tensor | None, ...], weights: Sequence[torch.Tensor],
             biases: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """[linear(f(*args), w, b) for each projection], f's output recomputed in backward, not kept."""
    return list(_RecomputeThenProject.apply(f, len(args), len(weights), *args, *weights, *biases))


class _RecomputeThenProject(torch.autograd.Function):
    """outputs[i] = linear(f(*args), weights[i], biases[i]); only f's args are kept for backward.

    f is cheap per-pixel work (a LayerNorm; the GDFN's depthwise convolution and GELU gate) whose
    output autograd would keep for the projections' weight gradients. Backward recomputes f under the
    forward's autocast state, writes the projections' two GEMMs out, and leaves f's backward to
    autograd on the recomputed graph, or to f's own `recompute` and `vjp` where it has them (_NORM).
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
    @once_differentiable
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


class _LayerNormWork:
    """The LayerNorm (model.restormer's, on B,C,H,W) as _RecomputeThenProject's f, its backward
    written out: autograd differentiating the recomputed graph cost step time (nested autograd per
    block); the BiasFree statistics come from the fused LayerNorm kernel (Tensor.var is slower)."""

    def __call__(self, x, weight, bias):
        return self.recompute(x, weight, bias)[0]

    @staticmethod
    def recompute(x, weight, bias):
        t, w = fp32(_tokens(x)), fp32(weight)
        y, mean, rstd = torch.native_layer_norm(t, w.shape, w, None if bias is None else fp32(bias), EPS)
        if bias is None:  # x / std * w = (x - mean) / std * w + mean / std * w, in place
            y.addcmul_(mean * rstd, w)
        return y.to(x.dtype).permute(0, 3, 1, 2), (t, w, mean, rstd)

    @staticmethod
    def vjp(args, kept, grad_z, wanted):
        (x, weight, bias), (t, w, mean, rstd) = args, kept
        grad = fp32(_tokens(grad_z))
        if bias is None:
            # With r = rstd and C channels: d/dt = r * g * w - r^3 * (t - mean) * mean(g * w * t),
            # and d/dw = the sum over pixels of g * t * r.
            grad_t_rows = (grad * t).reshape(-1, t.shape[-1])
            r = rstd.reshape(-1)
            grad_w, grad_b = grad_t_rows.t() @ r, None
            coef = (r.pow(3) * (grad_t_rows @ w) / t.shape[-1]).view_as(rstd)
            grad_t = (grad * w).mul_(rstd).sub_((t - mean).mul_(coef))
        else:
            grad_t, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad, t, w.shape, mean, rstd, w, fp32(bias), [wanted[0], wanted[1], wanted[2]])
        return (grad_t.to(x.dtype).permute(0, 3, 1, 2) if wanted[0] else None,
                grad_w.to(weight.dtype) if wanted[1] else None,
                grad_b.to(bias.dtype) if wanted[2] else None)


_NORM = _LayerNormWork()


class _AttentionCore(torch.autograd.Function):
    """MDTA from the depthwise inputs to the heads' output, keeping for backward only those inputs and
    the small tensors (the (c x c) products and softmaxes, the inverse norms): q, k and v are
    recomputed by their depthwise convolution in backward. The attention's own backward is written
    out, so that neither product over the pixels nor a norm runs again, and the norm's gradient joins
    the product's in one pass; autograd differentiates the convolutions."""

    @staticmethod
    def forward(ctx, num_heads: int, pre_q, pre_k, pre_v, w_q, w_k, w_v, b_q, b_k, b_v, temperature):
        q, k, v = (_depthwise(*t) for t in ((pre_q, w_q, b_q), (pre_k, w_k, b_k), (pre_v, w_v, b_v)))
        out, products, probs, inv_q, inv_k = official._attention(q, k, v, temperature, num_heads)
        ctx.num_heads, ctx.autocast = num_heads, _autocast_state(out.device.type)
        ctx.save_for_backward(pre_q, pre_k, pre_v, w_q, w_k, w_v, b_q, b_k, b_v, temperature, inv_q, inv_k,
                              *products, *probs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        heads = ctx.num_heads
        inputs, (temperature, inv_q, inv_k) = saved[:9], saved[9:12]
        products, probs = saved[12:12 + heads], saved[12 + heads:]
        leaves = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(inputs, ctx.needs_input_grad[1:10])]
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            q, k, v = (official._pixels(_depthwise(*leaves[i::3])) for i in range(3))
        # What entered the products: q and k, or under fp16 their normalised copies (see _attention).
        low = q.dtype == torch.float16
        a, b = (q.detach() * inv_q.to(q.dtype), k.detach() * inv_k.to(k.dtype)) if low else (q.detach(), k.detach())
        grad_rows = official._pixels(grad_out)
        head = q.shape[-1] // heads
        grad_a, grad_b, grad_v, grad_inv_q, grad_inv_k, grad_t = [], [], [], [], [], []
        split = (official._heads(t, heads) for t in (grad_rows, a, b, v.detach()))
        for i, (g_i, a_i, b_i, v_i) in enumerate(zip(*split)):
            prob, t_i = probs[i], fp32(temperature[i])
            grad_v.append(g_i @ prob.to(v.dtype))
            grad_prob = fp32(g_i.transpose(1, 2) @ v_i)
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
    coef = (-grad_inv.unsqueeze(1) * inv.pow(3)).masked_fill(inv >= 1 / NORM_EPS, 0)
    return grad.addcmul(t, coef.to(t.dtype))


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-head pieces side by side on the last axis."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
