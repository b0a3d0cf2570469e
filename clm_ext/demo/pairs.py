"""Preference pairs from the model's own samples, judged by VADER.

For each prompt the base model's completions are scored; the most positive is `chosen`, the least positive
`rejected`. Pairs whose scores differ by less than `min_margin` carry no clear preference and are dropped.
The training later sees only the pairs, never the scores.
"""
import json
import os

from .judge import reward


def make_pairs(prompts: list, completions: list, min_margin: float) -> list:
    """Group completions by prompt (in order of first appearance) and keep the best/worst pair of each."""
    if len(prompts) != len(completions):
        raise ValueError(f"make_pairs: {len(prompts)} prompts but {len(completions)} completions")
    if min_margin < 0:
        raise ValueError(f"make_pairs: min_margin must be >= 0, got {min_margin}")
    groups = {}
    for prompt, completion in zip(prompts, completions):
        groups.setdefault(prompt, []).append((reward(completion), completion))
    pairs = []
    for prompt, scored in groups.items():
        best = max(scored, key=lambda s: s[0])
        worst = min(scored, key=lambda s: s[0])
        if best[0] - worst[0] >= min_margin:
            pairs.append({"prompt": prompt, "chosen": best[1], "rejected": worst[1]})
    return pairs


def write_jsonl(rows: list, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
