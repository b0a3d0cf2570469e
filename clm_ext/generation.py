"""Generation with one alignment strength per request, in one batched `generate` call.

Mode "logits" needs nothing here: the wrapped model's forward already runs both streams (each with its
own KV-cache rows) and mixes the logits, so `model.generate` works as is.
"""
from __future__ import annotations

from numbers import Real
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .model import alignment_strength, require_site


# Sampling below this temperature is greedy decoding. logits / t overflows float32 once t nears 1e-38 (softmax
# then gives NaN), and long before that the distribution is one-hot but for exact ties. One rule for
# `generate`, `clm generate` and `clm serve`, so no accepted temperature can fail there.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    """Whether sampling at `temperature` is greedy decoding (temperature 0, or below GREEDY_BELOW)."""
    return temperature < GREEDY_BELOW


def _greedy_when_cold(model: nn.Module, kwargs: dict) -> dict:
    """generate_kwargs with sampling turned into greedy decoding when the temperature is below GREEDY_BELOW."""
    config = getattr(model, "generation_config", None)
    do_sample = kwargs.get("do_sample", getattr(config, "do_sample", False))
    temperature = kwargs.get("temperature", getattr(config, "temperature", None))
    if not do_sample or temperature is None or not is_greedy(temperature):
        return kwargs
    kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")}
    return {**kwargs, "do_sample": False}


def chat_prompt(tokenizer, text: str, chat: bool = True) -> str:
    """`text` as a user turn in the tokenizer's chat template, ready for the reply (an instruct model answers it
    instead of continuing it); `text` unchanged when `chat` is False or the tokenizer has no template."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Union[str, Sequence[str]],
    alphas: Optional[Union[float, dict, Sequence[Union[float, dict]]]] = None,
    **generate_kwargs,
) -> List[str]:
    """Complete `prompts`, each at its own alpha, in one left-padded batch; return the completions.

    prompts: a list of strings, with `alphas` one float for all or one per prompt; or a single string,
    with `alphas` a list: that prompt at every alpha (a sweep). alphas=None uses the model's current alpha.
    A model with named dials takes dicts {dial: alpha} in place of numbers: one dict for all prompts, or one
    per prompt (a dial a dict leaves out is at 0).
    generate_kwargs go to `model.generate` (max_new_tokens defaults to 32; with num_return_sequences=n the
    result holds n completions per prompt, consecutive); sampling below GREEDY_BELOW is greedy. The model's
    alpha is restored afterwards.
    """
    site = require_site(model, "generate")
    if isinstance(prompts, str):
        if alphas is None or isinstance(alphas, dict) or _is_one_alpha(alphas):
            prompts = [prompts]
        else:
            prompts = [prompts] * len(alphas)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("generate: prompts must be a string or a non-empty list of strings")
    if alphas is None:
        alpha = site.alpha
    elif isinstance(alphas, dict):
        alpha = alphas
    elif _is_one_alpha(alphas):
        alpha = float(alphas)
    else:
        alpha = [a if isinstance(a, dict) else float(a) for a in alphas]
        if len(alpha) != len(prompts):
            raise ValueError(
                f"generate: alphas has {len(alpha)} values but there are {len(prompts)} prompts "
                "(give one alpha, one per prompt, or one prompt and a list of alphas)"
            )
    device = next(model.parameters()).device
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("generate: the tokenizer has neither a pad nor an eos token to pad the batch with")
        tokenizer.pad_token = tokenizer.eos_token
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right end
    bos = tokenizer.bos_token
    rendered = bool(bos) and all(p.startswith(bos) for p in prompts)  # a chat template already put BOS there
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not rendered).to(device)
    finally:
        tokenizer.padding_side = side
    generate_kwargs = _greedy_when_cold(model, generate_kwargs)
    generate_kwargs.setdefault("max_new_tokens", 32)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    with alignment_strength(model, alpha), torch.no_grad():
        out = model.generate(**batch, **generate_kwargs)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _is_one_alpha(alphas) -> bool:
    """A single number: a Python or numpy scalar (np.float32 is no float), or a 0-d tensor or array."""
    return isinstance(alphas, Real) or getattr(alphas, "ndim", None) == 0
