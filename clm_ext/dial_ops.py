"""The fused K-dial mix ops: input checks, autograd and fake kernels around the compiled library.

    h = x + sum_k alpha[., k] * (x @ weight[k].T + bias[k] - x)

`weight` stacks the K dials' d x d layers ([K, d, d]), `bias` their biases ([K, d]). `alpha` holds one value
per dial: a vector [K] for every row, [B, K] one vector per sequence (B = x.shape[0]), or one per token
([*x.shape[:-1], K]). With K = 1 the result equals `clm_ext.ops.alignment_mix` bit for bit. The kernels live
in csrc/dial_mix.cpp (C++ for CPU, CUDA for GPUs); `reference_dial_mix` is the plain PyTorch composition.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops  # loads the compiled library (registers torch.ops.clm_ext)

__all__ = ["dial_mix", "dial_embedding_lerp", "reference_dial_mix"]


def _check_dials(name: str, weight: Tensor, bias: Optional[Tensor], like: Tensor, d: int) -> int:
    if not isinstance(weight, Tensor) or weight.dim() != 3 or weight.shape[1:] != (d, d) or weight.shape[0] < 1:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{name}: weight must have shape (K, {d}, {d}), K >= 1 stacked dial layers, got {got}")
    dials = weight.shape[0]
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (dials, d)):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{name}: bias must have shape ({dials}, {d}) or be None, got {got}")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != like.dtype or t.device != like.device):
            raise TypeError(f"{name}: {what} is {t.dtype} on {t.device}, the input {like.dtype} on {like.device}")
    return dials


def _alpha_rows(name: str, alpha: Tensor, dials: int, batch_shape: torch.Size, like: Tensor) -> Tensor:
    """alpha as [S, K]: [K] -> one row for all; [B, K] per sequence; [*batch_shape, K] per token."""
    if not isinstance(alpha, Tensor) or not alpha.is_floating_point():
        raise TypeError(f"{name}: alpha must be a floating-point tensor of {dials} dial values per row, got "
                        f"{alpha.dtype if isinstance(alpha, Tensor) else type(alpha).__name__}")
    if alpha.device != like.device:
        raise ValueError(f"{name}: alpha is on {alpha.device}, the input on {like.device}")
    per_sequence = alpha.dim() == 2 and len(batch_shape) >= 1 and alpha.shape[0] == batch_shape[0]
    per_token = alpha.shape == tuple(batch_shape) + (dials,)
    if alpha.shape != (dials,) and not (alpha.shape[-1:] == (dials,) and (per_sequence or per_token)):
        raise ValueError(
            f"{name}: alpha must have shape ({dials},) (one vector for all rows), ({batch_shape[0] if batch_shape else 'B'}, "
            f"{dials}) (one per sequence) or {tuple(batch_shape) + (dials,)} (one per token), got {tuple(alpha.shape)}"
        )
    if alpha.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(alpha).all()):
        raise ValueError(f"{name}: alpha must be finite, got {alpha.tolist()}")
    return alpha.reshape(-1, dials)


def dial_mix(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Tensor) -> Tensor:
    """h = x + sum_k alpha_k (x W_k^T + b_k - x), fused; x is [..., d], weight [K, d, d], alpha see module doc."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError("dial_mix: x must be a floating-point tensor with a hidden dimension")
    dials = _check_dials("dial_mix", weight, bias, x, x.shape[-1])
    return torch.ops.clm_ext.dial_mix(x, weight, bias, _alpha_rows("dial_mix", alpha, dials, x.shape[:-1], x))


def dial_embedding_lerp(input_ids: Tensor, embed_weight: Tensor, aligned_weights: Tensor, alpha: Tensor) -> Tensor:
    """E[id] + sum_k alpha_k (T_k[id] - E[id]) for cached aligned tables T_k = E W_k^T + b_k ([K, V, d]): the
    decode path of frozen dials, no GEMM per step. Inference only (no autograd)."""
    ops._check_ids("dial_embedding_lerp", input_ids, embed_weight)
    if aligned_weights.dim() != 3 or aligned_weights.shape[1:] != embed_weight.shape:
        raise ValueError(
            f"dial_embedding_lerp: aligned_weights must have shape (K, {', '.join(map(str, embed_weight.shape))}), "
            f"got {tuple(aligned_weights.shape)}"
        )
    alpha = _alpha_rows("dial_embedding_lerp", alpha, aligned_weights.shape[0], input_ids.shape, embed_weight)
    return torch.ops.clm_ext.dial_embedding_lerp(input_ids, embed_weight, aligned_weights, alpha)


def reference_dial_mix(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Tensor) -> Tensor:
    """The eager composition the fused op replaces: K aligned copies of x, then a weighted sum."""
    dials, d = weight.shape[0], x.shape[-1]
    rows = x.reshape(-1, d)
    a = alpha.reshape(-1, dials).to(torch.promote_types(alpha.dtype, x.dtype))
    a = a.repeat_interleave(rows.shape[0] // a.shape[0], dim=0)
    h = rows.to(a.dtype)
    for k in range(dials):
        aligned = torch.nn.functional.linear(rows, weight[k], None if bias is None else bias[k])
        h = h + a[:, k:k + 1] * (aligned - rows).to(a.dtype)
    return h.to(x.dtype).reshape(x.shape)


@torch.library.register_fake("clm_ext::dial_mix")
def _dial_mix_fake(x, weight, bias, alpha):
    return x.new_empty(x.shape)


@torch.library.register_fake("clm_ext::dial_embedding_lerp")
def _dial_embedding_lerp_fake(input_ids, embed_weight, aligned_weights, alpha):
    return embed_weight.new_empty(input_ids.shape + (embed_weight.shape[1],))


@torch.library.register_fake("clm_ext::dial_mix_backward")
def _dial_mix_backward_fake(grad, x, weight, bias, alpha, output_mask):
    shapes = (x.shape, weight.shape, weight.shape[:2], alpha.shape)
    likes = (x, weight, weight, alpha)
    return tuple(like.new_empty(s if need else (0,)) for like, s, need in zip(likes, shapes, output_mask))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dial_mix_backward(ctx, grad):
    x, weight, bias, alpha = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], bias is not None and need[2], need[3]]
    grads = torch.ops.clm_ext.dial_mix_backward(grad, x, weight, bias, alpha, mask)
    return tuple(g if m else None for g, m in zip(grads, mask))


torch.library.register_autograd("clm_ext::dial_mix", _dial_mix_backward, setup_context=_save_inputs)
