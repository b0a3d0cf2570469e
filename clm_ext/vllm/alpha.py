"""Each request's alpha, and the per-token alpha buffer the aligned embedding reads.

In vLLM a forward pass is one packed row of tokens from many requests, so the dial is a per-token alpha:
each request's alpha repeated over its scheduled tokens (LoRA's token mapping, for alphas). With named dials
a request's alpha is a vector (one value per dial) and the buffer a per-token alpha matrix [tokens, K]. The
buffer has a fixed address (CUDA graphs replay it) and is written before every forward by the runner hook; a
forward that finds it unwritten raises instead of serving stale or default alphas.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from ..alpha import AlphaError, alpha_number, request_dial_vector, show

SALT_PREFIX = "clm-alpha:"
NAME = "vllm_xargs.alpha"


def request_alpha(sampling_params, default, dials: Optional[list] = None):
    """The alpha a request asked for (`SamplingParams.extra_args["alpha"]`), else the checkpoint's default:
    a float, or with named `dials` a tuple in their order ({dial: value}, or the same as a flat list
    [dial, value, ...]; a dial left out is at 0; a plain number only for a one-dial model)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if "alpha" not in extra:
        return default
    value = extra["alpha"]
    if dials is None:
        return alpha_number(value, NAME)
    return tuple(request_dial_vector(dial_pairs(value) if isinstance(value, list) else value, dials, NAME))


def dial_pairs(values: list) -> dict:
    """[dial, value, dial, value, ...] as {dial: value}: how a dial vector travels in the `vllm_xargs` of
    vLLM's OpenAI server, whose schema holds numbers, strings and flat lists but no objects."""
    names = values[0::2]
    if len(values) % 2 or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise AlphaError(f"{NAME} as a list must alternate distinct dial names and values, [dial, value, ...], got "
                         f"{show(values)}", NAME)
    return dict(zip(names, values[1::2]))


def cache_salt(alpha, salt: Optional[str]) -> str:
    """The prefix-cache salt of a request at `alpha` (a number, or the tuple of its dials' values): in mode
    embed every layer's KV depends on alpha, so blocks may be shared only between requests at the same alpha
    vector (and the same user salt)."""
    ours = f"{SALT_PREFIX}{alpha!r}"
    return ours if not salt else f"{ours}|{salt}"


class TokenAlpha:
    """The per-token alpha buffer of one model ([max_tokens], or [max_tokens, K] for K named dials), and
    whether it was written for the coming forward."""

    def __init__(self, max_tokens: int, default_alpha: float, device, dials: Optional[list] = None) -> None:
        shape = (max_tokens,) if dials is None else (max_tokens, len(dials))
        self.buffer = torch.zeros(shape, dtype=torch.float32, device=device)
        self.dials = None if dials is None else list(dials)
        # a request without an alpha: every dial at the checkpoint's default
        self.default_alpha = default_alpha if dials is None else (default_alpha,) * len(dials)
        self._written: Optional[int] = None  # tokens written for the next forward, None if not written
        self._dummy = False

    def write(self, alphas: np.ndarray) -> None:
        """Write one alpha (vector) per scheduled token (float32, in the batch's token order)."""
        n = len(alphas)
        if n > self.buffer.shape[0]:
            raise RuntimeError(f"clm-ext: {n} tokens scheduled, the alpha buffer holds {self.buffer.shape[0]}")
        self.buffer[:n].copy_(torch.from_numpy(np.ascontiguousarray(alphas, dtype=np.float32)))
        self._written, self._dummy = n, False

    def write_requests(self, alphas: list, num_scheduled_tokens) -> None:
        """Each request's alpha (vector) repeated over its scheduled tokens."""
        values = np.asarray(alphas, dtype=np.float32).reshape((len(alphas),) + tuple(self.buffer.shape[1:]))
        self.write(np.repeat(values, np.asarray(num_scheduled_tokens), axis=0))

    def start_dummy(self) -> None:
        """Profiling, warm-up and graph-capture runs (no requests, outputs discarded) until the next
        write: alpha 0, and forwards may run any number of times (a graph capture warms up first)."""
        self.buffer.zero_()
        self._dummy = True

    @contextlib.contextmanager
    def dummy_run(self):
        self.start_dummy()
        try:
            yield
        finally:
            self._dummy = False

    def take(self, num_tokens: int) -> torch.Tensor:
        """The alphas of this forward's tokens (padded tokens beyond the written ones get whatever the
        buffer holds; their outputs are discarded). Raises if the hook did not write them."""
        written, self._written = self._written, None
        if self._dummy:
            return self.buffer[:num_tokens]
        if written is None:
            raise RuntimeError(
                "clm-ext: the per-token alpha buffer was not written for this forward pass, so the requests' "
                "alphas are unknown; the hook into this vLLM version's model runner did not run "
                "(see clm_ext/vllm/hooks.py). Refusing to serve a default alpha."
            )
        if written > num_tokens:
            raise RuntimeError(f"clm-ext: alphas were written for {written} tokens, the forward has {num_tokens}")
        return self.buffer[:num_tokens]
