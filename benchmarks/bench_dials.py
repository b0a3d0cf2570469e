"""Every alignment-strength dial on one evaluation: DeRa, ExPO, LoRA scale and the CLM layer (linear/embed,
block/embed, block/logits), each swept over the same dial values on the real-model demo's held-out requests.

The evaluation is `clm demo`'s own (`clm_ext.demo.pipeline`): its preference pairs (default
docs/demo/pairs.jsonl, the demo's 373 pairs), its DPO settings (`DemoConfig.real()`: 47 steps of 8 pairs, beta
0.1, the per-method learning rates) for the baselines and layers, and its held-out sweep (24 requests x 4
samples with common random numbers, so every method's sample j of request i shares its noise; VADER, TextBlob,
base-model perplexity, distinct-2, unknown-word share). What each method needs is trained once and cached
under --cache (full DPO for DeRa and ExPO, a LoRA DPO adapter for the LoRA scale, the CLM layers); each
method's sweep is cached there too, so methods can run in separate processes and a rerun only reports.
`--full-dpo`, `--linear-layer`, `--block-layer` reuse a model or layer trained elsewhere with the same
settings; `--from-demo DIR` takes the block/embed and block/logits sweeps from a `clm demo` run's
results.json (checked to be the same evaluation).

Writes to --out: dials.json (every sweep and the table), dials.csv (one row per method and dial value),
frontier.png (TextBlob reward against perplexity), reward_vs_dial.png and table.md.

    python benchmarks/bench_dials.py --cache ~/.cache/clm-dials --out docs/demo/compare --threads 1
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys

import torch

METHODS = ("dera", "expo", "lora-scale", "linear/embed", "block/embed", "block/logits")
LABELS = {"dera": "DeRa", "expo": "ExPO", "lora-scale": "LoRA scale", "linear/embed": "CLM linear/embed",
          "block/embed": "CLM block/embed", "block/logits": "CLM block/logits"}
# Serving: models in memory, forwards per generated token, one dial value per request inside one batch.
SERVING = {
    "dera": (2, 2, True, "the full DPO model beside the base: two forwards per token, logits mixed per row"),
    "expo": (1, 1, False, "one merged checkpoint per dial value (the dial is a weight edit)"),
    "lora-scale": (1, 1, False, "one scale per model in PEFT, none per request in vLLM"),
    "linear/embed": (1, 1, True, "one d x d layer after the embedding"),
    "block/embed": (1, 1, True, "one decoder layer more (its own KV cache)"),
    "block/logits": (1, 2, True, "two streams per request (unaligned and aligned), logits mixed"),
}
EVAL_KEYS = ("seed", "eval_prompts", "eval_samples", "max_new_tokens", "temperature", "dpo_steps", "dpo_batch",
             "beta", "lr", "max_length")
PERPLEXITY_LIMIT = 1.5  # x the base model's


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the demo's, smollm2-135m-instruct)")
    p.add_argument("--pairs", default="docs/demo/pairs.jsonl", help="preference pairs (.jsonl, the demo's rows)")
    p.add_argument("--cache", required=True, help="directory for the trained baselines/layers and each sweep")
    p.add_argument("--out", required=True, help="directory for dials.json, dials.csv, the plots and table.md")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {', '.join(METHODS)}")
    p.add_argument("--values", default=None, help="comma-separated dial values (default: the demo's alphas)")
    p.add_argument("--full-dpo", help="a full-DPO checkpoint trained with the demo's settings (clm demo "
                                      "--baselines full writes OUT/full-dpo)")
    p.add_argument("--linear-layer", help="a linear CLM layer trained with the demo's settings")
    p.add_argument("--block-layer", help="a block CLM layer trained with the demo's settings")
    p.add_argument("--from-demo", help="a clm demo output directory whose results.json has the block sweeps")
    p.add_argument("--report-only", action="store_true", help="only assemble the cached sweeps into --out")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (the demo's --quick)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    return p


class _Context:
    """The demo's config, base model, tokenizer, pairs and held-out prompts, loaded once."""

    def __init__(self, args):
        import datasets

        from clm_ext.demo import pipeline
        from clm_ext.sources import DEFAULT_MODEL

        self.pipeline = pipeline
        overrides = {"alphas": tuple(float(v) for v in args.values.split(","))} if args.values else {}
        self.cfg = pipeline.DemoConfig.real(quick=args.quick, **overrides)
        self.model_name = args.model or DEFAULT_MODEL
        self.stage = pipeline._Stages()
        self.tokenizer, self.base = pipeline._load_real(self.cfg, self.model_name)
        _, self.prompts, self.request_of = pipeline._real_prompts(self.cfg, self.tokenizer)
        with open(args.pairs) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError(f"--pairs: {args.pairs} holds no pairs")
        self.dataset = datasets.Dataset.from_list(rows)
        self.cache = args.cache
        self.args = args

    def evaluate(self, model, name, alphas=None) -> dict:
        return self.pipeline._evaluate(self.cfg, model, self.tokenizer, self.prompts, self.base, self.stage, name,
                                       alphas=alphas, request_of=self.request_of)

    def train(self, key, model, name, **kwargs):
        return self.pipeline._train(self.cfg, key, model, self.tokenizer, self.dataset, self.stage, name, **kwargs)

    def path(self, *parts) -> str:
        return os.path.join(self.cache, *parts)

    @property
    def values(self) -> list:
        return list(self.cfg.alphas)


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _save_json(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # never a half-written cache file


def _full_dpo(ctx):
    """The full-DPO model: --full-dpo, the cached one, or trained now (and cached)."""
    from transformers import AutoModelForCausalLM

    where = ctx.args.full_dpo or ctx.path("full-dpo")
    if os.path.isdir(where):
        return AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=torch.float32).eval()
    trained = ctx.train("full", copy.deepcopy(ctx.base), "full").model
    trained.save_pretrained(where)
    return trained


def _lora_dpo(ctx):
    """The LoRA DPO model (PEFT, unmerged): the cached adapter, or trained now (and cached)."""
    from peft import PeftModel

    where = ctx.path("lora-dpo")
    if os.path.isdir(where):
        return PeftModel.from_pretrained(copy.deepcopy(ctx.base), where).eval()
    trained = ctx.train("lora", copy.deepcopy(ctx.base), "lora", merge_lora=False).model
    trained.save_pretrained(where)
    return trained


def _clm_layer(ctx, layer: str, mode: str):
    """The base model with a CLM layer in `mode`: --<layer>-layer, the cached one, or trained now (and cached)."""
    import clm_ext

    where = getattr(ctx.args, f"{layer}_layer") or ctx.path(f"{layer}-layer")
    if not os.path.isdir(where):
        model = clm_ext.add_alignment_control(copy.deepcopy(ctx.base), mode="embed", layer=layer)
        clm_ext.save_alignment(ctx.train(f"clm/{layer}", model, f"CLM {layer}").model, where)
    return clm_ext.load_alignment(copy.deepcopy(ctx.base), where, mode=mode)


def _per_value(ctx, name, set_value) -> list:
    """One evaluation per dial value; `set_value(v)` returns a context manager yielding the model at v."""
    rows = []
    for v in ctx.values:
        with set_value(v) as model:
            rows.append({"value": v, **ctx.evaluate(model, f"{name} {v:g}")})
    return rows


def _sweep_dera(ctx):
    from contextlib import nullcontext

    from clm_ext.demo.dials import DeRa

    aligned = _full_dpo(ctx)
    rows = _per_value(ctx, "DeRa", lambda v: nullcontext(DeRa(aligned, ctx.base, v)))
    return rows, sum(p.numel() for p in aligned.parameters())


def _sweep_expo(ctx):
    from contextlib import contextmanager

    from clm_ext.demo.dials import extrapolate, weight_delta

    aligned = _full_dpo(ctx)
    delta = weight_delta(aligned, ctx.base)
    base_state = ctx.base.state_dict()

    @contextmanager
    def at(v):
        yield extrapolate(aligned, base_state, delta, v)

    return _per_value(ctx, "ExPO", at), 0


def _sweep_lora(ctx):
    from clm_ext.demo.dials import lora_scale

    model = _lora_dpo(ctx)
    extra = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return _per_value(ctx, "LoRA", lambda v: lora_scale(model, v)), extra


def _sweep_clm(ctx, method):
    from clm_ext.model import alignment_parameters

    layer, mode = method.split("/")
    model = _clm_layer(ctx, layer, mode)
    scored = ctx.evaluate(model, f"CLM {method}", alphas=ctx.values)
    rows = [{"value": row.pop("alpha"), **row} for row in scored["sweep"]]
    per_value = len(scored["completions"]) // len(rows)
    for k, row in enumerate(rows):  # the completions per value, as the other methods keep them
        row["completions"] = scored["completions"][k * per_value:(k + 1) * per_value]
    return rows, sum(p.numel() for p in alignment_parameters(model))


def _from_demo(ctx, method):
    """A block sweep of a `clm demo` run, if that run is this evaluation (same settings, same pairs)."""
    results = _load_json(os.path.join(ctx.args.from_demo, "results.json"))
    config = results["config"]
    differ = [k for k in EVAL_KEYS if config.get(k) != json.loads(json.dumps(getattr(ctx.cfg, k)))]
    if differ or results["pairs"] != len(ctx.dataset) or list(config["alphas"]) != ctx.values:
        raise ValueError(f"--from-demo: {ctx.args.from_demo} is not this evaluation (differs in "
                         f"{differ or ['pairs or alphas']})")
    if method not in results["variants"]:
        return None
    variant = results["variants"][method]
    layer = variant["layer_dir"]
    config = _load_json(os.path.join(layer, "alignment_config.json")) if os.path.isdir(layer) else {}
    return [{"value": row.pop("alpha"), **row} for row in variant["sweep"]], config.get("num_parameters")


SWEEPS = {"dera": _sweep_dera, "expo": _sweep_expo, "lora-scale": _sweep_lora}


def run_method(ctx, method) -> dict:
    """Sweep one method (or read its cached sweep) and return {rows, extra_params}."""
    cached = ctx.path("sweeps", method.replace("/", "-") + ".json")
    if os.path.exists(cached):
        result = _load_json(cached)
        if [r["value"] for r in result["rows"]] != ctx.values:
            raise SystemExit(f"--cache: {cached} holds a sweep over other dial values "
                             f"({[r['value'] for r in result['rows']]}); use another --cache or delete that file")
        return result
    found = _from_demo(ctx, method) if ctx.args.from_demo and method.startswith("block/") else None
    rows, extra = found or (SWEEPS[method](ctx) if method in SWEEPS else _sweep_clm(ctx, method))
    result = {"rows": rows, "extra_params": extra, "source": "clm demo " + ctx.args.from_demo if found else "here",
              "timings": dict(ctx.stage.timings)}
    _save_json(result, cached)
    return result


def run_base(ctx) -> dict:
    cached = ctx.path("sweeps", "base.json")
    if not os.path.exists(cached):
        _save_json({**ctx.evaluate(ctx.base, "base"), "params": sum(p.numel() for p in ctx.base.parameters())},
                   cached)
    return _load_json(cached)


def best_within(rows: list, limit: float):
    """The highest held-out reward along the curve (rows in dial order, joined by straight segments in the
    (perplexity, reward) plane) where perplexity <= limit; None if no point of the curve qualifies."""
    best = None
    for a, b in zip(rows, rows[1:] + [None]):
        candidates = [a["heldout_reward"]] if a["perplexity"] <= limit else []
        if b is not None and (a["perplexity"] - limit) * (b["perplexity"] - limit) < 0:  # crosses the limit
            t = (limit - a["perplexity"]) / (b["perplexity"] - a["perplexity"])
            candidates.append(a["heldout_reward"] + t * (b["heldout_reward"] - a["heldout_reward"]))
        for c in candidates:
            best = c if best is None else max(best, c)
    return best


def _identical_share(completions: list, reference: list):
    if not completions or len(completions) != len(reference):
        return None
    return sum(a == b for a, b in zip(completions, reference)) / len(reference)


def table(methods: dict, base: dict) -> dict:
    """Per method: the rewards at dial 1, the best held-out reward within the perplexity limit, the cost."""
    limit = PERPLEXITY_LIMIT * base["perplexity"]
    out = {}
    for method, result in methods.items():
        rows = sorted(result["rows"], key=lambda r: r["value"])
        at = {r["value"]: r for r in rows}
        one = at.get(1.0)
        models, forwards, per_request, note = SERVING[method]
        out[method] = {
            "reward_at_1": one and one["reward"], "reward_at_1_stderr": one and one["reward_stderr"],
            "heldout_at_1": one and one["heldout_reward"], "heldout_at_1_stderr": one and one["heldout_reward_stderr"],
            "perplexity_at_1": one and one["perplexity"],
            "best_heldout_within_limit": best_within(rows, limit),
            "models_in_memory": models, "forwards_per_token": forwards, "extra_params": result["extra_params"],
            "per_request_dial": per_request, "serving": note,
            "identical_to_base_at_0": _identical_share(at.get(0.0, {}).get("completions"), base.get("completions")),
        }
    return out


def write_report(out: str, methods: dict, base: dict, command: str) -> dict:
    """dials.json, dials.csv, frontier.png, reward_vs_dial.png and table.md in `out`."""
    summary = table(methods, base)
    strip = lambda row: {k: v for k, v in row.items() if k != "completions"}  # noqa: E731
    results = {"command": command, "perplexity_limit": PERPLEXITY_LIMIT * base["perplexity"],
               "base": strip(base), "table": summary,
               "methods": {m: {**{k: v for k, v in r.items() if k != "rows"}, "rows": [strip(x) for x in r["rows"]]}
                           for m, r in methods.items()}}
    os.makedirs(out, exist_ok=True)
    _save_json(results, os.path.join(out, "dials.json"))
    columns = ["method", "value", "reward", "reward_stderr", "heldout_reward", "heldout_reward_stderr",
               "perplexity", "distinct_2", "unknown_words", "repeated_4gram", "mean_words", "n"]
    with open(os.path.join(out, "dials.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for method, result in methods.items():
            for row in sorted(result["rows"], key=lambda r: r["value"]):
                writer.writerow([method] + [row[c] for c in columns[1:]])
    _plots(out, methods, base)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown_table(summary, base))
    return results


def markdown_table(summary: dict, base: dict) -> str:
    fmt = lambda v, e=None: "n/a" if v is None else (f"{v:.3f} ± {e:.3f}" if e is not None else f"{v:.3f}")  # noqa: E731
    lines = [f"Base model: VADER {base['reward']:.3f}, TextBlob {base['heldout_reward']:.3f}, perplexity "
             f"{base['perplexity']:.2f} (limit {PERPLEXITY_LIMIT} x = {PERPLEXITY_LIMIT * base['perplexity']:.2f}).",
             "",
             "| method | VADER at 1 | TextBlob at 1 | perplexity at 1 | best TextBlob at perplexity <= 1.5x base "
             "| models in memory | forwards per token | extra parameters | dial per request in one batch |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for method, row in summary.items():
        lines.append(f"| {LABELS[method]} | {fmt(row['reward_at_1'], row['reward_at_1_stderr'])} "
                     f"| {fmt(row['heldout_at_1'], row['heldout_at_1_stderr'])} | {fmt(row['perplexity_at_1'])} "
                     f"| {fmt(row['best_heldout_within_limit'])} | {row['models_in_memory']} "
                     f"| {row['forwards_per_token']} | {row['extra_params'] or 0:,} "
                     f"| {'yes' if row['per_request_dial'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _plots(out, methods, base):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, result in methods.items():
        rows = sorted(result["rows"], key=lambda r: r["value"])
        ax.plot([r["perplexity"] for r in rows], [r["heldout_reward"] for r in rows], marker="o", label=LABELS[method])
        one = next((r for r in rows if r["value"] == 1.0), None)
        if one:
            ax.annotate("1", (one["perplexity"], one["heldout_reward"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axvline(PERPLEXITY_LIMIT * base["perplexity"], color="gray", linestyle=":", label="1.5x base perplexity")
    ax.scatter([base["perplexity"]], [base["heldout_reward"]], color="black", zorder=5, label="base")
    ax.set(xscale="log", xlabel="base-model perplexity of the samples (log)",
           ylabel="TextBlob polarity (held-out judge)", title="Reward against fluency, one curve per dial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for ax, key, title in zip(axes, ("reward", "heldout_reward", "perplexity"),
                              ("VADER reward (training judge)", "TextBlob polarity (held-out judge)",
                               "base-model perplexity")):
        for method, result in methods.items():
            rows = sorted(result["rows"], key=lambda r: r["value"])
            errors = [r[key + "_stderr"] for r in rows] if key + "_stderr" in rows[0] else None
            ax.errorbar([r["value"] for r in rows], [r[key] for r in rows], yerr=errors, marker="o", capsize=3,
                        label=LABELS[method])
        ax.axhline(base[key], color="gray", linestyle="--", label="base")
        ax.set(xlabel="dial value (alpha / lambda)", title=title)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reward_vs_dial.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose among {', '.join(METHODS)}")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force and not args.report_only:
        raise SystemExit(f"--out: {args.out} is not empty (add --force to replace its files)")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_dials.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report_only:
        base = _load_json(os.path.join(args.cache, "sweeps", "base.json"))
        found = {m: _load_json(p) for m in methods
                 if os.path.exists(p := os.path.join(args.cache, "sweeps", m.replace("/", "-") + ".json"))}
        write_report(args.out, found, base, command)
        return 0
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    ctx = _Context(args)
    results = {m: run_method(ctx, m) for m in methods}  # each cached as it finishes, the base last
    base = run_base(ctx)
    write_report(args.out, results, base, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
