"""The fused alignment-mix ops: input checks, autograd and fake kernels around the compiled library.

    h = x + alpha * (x @ weight.T + bias - x)

`alpha` is a number, a 0-d tensor, or one value per sequence (a 1-D tensor whose length is the first
dimension of `x`, or of `input_ids`; flat ids [T] take one alpha per token). The kernels live in csrc/
(C++ for CPU, CUDA for GPUs); the `reference_*` functions are the plain PyTorch composition the tests and
benchmarks compare against. The wrappers here check with the library's alpha rule (clm_ext.alpha); the
compiled ops, called directly through torch.ops.clm_ext, check alpha's dtype and shape themselves and, for a
CPU alpha, its values (finite in the op's compute dtype). They do not read a CUDA alpha's values: that would
synchronise the stream on every call.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .alpha import alpha_number, check_alpha_shape, check_alpha_values

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.clm_ext)
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(
        "clm_ext's compiled library is missing or was built against another torch. Build it with "
        "`pip install --no-build-isolation -e .` in the clm-ext checkout."
    ) from err

Alpha = Union[float, Tensor]

__all__ = [
    "alignment_mix",
    "embed_alignment_mix",
    "embedding_lerp",
    "reference_alignment_mix",
    "reference_embed_alignment_mix",
]


# ----------------------------------------------------------------------------------------------
# Input checks: every message names the argument and what was expected.


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_layer(name: str, weight: Tensor, bias: Optional[Tensor], like: Tensor, d: int) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name}: weight must be a Tensor, got {type(weight).__name__}")
    if weight.shape != (d, d):
        raise ValueError(
            f"{name}: weight must have shape ({d}, {d}) to match the hidden size {d}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != like.dtype:
        raise TypeError(f"{name}: weight dtype {weight.dtype} differs from the input's {like.dtype}")
    if weight.device != like.device:
        raise ValueError(f"{name}: weight is on {weight.device}, the input on {like.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{name}: bias must be a Tensor or None, got {type(bias).__name__}")
        if bias.shape != (d,):
            raise ValueError(f"{name}: bias must have shape ({d},), got {tuple(bias.shape)}")
        if bias.dtype != like.dtype:
            raise TypeError(f"{name}: bias dtype {bias.dtype} differs from the input's {like.dtype}")
        if bias.device != like.device:
            raise ValueError(f"{name}: bias is on {bias.device}, the input on {like.device}")


def _as_alpha(name: str, alpha: Alpha, like: Tensor, batch_shape: torch.Size) -> Tensor:
    """Turn `alpha` into a floating tensor on `like`'s device: 0-d, or [batch] for per-sequence."""
    opmath = _opmath_dtype(like.dtype)
    if not isinstance(alpha, Tensor):
        value = alpha_number(alpha, f"{name}: alpha", opmath, expected="a float or a tensor")
        # torch.full fills on the device: no blocking host-to-device copy per call (CUDA-graph friendly).
        return torch.full((), value, dtype=opmath, device=like.device)
    if not alpha.is_floating_point():
        raise TypeError(f"{name}: alpha must be a floating-point tensor, got {alpha.dtype}")
    if alpha.device != like.device:
        raise ValueError(f"{name}: alpha is on {alpha.device}, the input on {like.device}")
    if alpha.dim() == 1 and len(batch_shape) < 2:
        raise ValueError(
            f"{name}: a per-sequence alpha needs a batch dimension; the input has shape "
            f"{tuple(batch_shape)} (use a number or a 0-d tensor)"
        )
    check_alpha_shape(alpha, f"{name}: alpha", batch_shape[0] if len(batch_shape) > 1 else None)
    # A value check needs the data: skip it while tracing and on accelerators (it would sync the
    # stream every step); clm_ext.set_alpha checks values once, where they are set.
    if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
        check_alpha_values(alpha, f"{name}: alpha", opmath)
    return alpha


def _check_ids(name: str, input_ids: Tensor, embed_weight: Tensor) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"{name}: input_ids must be an int64 or int32 tensor, got {got}")
    if embed_weight.dim() != 2:
        raise ValueError(
            f"{name}: embed_weight must be 2-D [vocab, hidden], got shape {tuple(embed_weight.shape)}"
        )
    if input_ids.device != embed_weight.device:
        raise ValueError(f"{name}: input_ids are on {input_ids.device}, embed_weight on {embed_weight.device}")
    if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= embed_weight.shape[0]:
            raise IndexError(
                f"{name}: input_ids must lie in [0, {embed_weight.shape[0]}), got values in [{lo}, {hi}]"
            )


# ----------------------------------------------------------------------------------------------
# Public entry points.


def alignment_mix(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, alpha: Alpha = 1.0) -> Tensor:
    """h = x + alpha * (x @ weight.T + bias - x), fused; x is [..., d], alpha a number or [x.shape[0]]."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("alignment_mix: x must be a floating-point tensor")
    if x.dim() == 0:
        raise ValueError("alignment_mix: x must have a hidden dimension, got a 0-d tensor")
    _check_layer("alignment_mix", weight, bias, x, x.shape[-1])
    alpha = _as_alpha("alignment_mix", alpha, x, x.shape[:-1] + (1,))
    return torch.ops.clm_ext.alignment_mix(x, weight, bias, alpha)


def embed_alignment_mix(
    input_ids: Tensor,
    embed_weight: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    alpha: Alpha = 1.0,
) -> Tensor:
    """alignment_mix(embed_weight[input_ids], ...) with the gather fused in; saves only the ids."""
    _check_ids("embed_alignment_mix", input_ids, embed_weight)
    _check_layer("embed_alignment_mix", weight, bias, embed_weight, embed_weight.shape[1])
    alpha = _as_alpha("embed_alignment_mix", alpha, embed_weight, input_ids.shape + (1,))
    return torch.ops.clm_ext.embed_alignment_mix(input_ids, embed_weight, weight, bias, alpha)


def embedding_lerp(input_ids: Tensor, embed_weight: Tensor, aligned_weight: Tensor, alpha: Alpha) -> Tensor:
    """E[id] + alpha * (E_a[id] - E[id]) for a cached aligned table E_a = E W^T + b: no GEMM per step.

    For inference only (no autograd); this is the decode path of a frozen layer.
    """
    _check_ids("embedding_lerp", input_ids, embed_weight)
    if aligned_weight.shape != embed_weight.shape or aligned_weight.dtype != embed_weight.dtype:
        raise ValueError(
            f"embedding_lerp: aligned_weight must match embed_weight ({tuple(embed_weight.shape)}, "
            f"{embed_weight.dtype}), got ({tuple(aligned_weight.shape)}, {aligned_weight.dtype})"
        )
    if aligned_weight.device != embed_weight.device:
        raise ValueError(f"embedding_lerp: aligned_weight is on {aligned_weight.device}, embed_weight on {embed_weight.device}")
    alpha = _as_alpha("embedding_lerp", alpha, embed_weight, input_ids.shape + (1,))
    return torch.ops.clm_ext.embedding_lerp(input_ids, embed_weight, aligned_weight, alpha)


def _alpha_view(alpha: Tensor, x: Tensor) -> Tensor:
    if alpha.dim() == 0:
        return alpha
    return alpha.reshape((-1,) + (1,) * (x.dim() - 1))


def reference_alignment_mix(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Alpha) -> Tensor:
    """The eager composition the fused op replaces: an aligned copy of x, then a lerp."""
    aligned = torch.nn.functional.linear(x, weight, bias)
    a = alpha if isinstance(alpha, Tensor) else torch.tensor(alpha, dtype=_opmath_dtype(x.dtype), device=x.device)
    return (x + _alpha_view(a, x) * (aligned - x)).to(x.dtype)


def reference_embed_alignment_mix(
    input_ids: Tensor, embed_weight: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Alpha
) -> Tensor:
    return reference_alignment_mix(torch.nn.functional.embedding(input_ids, embed_weight), weight, bias, alpha)


# ----------------------------------------------------------------------------------------------
# Fake kernels (shapes only) so torch.compile and torch.export trace through the ops.


@torch.library.register_fake("clm_ext::alignment_mix")
def _alignment_mix_fake(x, weight, bias, alpha):
    return x.new_empty(x.shape)


@torch.library.register_fake("clm_ext::embed_alignment_mix")
def _embed_alignment_mix_fake(input_ids, embed_weight, weight, bias, alpha):
    return embed_weight.new_empty(input_ids.shape + (embed_weight.shape[1],))


@torch.library.register_fake("clm_ext::embedding_lerp")
def _embedding_lerp_fake(input_ids, embed_weight, aligned_weight, alpha):
    return embed_weight.new_empty(input_ids.shape + (embed_weight.shape[1],))


def _grads_fake(first: Tensor, weight: Tensor, alpha: Tensor, output_mask):
    """Grads that were not asked for come back as empty tensors."""
    shapes = (first.shape, weight.shape, weight.shape[:1], alpha.shape)
    likes = (first, weight, weight, alpha)
    return tuple(
        like.new_empty(shape if need else (0,)) for like, shape, need in zip(likes, shapes, output_mask)
    )


@torch.library.register_fake("clm_ext::alignment_mix_backward")
def _alignment_mix_backward_fake(grad, x, weight, bias, alpha, output_mask):
    return _grads_fake(x, weight, alpha, output_mask)


@torch.library.register_fake("clm_ext::embed_alignment_mix_backward")
def _embed_alignment_mix_backward_fake(grad, input_ids, embed_weight, weight, bias, alpha, output_mask):
    return _grads_fake(embed_weight, weight, alpha, output_mask)


# ----------------------------------------------------------------------------------------------
# Autograd: saves the input (x, or only the ids), the layer's parameters and alpha; no activation.


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _alignment_mix_backward(ctx, grad):
    x, weight, bias, alpha = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2]) + [bias is not None and ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    grads = torch.ops.clm_ext.alignment_mix_backward(grad, x, weight, bias, alpha, mask)
    return tuple(g if need else None for g, need in zip(grads, mask))


def _embed_alignment_mix_backward(ctx, grad):
    input_ids, embed_weight, weight, bias, alpha = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[1], need[2], bias is not None and need[3], need[4]]
    grads = torch.ops.clm_ext.embed_alignment_mix_backward(grad, input_ids, embed_weight, weight, bias, alpha, mask)
    return (None,) + tuple(g if m else None for g, m in zip(grads, mask))


torch.library.register_autograd(
    "clm_ext::alignment_mix", _alignment_mix_backward, setup_context=_save_inputs
)
torch.library.register_autograd(
    "clm_ext::embed_alignment_mix", _embed_alignment_mix_backward, setup_context=_save_inputs
)


# ----------------------------------------------------------------------------------------------
# Double backward (create_graph=True): the backward ops' own derivatives, in plain PyTorch so that any
# higher order follows too. With D = W - I and a, ga the per-row alpha and cotangent of dalpha:
#   dx = g + a g D,  dW = sum a g^T x,  db = sum a g,  dalpha = sum g . (x D^T + b)
# are linear in g and in x, and their derivatives are the products below.


def _per_row(values: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """One value per sequence -> a [rows, 1] column, each sequence's value repeated over its rows."""
    flat = values.reshape(-1).to(dtype)
    return flat.repeat_interleave(rows // flat.numel()).unsqueeze(1)


def _per_sequence(row_values: Tensor, alpha: Tensor) -> Tensor:
    return row_values.reshape(alpha.numel(), -1).sum(1).reshape(alpha.shape).to(alpha.dtype)


def _mix_backward_derivatives(g, x, weight, bias, alpha, gx, gw, gb, ga):
    """Derivatives of (dx, dW, db, dalpha) w.r.t. (g, x, weight, bias, alpha), given the cotangents
    gx, gw, gb, ga of those outputs (None where an output was not computed). g and x are [rows, d]."""
    rows = g.shape[0]
    a = _per_row(alpha, rows, x.dtype)
    gd = g @ weight - g  # g D
    dg, dx, dw = torch.zeros_like(g), torch.zeros_like(x), torch.zeros_like(weight)
    db = None if bias is None else torch.zeros_like(bias)
    dalpha_rows = g.new_zeros(rows)
    if gx is not None:
        dg = dg + gx + a * (gx @ weight.t() - gx)
        dw = dw + (a * g).t() @ gx
        dalpha_rows = dalpha_rows + (gx * gd).sum(1)
    if gw is not None:
        x_gw = x @ gw.t()
        dg = dg + a * x_gw
        dx = dx + a * (g @ gw)
        dalpha_rows = dalpha_rows + (g * x_gw).sum(1)
    if gb is not None:
        dg = dg + a * gb
        dalpha_rows = dalpha_rows + g @ gb
    if ga is not None:
        ga_rows = _per_row(ga, rows, x.dtype)
        aligned = x @ weight.t() - x if bias is None else x @ weight.t() - x + bias
        dg = dg + ga_rows * aligned
        dx = dx + ga_rows * gd
        dw = dw + (ga_rows * g).t() @ x
        if bias is not None:
            db = db + (ga_rows * g).sum(0)
    return dg, dx, dw, db, _per_sequence(dalpha_rows, alpha)


def _cotangents(grads, mask):
    return [g if need and g is not None and g.numel() else None for g, need in zip(grads, mask)]


def _save_backward_inputs(ctx, inputs, output):
    *tensors, ctx.output_mask = inputs
    ctx.save_for_backward(*tensors)


def _alignment_mix_double_backward(ctx, *grads):
    grad, x, weight, bias, alpha = ctx.saved_tensors
    d = weight.shape[0]
    gx, gw, gb, ga = _cotangents(grads, ctx.output_mask)
    gx = None if gx is None else gx.reshape(-1, d)
    dg, dx, dw, db, da = _mix_backward_derivatives(
        grad.reshape(-1, d), x.reshape(-1, d), weight, bias, alpha, gx, gw, gb, ga
    )
    need = ctx.needs_input_grad
    results = (dg.reshape(grad.shape), dx.reshape(x.shape), dw, db, da)
    return tuple(r if n else None for r, n in zip(results, need)) + (None,)


def _embed_alignment_mix_double_backward(ctx, *grads):
    grad, input_ids, embed_weight, weight, bias, alpha = ctx.saved_tensors
    d = weight.shape[0]
    ids = input_ids.reshape(-1)
    ge, gw, gb, ga = _cotangents(grads, ctx.output_mask)
    gx = None if ge is None else ge[ids]  # dE is a scatter-add of dx by id, so dx's cotangent is a gather
    dg, dx, dw, db, da = _mix_backward_derivatives(
        grad.reshape(-1, d), embed_weight[ids], weight, bias, alpha, gx, gw, gb, ga
    )
    de = torch.zeros_like(embed_weight).index_add(0, ids, dx)
    need = ctx.needs_input_grad
    results = (dg.reshape(grad.shape), None, de, dw, db, da)
    return tuple(r if n else None for r, n in zip(results, need)) + (None,)


torch.library.register_autograd(
    "clm_ext::alignment_mix_backward", _alignment_mix_double_backward, setup_context=_save_backward_inputs
)
torch.library.register_autograd(
    "clm_ext::embed_alignment_mix_backward", _embed_alignment_mix_double_backward, setup_context=_save_backward_inputs
)
