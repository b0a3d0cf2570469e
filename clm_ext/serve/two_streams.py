"""Mode 'logits' in the paged engine: both streams of every request in one forward, logits mixed per token.

Each forward of the engine runs the causal LM twice over the same packed tokens: the aligned stream (the
alignment layer at alpha 1) in the cache layers the model has, then the unaligned stream (alpha 0: the base
model) in as many more, its attention layers' cache indices shifted past the first set. The logits are then
mixed per token, l_u + alpha (l_a - l_u), as `clm_ext.generate` mixes them in mode 'logits', before the
sampling hook and the engine's argmax see them: the two streams of a request can never be scheduled apart,
and they share every sampled token. Cost: two forwards and two KV caches per request.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class TwoStreams:
    """Wraps `model.forward` (the hooks of model(...) still run around it); stream = 'aligned' then 'base'."""

    def __init__(self, model: nn.Module, site, cache_layers: int):
        self.model, self.site, self.shift = model, site, cache_layers
        # Every module that picks a cache layer by index: the decoder layers' attention and the block's.
        self.indexed = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        self._alpha: Optional[Tensor] = None
        self._forward = model.forward
        model.forward = self.forward

    def remove(self) -> None:
        if self.model.__dict__.get("forward") == self.forward:
            del self.model.forward

    def set_token_alpha(self, alpha: Tensor) -> None:
        """The merge coefficient of each packed token, for the next forward only."""
        self._alpha = alpha

    def forward(self, *args, **kwargs):
        alpha, self._alpha = self._alpha, None
        if alpha is None:  # not an engine forward: the model as it is
            return self._forward(*args, **kwargs)
        self.site.set_token_alpha(torch.ones_like(alpha))
        aligned = self._forward(*args, **kwargs)
        self.site.set_token_alpha(torch.zeros_like(alpha))
        for module in self.indexed:
            module.layer_idx += self.shift
        try:
            base = self._forward(*args, **kwargs)
        finally:
            for module in self.indexed:
                module.layer_idx -= self.shift
        positions = kwargs.get("logits_to_keep")  # the token of each logits row (else one row per token)
        rows = alpha[positions.to(alpha.device)] if isinstance(positions, Tensor) else alpha
        a = rows.to(base.logits.device).view(1, -1, 1)
        aligned.logits = base.logits + (a * (aligned.logits - base.logits).to(a.dtype)).to(base.logits.dtype)
        return aligned
