"""What a valid alpha is, in one place: the library, the ops' Python wrappers, `clm serve` and the vLLM
plugin check a user's alpha here, so they accept and refuse the same values with the same words.

An alpha is a real number (not a bool, a string or None) that stays finite in the dtype it is computed in
(float32 unless the inputs are float64: a float64 1e300 is inf in float32, and so is a 400-digit integer),
given as one number, a 0-d tensor, one value per sequence ([batch]) or one per token ([tokens], the packed
row of a continuous-batching engine). Messages name the argument and show the value as given, never rounded.

A request names its alpha at the top level ("alpha", what `clm serve` clients and the `openai` client's
`extra_body` send) or in "vllm_xargs" (what vLLM forwards to the model); `alpha_from_request` owns that rule.
Its `check` argument is the per-value rule, so a request carrying a vector of named dials can reuse the rule
with a checker for that vector.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Optional

import torch
from torch import Tensor

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class AlphaError(ValueError):
    """A bad alpha; `param` is the argument or request field it is about (what a server's 400 names)."""

    def __init__(self, message: str, param: str = "alpha") -> None:
        super().__init__(message)
        self.param = param


class AlphaTypeError(AlphaError, TypeError):
    """An alpha of the wrong type: a bool, a string, None, an integer or complex tensor."""


def show(value) -> str:
    """A user's value as they wrote it: repr for numbers (-2.0000001 stays -2.0000001), a size for huge ints."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, float):
        return float.__repr__(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _finite_in(value: float, dtype: torch.dtype) -> bool:
    return math.isfinite(value) and (dtype == torch.float64 or abs(value) <= FLOAT32_MAX)


def _not_finite(name: str, shown: str, dtype: torch.dtype) -> AlphaError:
    bound = "" if dtype == torch.float64 else " (|alpha| <= 3.4e38)"
    return AlphaError(f"{name} must be finite in {_dtype_name(dtype)}{bound}, got {shown}", name)


def alpha_number(value, name: str = "alpha", dtype: torch.dtype = torch.float32,
                 expected: str = "a number") -> float:
    """One alpha as a Python float: a real number (bools, strings, None refused) finite in `dtype`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise AlphaTypeError(f"{name} must be {expected}, got {show(value)}", name)
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64 (a JSON integer with 400 digits)
        raise _not_finite(name, show(value), dtype) from None
    if not _finite_in(number, dtype):
        raise _not_finite(name, show(value), dtype)
    return number


def check_alpha_values(alpha: Tensor, name: str = "alpha", dtype: torch.dtype = torch.float32) -> None:
    """Every value of an alpha tensor finite in `dtype`; the message shows the first bad one and its index.
    Reads the values: call it on the host, not per step on an accelerator (it would sync)."""
    flat = alpha.detach().reshape(-1)
    start = 0
    if flat.numel() > 64:  # a per-token alpha: one reduction rather than a Python loop
        bad = (~torch.isfinite(flat.to(dtype))).nonzero()
        if not bad.numel():
            return
        start = int(bad[0, 0])
    for i, v in enumerate(flat[start:].tolist(), start):
        if not _finite_in(v, dtype):
            raise _not_finite(name, show(v) + (f" at index {i}" if alpha.dim() else ""), dtype)


def check_alpha_shape(alpha: Tensor, name: str = "alpha", length: Optional[int] = None,
                      per: str = "sequence") -> None:
    """0-d (one alpha for all), or 1-D with one value per `per` (`length` of them, when given)."""
    if alpha.dim() > 1:
        raise AlphaError(f"{name} must be 0-d or 1-D (one value per {per}), got shape {tuple(alpha.shape)}", name)
    if alpha.dim() == 1 and length is not None and alpha.shape[0] != length:
        raise AlphaError(
            f"{name} has {alpha.shape[0]} values but the batch has {length} {per}s "
            f"(expected a 0-d tensor or shape [{length}])", name
        )
    if alpha.dim() == 1 and alpha.numel() == 0 and length is None:  # an empty batch may have no alphas
        raise AlphaError(f"{name} must hold at least one value, got an empty tensor", name)


def alpha_tensor(alpha, name: str = "alpha") -> Tensor:
    """A user's alpha as a float32 tensor: 0-d, or 1-D with one value per sequence (or token). Accepts a
    number, a list or tuple of numbers, or a real tensor; checks values in float32, where the dial runs."""
    if isinstance(alpha, (list, tuple)):
        if not alpha:
            raise AlphaError(f"{name} must hold at least one value, got {show(alpha)}", name)
        return torch.tensor([alpha_number(a, f"{name}[{i}]") for i, a in enumerate(alpha)], dtype=torch.float32)
    if not isinstance(alpha, Tensor):
        return torch.tensor(alpha_number(alpha, name, expected="a float or a 1-D tensor of one alpha per sequence"),
                            dtype=torch.float32)
    if alpha.dtype == torch.bool or alpha.is_complex():
        raise AlphaTypeError(f"{name} must be a real tensor, got dtype {alpha.dtype}", name)
    check_alpha_shape(alpha, name)
    check_alpha_values(alpha, name)
    return alpha.detach().to(torch.float32)


def expand_alpha(alpha: Tensor, rows: int, dials: bool = False) -> Tensor:
    """One alpha (with `dials`, one dial vector) per row. A per-sequence alpha of length B meeting k*B rows is
    repeated k times per sequence (repeat_interleave), the way `generate` expands a batch for
    num_return_sequences and beams."""
    if alpha.dim() == int(dials) or alpha.shape[0] == rows:
        return alpha
    n = alpha.shape[0]
    if rows % n:
        what = "dial vectors" if dials else "values"
        raise AlphaError(
            f"alpha has {n} {what} (one per sequence) but the batch has {rows} rows; set a single alpha or "
            f"one per row (clm_ext.set_alpha)"
        )
    return alpha.repeat_interleave(rows // n, dim=0)


def alpha_from_request(body: dict, check: Callable = alpha_number):
    """The alpha a request body asks for, or None when it names none.

    It may come as a top-level "alpha" or as "vllm_xargs": {"alpha": ...}; both together only if they agree.
    A field that is present is checked with `check(value, field_name)` (null included: refused, not a default).
    """
    found = {}
    if "alpha" in body:
        found["alpha"] = check(body["alpha"], "alpha")
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise AlphaError(f"vllm_xargs must be an object, got {type(xargs).__name__}", "vllm_xargs")
    if xargs and "alpha" in xargs:
        found["vllm_xargs.alpha"] = check(xargs["alpha"], "vllm_xargs.alpha")
    if len(found) == 2 and found["alpha"] != found["vllm_xargs.alpha"]:
        raise AlphaError(
            f"alpha ({show(found['alpha'])}) and vllm_xargs.alpha ({show(found['vllm_xargs.alpha'])}) disagree; "
            "send one of them", "alpha"
        )
    return next(iter(found.values()), None)


# ------------------------------------------------------------------------------------------------
# Named dials: an alpha vector, one value per dial, given as a dict {dial name: alpha}.


def dial_vector(values, dials, name: str = "alpha") -> list:
    """One dict {dial: alpha} as a list of floats in the order of `dials`; a dial the dict leaves out is 0.
    An unknown key, a non-string key or a value that is not a finite number is refused, naming it."""
    if not isinstance(values, dict):
        raise AlphaTypeError(
            f"{name} must be a dict of dial name -> alpha (the model's dials: {list(dials)}), got {show(values)}", name
        )
    for key in values:
        if key not in dials:
            raise AlphaError(f"{name} names the dial {show(key)}, which the model does not have (its dials: "
                             f"{list(dials)})", name)
    return [alpha_number(values[d], f"{name}[{d!r}]") if d in values else 0.0 for d in dials]


def request_dial_vector(value, dials, name: str = "alpha") -> list:
    """A request's alpha for a server whose model has named dials (`clm serve`, the vLLM plugin): {dial: value}
    as a list in the order of `dials` (a dial left out is 0), or a plain number for a model with one dial."""
    dials = list(dials)
    if isinstance(value, Real) and not isinstance(value, bool) and len(dials) == 1:
        value = {dials[0]: value}
    if not isinstance(value, dict):
        raise AlphaTypeError(f"{name} must be an object of dial alphas such as {{{dials[0]!r}: 1.0}}: the model has "
                             f"the dials {dials}, got {show(value)}", name)
    return dial_vector(value, dials, name)


def dial_alpha_tensor(alpha, dials, name: str = "alpha") -> Tensor:
    """A user's alpha for a model with named dials, as float32: a dict -> [K] (the whole batch), a list of
    dicts -> [B, K] (one vector per sequence), or a real tensor of shape [K] or [rows, K] (checked)."""
    dials = list(dials)
    if isinstance(alpha, dict):
        return torch.tensor(dial_vector(alpha, dials, name), dtype=torch.float32)
    if isinstance(alpha, (list, tuple)):
        if not alpha:
            raise AlphaError(f"{name} must hold at least one dict of dial alphas, got {show(alpha)}", name)
        return torch.tensor([dial_vector(a, dials, f"{name}[{i}]") for i, a in enumerate(alpha)], dtype=torch.float32)
    if not isinstance(alpha, Tensor):
        raise AlphaTypeError(
            f"{name} must be a dict of dial name -> alpha or a list of such dicts (one per sequence); the model "
            f"has the dials {dials}, got {show(alpha)}", name
        )
    if alpha.dtype == torch.bool or alpha.is_complex():
        raise AlphaTypeError(f"{name} must be a real tensor, got dtype {alpha.dtype}", name)
    if alpha.dim() not in (1, 2) or alpha.shape[-1] != len(dials) or alpha.numel() == 0:
        raise AlphaError(f"{name} must have shape [{len(dials)}] or [rows, {len(dials)}] (dials {dials}), got "
                         f"shape {tuple(alpha.shape)}", name)
    check_alpha_values(alpha, name)
    return alpha.detach().to(torch.float32)
