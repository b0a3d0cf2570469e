"""Each request's alpha, and the per-token alpha buffer the aligned embedding reads.

In vLLM a forward pass is one packed row of tokens from many requests, so the dial is a per-token alpha:
each request's alpha repeated over its scheduled tokens (LoRA's token mapping, for alphas). The buffer
has a fixed address (CUDA graphs replay it) and is written before every forward by the runner hook; a
forward that finds it unwritten raises instead of serving stale or default alphas.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from ..alpha import alpha_number

SALT_PREFIX = "clm-alpha:"


def request_alpha(sampling_params, default: float) -> float:
    """The alpha a request asked for (`SamplingParams.extra_args["alpha"]`), else the checkpoint's default."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if "alpha" not in extra:
        return default
    return alpha_number(extra["alpha"], "vllm_xargs.alpha")


def cache_salt(alpha: float, salt: Optional[str]) -> str:
    """The prefix-cache salt of a request at `alpha`: in mode embed every layer's KV depends on alpha, so
    blocks may be shared only between requests at the same alpha (and the same user salt)."""
    ours = f"{SALT_PREFIX}{alpha!r}"
    return ours if not salt else f"{ours}|{salt}"


class TokenAlpha:
    """The per-token alpha buffer of one model, and whether it was written for the coming forward."""

    def __init__(self, max_tokens: int, default_alpha: float, device) -> None:
        self.buffer = torch.zeros(max_tokens, dtype=torch.float32, device=device)
        self.default_alpha = default_alpha
        self._written: Optional[int] = None  # tokens written for the next forward, None if not written
        self._dummy = False

    def write(self, alphas: np.ndarray) -> None:
        """Write one alpha per scheduled token (float32, in the batch's token order)."""
        n = len(alphas)
        if n > self.buffer.shape[0]:
            raise RuntimeError(f"clm-ext: {n} tokens scheduled, the alpha buffer holds {self.buffer.shape[0]}")
        self.buffer[:n].copy_(torch.from_numpy(np.ascontiguousarray(alphas, dtype=np.float32)))
        self._written, self._dummy = n, False

    def write_requests(self, alphas: list, num_scheduled_tokens) -> None:
        """Each request's alpha repeated over its scheduled tokens."""
        self.write(np.repeat(np.asarray(alphas, dtype=np.float32), np.asarray(num_scheduled_tokens)))

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
