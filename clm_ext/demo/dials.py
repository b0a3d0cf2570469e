"""The alignment-strength dials a user could pick instead of the CLM layer, in the form the demo's sampling
(`sampling.sample`) and scoring (`sweep.score`) take, so that every dial is measured on one evaluation.

- DeRa (decoding-time realignment, arXiv 2402.02992): the aligned model and the base model both run; the
  next-token logits are mixed per token, `base + strength (aligned - base)`.
- ExPO (model extrapolation, arXiv 2404.16792): the weights `base + strength (aligned - base)`, one merged
  model per strength.
- LoRA scale: a LoRA adapter's scaling multiplied by the strength (PEFT's `rescale_adapter_scale`).
"""
from contextlib import contextmanager

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList


class _MixWithBase(LogitsProcessor):
    """Replaces the aligned model's logits by `base + strength (aligned - base)`. The base model runs beside
    the generation with its own KV cache, fed the same tokens, attention mask and positions as `generate`
    gives the aligned model (left padding: position = running count of attended tokens - 1)."""

    def __init__(self, base, attention_mask: torch.Tensor, strength: float):
        self.base = base
        self.mask = attention_mask
        self.strength = strength
        self.cache = None
        self.positions = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.cache = DynamicCache(config=self.base.config)
            ids = input_ids
            self.positions = (self.mask.long().cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        else:
            ids = input_ids[:, -1:]
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
            self.positions = self.positions[:, -1:] + 1
        with torch.no_grad():
            out = self.base(input_ids=ids, attention_mask=self.mask, position_ids=self.positions,
                            cache=self.cache, use_cache=True)
        base_logits = out.logits[:, -1].float()
        return base_logits + self.strength * (scores.float() - base_logits)


class DeRa:
    """Two models, one dial: `generate` runs `aligned` and mixes its logits with `base`'s at `strength`
    (strength 0: the base model's distribution, 1: the aligned model's). Quacks like the model that
    `sampling.sample` expects (`device`, `eval`, `generate`). The mix runs after `generate`'s own logits
    processors (min_new_tokens, repetition penalty ...), so pass none that alter the aligned model's logits:
    the demo's sampling uses none."""

    def __init__(self, aligned, base, strength: float = 1.0):
        if aligned.config.vocab_size != base.config.vocab_size:
            raise ValueError(f"DeRa: aligned and base vocabularies differ ({aligned.config.vocab_size} against "
                             f"{base.config.vocab_size})")
        self.aligned, self.base, self.strength = aligned, base, strength

    @property
    def device(self):
        return self.aligned.device

    def eval(self):
        self.aligned.eval()
        self.base.eval()
        return self

    def generate(self, input_ids, attention_mask, logits_processor=None, **kwargs):
        mix = _MixWithBase(self.base, attention_mask, self.strength)
        processors = LogitsProcessorList([mix, *(logits_processor or [])])  # mixed before sampling
        return self.aligned.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     logits_processor=processors, **kwargs)


def weight_delta(aligned, base) -> dict:
    """aligned - base per floating-point tensor of the state dict (ExPO's direction)."""
    base_state = base.state_dict()
    return {k: (v - base_state[k]).detach().clone() for k, v in aligned.state_dict().items()
            if v.is_floating_point()}


def extrapolate(model, base_state: dict, delta: dict, strength: float):
    """Set `model`'s weights to base + strength * delta in place (one merged model per strength); returns it."""
    state = model.state_dict()
    missing = set(delta) - set(state)
    if missing:
        raise ValueError(f"extrapolate: the model lacks {len(missing)} tensors of delta, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for name, d in delta.items():
            state[name].copy_(base_state[name] + strength * d)
    return model


@contextmanager
def lora_scale(model, strength: float):
    """The LoRA adapter of a PEFT `model` at `strength` times its trained scaling (0: the base model)."""
    from peft.helpers import rescale_adapter_scale

    with rescale_adapter_scale(model, float(strength)):
        yield model
