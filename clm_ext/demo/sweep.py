"""Scoring of sampled completions: VADER reward (mean, standard error) and fluency.

Fluency is measured two ways so that over-extrapolation shows: the *base* model's perplexity of the
completions (text the base model finds unlikely has drifted off the corpus) and distinct-n (the share of
unique n-grams; degenerate repetition lowers it).
"""
import math
import os
import re
from functools import lru_cache

import torch

from .judge import heldout_rewards, mean_and_stderr, rewards


def distinct_n(texts: list, n: int) -> float:
    """Unique word n-grams / all word n-grams over `texts` (0 when there are none)."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(texts: list, n: int = 4) -> float:
    """Share of `texts` in which some word n-gram occurs more than once (degenerate repetition); words are
    compared lower-cased and without punctuation."""
    def repeats(words):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        return len(set(grams)) < len(grams)

    return sum(repeats(re.findall(r"[a-z0-9']+", t.lower())) for t in texts) / len(texts) if texts else 0.0


@lru_cache(maxsize=1)
def _known_words() -> frozenset:
    """English word forms: TextBlob's bundled tagger lexicon (~94k) and spelling list (~29k), lower-cased."""
    import textblob

    folder = os.path.join(os.path.dirname(textblob.__file__), "en")
    words = set()
    for name in ("en-lexicon.txt", "en-spelling.txt"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            words.update(line.split()[0].lower() for line in f if line.strip() and not line.startswith(";;;"))
    return frozenset(words)


def unknown_word_share(texts: list) -> float:
    """Share of alphabetic words found in no English word list: invented words such as "Kalerenbeiderfleufe"
    (names and rare words count too, so compare against the base model's share, not against 0)."""
    words = [w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)]
    known = _known_words()
    return sum(w not in known for w in words) / len(words) if words else 0.0


def mean_words(texts: list) -> float:
    return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0


def prompt_ids(tokenizer, prompt: str) -> list:
    """Token ids of a prompt; a prompt already rendered by a chat template gets no second BOS."""
    bos = tokenizer.bos_token
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]


def perplexity(model, tokenizer, prompts: list, completions: list, batch_size: int = None) -> float:
    """exp(mean NLL per completion token, EOS included) under `model`, given each completion's prompt.

    The default batch keeps the float32 logits near 1 GiB at 160 tokens a row (a real vocabulary is large)."""
    if len(prompts) != len(completions):
        raise ValueError(f"perplexity: {len(prompts)} prompts but {len(completions)} completions")
    batch_size = batch_size or max(1, min(256, 2**28 // (160 * len(tokenizer))))
    total_nll, total_tokens = 0.0, 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        rows, labels = [], []
        for prompt, completion in zip(prompts[start:start + batch_size], completions[start:start + batch_size]):
            p = prompt_ids(tokenizer, prompt)
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
    """Of one set of completions: reward mean and standard error under VADER (the training judge) and TextBlob
    (the held-out judge), base-model perplexity, distinct-1/2, the share of samples with a repeated word 4-gram
    and the mean length in words."""
    mean, stderr = mean_and_stderr(rewards(completions))
    heldout, heldout_stderr = mean_and_stderr(heldout_rewards(completions))
    return {
        "reward": mean,
        "reward_stderr": stderr,
        "heldout_reward": heldout,
        "heldout_reward_stderr": heldout_stderr,
        "perplexity": perplexity(base_model, tokenizer, prompts, completions),
        "distinct_1": distinct_n(completions, 1),
        "distinct_2": distinct_n(completions, 2),
        "repeated_4gram": repeated_ngram_share(completions, 4),
        "unknown_words": unknown_word_share(completions),
        "mean_words": mean_words(completions),
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
