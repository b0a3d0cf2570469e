"""Mode embed against mode logits on one trained layer: both columns of a `clm demo --variants
LAYER/logits,LAYER/embed` run, or of `bench_dials.py`'s cached LAYER/logits and LAYER/embed sweeps (same layer,
same held-out samples with common random numbers), with standard errors, and whether embed stays within a
standard error of logits over an alpha range.

"Within a standard error" at one alpha: |embed - logits| <= the larger of the two standard errors, for both
judges. Writes modes.json, table.md and modes.png to --out.

    python benchmarks/compare_modes.py --demo clm-demo-out --out docs/demo/embed-vs-logits
    python benchmarks/compare_modes.py --sweeps CACHE/sweeps --out docs/demo/embed-vs-logits
"""
from __future__ import annotations

import argparse
import json
import os
import sys

JUDGES = (("reward", "VADER"), ("heldout_reward", "TextBlob"))


def compare(results: dict, layer: str, low: float, high: float) -> dict:
    """Per alpha: both modes' rewards, standard errors, perplexities and the difference; the verdict over
    [low, high]."""
    try:
        logits, embed = (results["variants"][f"{layer}/{m}"]["sweep"] for m in ("logits", "embed"))
    except KeyError as missing:
        raise ValueError(f"the demo results lack variant {missing}: run clm demo --variants "
                         f"{layer}/logits,{layer}/embed") from None
    rows = []
    for a, b in zip(logits, embed):
        row = {"alpha": a["alpha"]}
        for key, _ in JUDGES:
            diff = b[key] - a[key]
            row[key] = {"logits": a[key], "logits_stderr": a[key + "_stderr"], "embed": b[key],
                        "embed_stderr": b[key + "_stderr"], "embed_minus_logits": diff,
                        "within_stderr": abs(diff) <= max(a[key + "_stderr"], b[key + "_stderr"])}
        for key in ("perplexity", "unknown_words", "distinct_2"):
            row[key] = {"logits": a[key], "embed": b[key]}
        rows.append(row)
    in_range = [r for r in rows if low <= r["alpha"] <= high]
    return {"layer": layer, "range": [low, high], "rows": rows,
            "embed_within_stderr_of_logits": all(r[k]["within_stderr"] for r in in_range for k, _ in JUDGES),
            "outside": [{"alpha": r["alpha"], "judge": name, "embed_minus_logits": r[k]["embed_minus_logits"]}
                        for r in in_range for k, name in JUDGES if not r[k]["within_stderr"]]}


def markdown(c: dict) -> str:
    lines = ["| alpha | VADER logits | VADER embed | TextBlob logits | TextBlob embed | perplexity logits "
             "| perplexity embed | unknown words logits | unknown words embed |",
             "|---:|---|---|---|---|---:|---:|---:|---:|"]
    for r in c["rows"]:
        cells = [f"{r[k]['logits']:.3f} ± {r[k]['logits_stderr']:.3f} | {r[k]['embed']:.3f} ± "
                 f"{r[k]['embed_stderr']:.3f}{'' if r[k]['within_stderr'] else ' *'}" for k, _ in JUDGES]
        lines.append(f"| {r['alpha']:g} | {cells[0]} | {cells[1]} | {r['perplexity']['logits']:.2f} "
                     f"| {r['perplexity']['embed']:.2f} | {r['unknown_words']['logits']:.3f} "
                     f"| {r['unknown_words']['embed']:.3f} |")
    lines.append("")
    lines.append("`*`: embed differs from logits by more than the larger standard error. Embed within a standard "
                 f"error of logits at every alpha in [{c['range'][0]:g}, {c['range'][1]:g}] on both judges: "
                 f"**{'yes' if c['embed_within_stderr_of_logits'] else 'no'}**.")
    return "\n".join(lines) + "\n"


def plot(c: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    alphas = [r["alpha"] for r in c["rows"]]
    for ax, (key, name) in zip(axes, JUDGES):
        for mode in ("logits", "embed"):
            ax.errorbar(alphas, [r[key][mode] for r in c["rows"]], yerr=[r[key][mode + "_stderr"] for r in c["rows"]],
                        marker="o", capsize=3, label=f"{c['layer']}/{mode}")
        ax.set(xlabel="alpha", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for mode in ("logits", "embed"):
        axes[2].plot(alphas, [r["perplexity"][mode] for r in c["rows"]], marker="o", label=f"{c['layer']}/{mode}")
    axes[2].set(xlabel="alpha", title="base-model perplexity", yscale="log")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _demo_results(directory: str) -> dict:
    with open(os.path.join(directory, "results.json")) as f:
        return json.load(f)


def _bench_sweeps(directory: str, layer: str) -> dict:
    """bench_dials.py's cached sweeps of both modes in the form of a demo's results (value -> alpha)."""
    variants = {}
    for mode in ("logits", "embed"):
        path = os.path.join(directory, f"{layer}-{mode}.json")
        if os.path.exists(path):
            with open(path) as f:
                variants[f"{layer}/{mode}"] = {"sweep": [{"alpha": r["value"], **r} for r in json.load(f)["rows"]]}
    return {"variants": variants}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", help="a clm demo output directory (its results.json)")
    source.add_argument("--sweeps", help="a bench_dials.py cache's sweeps directory (LAYER-logits.json, "
                                         "LAYER-embed.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--layer", default="block", choices=("linear", "block"))
    p.add_argument("--range", default="-1,2", help="alpha range of the verdict, LOW,HIGH")
    args = p.parse_args(argv)
    low, high = (float(v) for v in args.range.split(","))
    c = compare(_demo_results(args.demo) if args.demo else _bench_sweeps(args.sweeps, args.layer), args.layer, low, high)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "modes.json"), "w") as f:
        json.dump(c, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown(c))
    plot(c, os.path.join(args.out, "modes.png"))
    print(markdown(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
