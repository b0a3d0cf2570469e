"""Seeded batched sampling of completions, for the preference pairs and the alpha sweep.

Sampling uses the Gumbel-max trick with *common random numbers*: the noise of sample j of prompt i at step t
depends only on (seed, i, j, t), never on the row's alpha or position in the batch. Each completion is still
an exact sample from the model's distribution at its alpha, but the completions of one (prompt, sample) at
different alphas (or from different models) share their randomness, so reward differences between alphas
are measured with far less noise than with independent draws. Every row carries its own alpha
(`clm_ext.alignment_strength` with one alpha per row), so a whole sweep is one batched `generate` per chunk.
"""
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..model import alignment_strength


@dataclass
class Samples:
    prompts: list      # one per completion
    completions: list
    alphas: list       # one per completion, or None for a model without an alignment layer
    new_tokens: int    # generated tokens (up to and including EOS), for tokens/s
    seconds: float
    finished: list = field(default_factory=list)  # per completion: the model ended it (EOS within the limit)


class CommonNoiseSampler(LogitsProcessor):
    """Turns greedy decoding into sampling at `temperature`: adds Gumbel noise drawn from a generator seeded by
    (seed, the row's noise id, the step), so a row's noise never depends on its batch."""

    def __init__(self, noise_ids: torch.Tensor, prompt_width: int, seed: int, temperature: float = 1.0):
        self.noise_ids = noise_ids.tolist()
        self.prompt_width = prompt_width
        self.seed = seed
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        unique = sorted(set(self.noise_ids))
        u = torch.empty((len(unique), scores.shape[-1]))
        for k, noise_id in enumerate(unique):
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + noise_id) * 4_099 + step)
            torch.rand(scores.shape[-1], generator=gen, out=u[k])
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        where = {noise_id: k for k, noise_id in enumerate(unique)}
        rows = torch.tensor([where[i] for i in self.noise_ids])
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return logp + gumbel[rows].to(scores.device)


def sample(model, tokenizer, prompts: list, samples: int, seed: int, max_new_tokens: int,
           alphas: list = None, batch_size: int = 512, progress=None, temperature: float = 1.0) -> Samples:
    """`samples` completions of every prompt (at every alpha in `alphas` when given), in chunks of rows."""
    if samples < 1:
        raise ValueError(f"sample: samples must be >= 1, got {samples}")
    if temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature}")
    rows = [(a, i, j) for a in (alphas if alphas is not None else [None])
            for i in range(len(prompts)) for j in range(samples)]
    out = Samples([], [], [] if alphas is not None else None, 0, 0.0)
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        chunk_prompts = [prompts[i] for _, i, _ in chunk]
        noise_ids = torch.tensor([i * samples + j for _, i, j in chunk])
        begin = time.perf_counter()
        if alphas is None:
            new = _generate(model, tokenizer, chunk_prompts, noise_ids, seed, max_new_tokens, temperature)
        else:
            with alignment_strength(model, [a for a, _, _ in chunk]):
                new = _generate(model, tokenizer, chunk_prompts, noise_ids, seed, max_new_tokens, temperature)
        out.seconds += time.perf_counter() - begin
        out.new_tokens += int((new != tokenizer.pad_token_id).sum())
        out.prompts += chunk_prompts
        out.completions += tokenizer.batch_decode(new, skip_special_tokens=True)
        out.finished += (new == tokenizer.eos_token_id).any(dim=1).tolist()
        if alphas is not None:
            out.alphas += [a for a, _, _ in chunk]
        if progress is not None:
            progress.update(len(chunk))
    return out


def encode(tokenizer, prompts: list):
    """A left-padded batch of prompts; prompts a chat template rendered (with its BOS) get no second BOS."""
    bos = tokenizer.bos_token
    rendered = bool(bos) and all(p.startswith(bos) for p in prompts)
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not rendered)


def _generate(model, tokenizer, prompts, noise_ids, seed, max_new_tokens, temperature) -> torch.Tensor:
    """The new token ids of a left-padded batch (rows that finished are padded with pad)."""
    batch = encode(tokenizer, prompts).to(model.device)
    width = batch["input_ids"].shape[1]
    sampler = CommonNoiseSampler(noise_ids, width, seed, temperature)
    with torch.no_grad():
        ids = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             logits_processor=LogitsProcessorList([sampler]),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return ids[:, width:]
