"""Scoring of sampled completions: VADER reward (mean, standard error) and fluency.

Fluency is measured two ways so that over-extrapolation shows: the *base* model's perplexity of the
completions (text the base model finds unlikely has drifted off the corpus) and distinct-n (the share of
unique n-grams; degenerate repetition lowers it).
"""
import math

import torch

from .judge import mean_and_stderr, rewards


def distinct_n(texts: list, n: int) -> float:
    """Unique word n-grams / all word n-grams over `texts` (0 when there are none)."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def perplexity(model, tokenizer, prompts: list, completions: list, batch_size: int = 256) -> float:
    """exp(mean NLL per completion token, EOS included) under `model`, given each completion's prompt."""
    if len(prompts) != len(completions):
        raise ValueError(f"perplexity: {len(prompts)} prompts but {len(completions)} completions")
    total_nll, total_tokens = 0.0, 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        rows, labels = [], []
        for prompt, completion in zip(prompts[start:start + batch_size], completions[start:start + batch_size]):
            p = tokenizer(prompt)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
        lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = lab[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((target != -100).sum())
    return math.exp(total_nll / total_tokens)


def score(completions: list, prompts: list, base_model, tokenizer) -> dict:
    """Reward mean and standard error, base-model perplexity and distinct-1/2 of one set of completions."""
    mean, stderr = mean_and_stderr(rewards(completions))
    return {
        "reward": mean,
        "reward_stderr": stderr,
        "perplexity": perplexity(base_model, tokenizer, prompts, completions),
        "distinct_1": distinct_n(completions, 1),
        "distinct_2": distinct_n(completions, 2),
        "n": len(completions),
    }


def score_sweep(samples, alphas: list, base_model, tokenizer) -> list:
    """`score` for each alpha of a per-sequence-alpha sample, in the order of `alphas`."""
    out = []
    for alpha in alphas:
        picked = [i for i, a in enumerate(samples.alphas) if a == alpha]
        out.append(score([samples.completions[i] for i in picked], [samples.prompts[i] for i in picked],
                         base_model, tokenizer))
    return out
