"""`clm demo --dials positive,concise`: two preferences learned as two named dials of one model, then a grid of
alpha vectors judged by each dial's judge.

- positive: VADER's compound score; a pair is the most against the least positive sample of a request (the
  one-dial demo's pairs).
- concise: the shorter of two answers; only a complete answer (ended by the model within the token limit,
  on a sentence end) is ever chosen, against the longest sample of the request.

Both pair sets come from the same base-model samples of the training requests. Each dial trains alone
(CLMDPOTrainer(dial=name): a one-dial model, nothing of the other dial in it) and is saved alone; the two
saves are then loaded into one model, as a user composing dials trained on different days would. The grid
is judged by VADER, TextBlob (held out), word count and the base model's perplexity; `dial_checks` states
monotonicity, independence and composition on it.
"""
import copy
import glob
import os
import statistics
import time
from dataclasses import asdict, replace

import torch

from ..model import alignment_strength, load_alignment, save_alignment
from . import pairs, pipeline, sampling, sweep
from .report import spearman

# The judge each dial should move, and the direction that counts as "more of the dial".
DIAL_JUDGES = {"positive": ("reward", 1.0), "concise": ("mean_words", -1.0)}
GRID = (-1.0, 0.0, 0.5, 1.0, 2.0)
# The vectors the example table shows (a subset of the default grid): the base, each dial alone, both, extremes.
SHOWCASE = ((0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (0.0, 1.0), (0.0, 2.0), (1.0, 1.0), (2.0, 2.0), (-1.0, 2.0),
            (2.0, -1.0), (-1.0, -1.0))
# Per dial: the positive dial at the one-dial demo's linear rate; at that rate the concise dial (an easy
# preference: its DPO loss fell to 0.14) left fluency at alpha 0.5 already (base perplexity 2.3x), 5x lower.
DIAL_LR = {"positive": 5e-4, "concise": 1e-4}
MIN_WORD_GAP = 5  # a concise pair's rejected answer is at least this many words longer than its chosen one
PLOT_NAME = "dials_grid.png"
_SENTENCE_END = (".", "!", "?", '"', "\u201d", ")")


def is_complete(text: str, finished: bool) -> bool:
    """The model ended the answer itself (EOS within the limit), on a sentence end."""
    return finished and text.rstrip().endswith(_SENTENCE_END)


def concise_pairs(prompts: list, completions: list, finished: list, min_gap: int = MIN_WORD_GAP) -> list:
    """Per prompt: the complete answer with the fewest words is chosen, the sample with the most words rejected;
    prompts without a complete answer, or whose gap is under `min_gap` words, make no pair."""
    if not len(prompts) == len(completions) == len(finished):
        raise ValueError(f"concise_pairs: {len(prompts)} prompts, {len(completions)} completions and "
                         f"{len(finished)} finished flags")
    groups = {}
    for prompt, text, done in zip(prompts, completions, finished):
        groups.setdefault(prompt, []).append((len(text.split()), text, done))
    rows = []
    for prompt, drawn in groups.items():
        complete = [d for d in drawn if is_complete(d[1], d[2])]
        if not complete:
            continue
        chosen, rejected = min(complete, key=lambda d: d[0]), max(drawn, key=lambda d: d[0])
        if rejected[0] - chosen[0] >= min_gap:
            rows.append({"prompt": prompt, "chosen": chosen[1], "rejected": rejected[1]})
    return rows


def dial_pairs(name: str, drawn: sampling.Samples, min_margin: float) -> list:
    if name == "positive":
        return pairs.make_pairs(drawn.prompts, drawn.completions, min_margin)
    return concise_pairs(drawn.prompts, drawn.completions, drawn.finished)


def check_dial_names(names) -> tuple:
    """Two distinct known dials (the grid is two-dimensional), in the given order."""
    names = tuple(names)
    unknown = [n for n in names if n not in DIAL_JUDGES]
    if unknown:
        raise ValueError(f"--dials: unknown dial(s) {unknown}; choose two of {', '.join(DIAL_JUDGES)}")
    if len(names) != 2 or names[0] == names[1]:
        raise ValueError(f"--dials: give two different dials (the grid is two-dimensional), got {list(names)}")
    return names


def grid_vectors(names: tuple, grid) -> list:
    """Every (first dial, second dial) pair of grid values, the first dial's value outermost."""
    return [{names[0]: x, names[1]: y} for x in grid for y in grid]


def cells_by_vector(names: tuple, grid, cells: list) -> dict:
    """(first dial's alpha, second dial's alpha) -> the grid cell, for cells in `grid_vectors` order."""
    return {(v[names[0]], v[names[1]]): cell for v, cell in zip(grid_vectors(names, grid), cells)}


def _judge(name: str, cell: dict) -> float:
    key, sign = DIAL_JUDGES[name]
    return sign * cell[key]


def dial_checks(names: tuple, grid, cells: list) -> dict:
    """The grid's claims, on the measured means (no tolerance: noise can fail them, and is reported).

    Per dial: Spearman of its own judge against its alpha with the other dial at 0 (and the least over every
    value of the other dial); its effect at 1 (judge at (1, 0) minus at (0, 0), signed so that more of the dial
    is positive); the cross effect on the other dial's judge, as a share of that dial's own effect at 1
    (independent below 1/4); the effect at (1, 1) as a share of its effect at 1 alone (composes at >= 80%)."""
    grid = list(grid)
    for needed in (0.0, 1.0):
        if needed not in grid:
            raise ValueError(f"dial_checks: the grid must hold alpha {needed:g}, got {grid}")
    at = cells_by_vector(names, grid, cells)

    def point(i, own, other):
        return at[(own, other) if i == 0 else (other, own)]

    origin, both = at[(0.0, 0.0)], at[(1.0, 1.0)]
    effect = {n: _judge(n, point(i, 1.0, 0.0)) - _judge(n, origin) for i, n in enumerate(names)}
    out = {}
    for i, name in enumerate(names):
        other = names[1 - i]
        rows = [spearman(grid, [_judge(name, point(i, x, y)) for x in grid]) for y in grid]
        cross = _judge(other, point(i, 1.0, 0.0)) - _judge(other, origin)
        cross_share = abs(cross) / abs(effect[other]) if effect[other] else None
        composed = (_judge(name, both) - _judge(name, origin)) / effect[name] if effect[name] else None
        out[name] = {
            "judge": DIAL_JUDGES[name][0],
            "spearman": rows[grid.index(0.0)],
            "spearman_min_over_other_dial": min(rows),
            "monotone": rows[grid.index(0.0)] >= 0.9,
            "effect_at_1": effect[name],
            f"cross_effect_on_{other}": cross,
            "cross_share": cross_share,
            "independent": cross_share is not None and cross_share < 0.25,
            "composed_share_at_1_1": composed,
            "composes": composed is not None and composed >= 0.8,
        }
    return out


def showcase(model, tokenizer, prompt: str, names: tuple, cfg) -> list:
    """One held-out prompt's completion at each SHOWCASE vector, with the noise of the grid's first sample of
    its first prompt (sample 0 of prompt 0: the same random numbers at every vector)."""
    vectors = [{names[0]: x, names[1]: y} for x, y in SHOWCASE]
    drawn = sampling.sample(model, tokenizer, [prompt], 1, cfg.seed + 2, cfg.max_new_tokens, alphas=vectors,
                            temperature=cfg.temperature)
    return [{"alpha": v, "completion": c} for v, c in zip(vectors, drawn.completions)]


def decode_speed(models: dict, tokenizer, prompts: list, alphas: dict, new_tokens: int, rounds: int) -> dict:
    """Generation tokens/s of each model on the same left-padded batch, exactly `new_tokens` greedy tokens per
    row, rows at the alphas of `alphas[name]` (None: no alignment layer); median of `rounds` interleaved rounds."""
    batch = sampling.encode(tokenizer, prompts)
    seconds = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            begin = time.perf_counter()
            if alphas[name] is None:
                _greedy(model, tokenizer, batch, new_tokens)
            else:
                with alignment_strength(model, alphas[name]):
                    _greedy(model, tokenizer, batch, new_tokens)
            seconds[name].append(time.perf_counter() - begin)
    return {name: len(prompts) * new_tokens / statistics.median(s) for name, s in seconds.items()}


def _greedy(model, tokenizer, batch, new_tokens):
    with torch.no_grad():
        model.generate(**batch.to(model.device), do_sample=False, min_new_tokens=new_tokens,
                       max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)


def _file_bytes(directory: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))


def run(cfg, names, out_dir: str, model: str = None, toy: bool = False, grid=GRID, lr: dict = None,
        speed_rounds: int = 3) -> dict:
    """Pairs, one DPO run per dial (at lr[dial], default DIAL_LR), the grid, its checks and the cost; writes
    results.json, results.md and the heatmaps to `out_dir`, the dials to out_dir/dial-<name> (alone) and
    out_dir/dials (together)."""
    names = check_dial_names(names)
    lr = {**DIAL_LR, **(lr or {})}
    stage = pipeline._Stages()
    world = pipeline.prepare(cfg, model, toy, out_dir, stage)
    tokenizer, base, request_of = world.tokenizer, world.base, world.request_of
    with stage("preference samples", len(world.pair_prompts) * cfg.pair_samples) as bar:
        drawn = sampling.sample(base, tokenizer, world.pair_prompts, cfg.pair_samples, cfg.seed, cfg.max_new_tokens,
                                batch_size=cfg.sample_batch, progress=bar, temperature=cfg.temperature)
    results = {"model": world.model, "dials": list(names), "grid": list(grid),
               "config": {**asdict(cfg), "model": None if toy else world.model,
                          "dial_lr": {n: lr[n] for n in names}}, "per_dial": {}}
    for name in names:
        rows = dial_pairs(name, drawn, cfg.min_margin)
        if not rows:
            raise ValueError(f"dial {name!r}: no preference pair in the samples; raise --pair-prompts, --pair-samples "
                             "or --max-new-tokens (a concise pair needs an answer the model ended itself)")
        if getattr(tokenizer, "chat_template", None):
            rows = pipeline._conversational(rows, request_of)
        pairs.write_jsonl(rows, os.path.join(out_dir, f"pairs-{name}.jsonl"))  # for `clm train --dataset`
        results["per_dial"][name] = train_dial(cfg, name, lr[name], base, tokenizer, rows, out_dir, stage)
    return measure(cfg, results, base, tokenizer, world.eval_prompts, request_of, out_dir, stage, speed_rounds)


def train_dial(cfg, name: str, lr: float, base, tokenizer, rows: list, out_dir: str, stage) -> dict:
    """DPO of dial `name` alone on a copy of `base`, saved to out_dir/dial-<name>; returns its facts."""
    import datasets

    cfg = replace(cfg, lr={**cfg.lr, "clm/linear": lr})
    trained = pipeline._train(cfg, "clm/linear", copy.deepcopy(base), tokenizer, datasets.Dataset.from_list(rows),
                              stage, f"dial {name}", dial=name)
    dial_dir = os.path.join(out_dir, f"dial-{name}")
    save_alignment(trained.model, dial_dir, dial=name)
    return {"pairs": len(rows), "lr": lr, "train": pipeline._train_info(trained), "dir": os.path.basename(dial_dir),
            "file_bytes": _file_bytes(dial_dir)}


def measure(cfg, results: dict, base, tokenizer, eval_prompts: list, request_of, out_dir: str, stage,
            speed_rounds: int = 3) -> dict:
    """The dials saved in out_dir/dial-<name>, loaded into one model (as a user composing dials trained on
    different days would), swept over the grid, checked, timed and reported."""
    from . import dials_report

    names, grid = tuple(results["dials"]), results["grid"]
    combined = copy.deepcopy(base)
    for name in names:
        load_alignment(combined, os.path.join(out_dir, f"dial-{name}"), dial=name)
    save_alignment(combined, os.path.join(out_dir, "dials"))
    vectors = grid_vectors(names, grid)
    with stage("sample grid", len(vectors) * len(eval_prompts) * cfg.eval_samples) as bar:
        samples = sampling.sample(combined, tokenizer, eval_prompts, cfg.eval_samples, cfg.seed + 2,
                                  cfg.max_new_tokens, alphas=vectors, batch_size=cfg.sample_batch, progress=bar,
                                  temperature=cfg.temperature)
    with stage("score grid", 1) as bar:
        results["cells"] = [{"alpha": v, **s} for v, s in
                            zip(vectors, sweep.score_sweep(samples, vectors, base, tokenizer))]
        bar.update(1)
    results["grid_tokens_per_s"] = samples.new_tokens / samples.seconds
    results["checks"] = dial_checks(names, grid, results["cells"])
    results["example_prompt"] = (request_of or {}).get(eval_prompts[0], eval_prompts[0])
    results["examples"] = showcase(combined, tokenizer, eval_prompts[0], names, cfg)
    with stage("decode speed", speed_rounds) as bar:
        one = load_alignment(copy.deepcopy(base), os.path.join(out_dir, f"dial-{names[0]}"), dial=names[0])
        prompts = [eval_prompts[i % len(eval_prompts)] for i in range(32)]
        mixed = [grid[i % len(grid)] for i in range(len(prompts))]
        results["decode_tokens_per_s"] = decode_speed(
            {"base": base, "one dial": one, "two dials": combined}, tokenizer, prompts,
            {"base": None, "one dial": [{names[0]: a} for a in mixed],
             "two dials": [{names[0]: a, names[1]: grid[-1 - i % len(grid)]} for i, a in enumerate(mixed)]},
            new_tokens=min(32, cfg.max_new_tokens), rounds=speed_rounds)
        bar.update(speed_rounds)
    results["timings"] = {**results.get("timings", {}), **stage.timings}
    results["total_seconds"] = sum(results["timings"].values())
    dials_report.write(results, out_dir)
    return results
