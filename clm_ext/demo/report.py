"""The demo's outputs: results.json, results.md (markdown tables) and reward_vs_alpha.png."""
import json
import os

PLOT_NAME = "reward_vs_alpha.png"


def checks(results: dict) -> dict:
    """The demo's claims, checked on the measured means (no tolerance: noise can fail them, and is reported)."""
    alphas = results["alphas"]
    base = results["base"]["reward"]
    full = results["baselines"].get("full")
    out = {}
    for name, variant in results["variants"].items():
        means = [row["reward"] for row in variant["sweep"]]
        within = [m for a, m in zip(alphas, means) if -1 <= a <= 2]
        at = dict(zip(alphas, means))
        entry = {
            "monotone_all_alphas": all(x < y for x, y in zip(means, means[1:])),
            "monotone_alpha_-1_to_2": all(x < y for x, y in zip(within, within[1:])),
            "best_alpha": alphas[means.index(max(means))],
        }
        if 1.0 in at:
            entry["alpha_above_1_beats_1"] = any(m > at[1.0] for a, m in at.items() if a > 1)
            if full is not None and full["reward"] != base:
                entry["gain_vs_full_at_alpha_1"] = (at[1.0] - base) / (full["reward"] - base)
        out[name] = entry
    return out


def write_json(results: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path


def _fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    alphas, variants = results["alphas"], results["variants"]
    names = list(variants)
    lines = ["## Reward (VADER compound, mean ± standard error) against alpha", "",
             "| alpha | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, alpha in enumerate(alphas):
        cells = [f"{variants[n]['sweep'][i]['reward']:.3f} ± {variants[n]['sweep'][i]['reward_stderr']:.3f}"
                 for n in names]
        lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Fluency against alpha: base-model perplexity of the samples / distinct-2", "",
              "| alpha | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, alpha in enumerate(alphas):
        cells = [f"{variants[n]['sweep'][i]['perplexity']:.2f} / {variants[n]['sweep'][i]['distinct_2']:.3f}"
                 for n in names]
        lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Baselines", "", "| model | reward | perplexity | distinct-2 |", "|---|---:|---:|---:|"]
    for name, row in [("base (no alignment)", results["base"])] + [
            (f"{k} DPO", v) for k, v in results["baselines"].items()]:
        lines.append(f"| {name} | {row['reward']:.3f} ± {row['reward_stderr']:.3f} | {row['perplexity']:.2f} | "
                     f"{row['distinct_2']:.3f} |")
    lines += ["", "## Cost", "",
              "| method | trainable params | DPO step (s) | DPO peak memory (MiB) | generation tokens/s |",
              "|---|---:|---:|---:|---:|"]
    for name, row in list(variants.items()) + list(results["baselines"].items()):
        train = row["train"]
        lines.append(f"| {name} | {train['trainable_params']:,} | {train['step_seconds']:.3f} | "
                     f"{_fmt(train['peak_memory_mb'], 1)} | {row['tokens_per_s']:.0f} |")
    lines += ["", "CLMDPOTrainer trains a layer in mode embed; a logits variant serves the same trained layer (at alpha "
              "0 and 1 the two modes are the same network), so it shares that run's training cost. Peak memory is "
              "measured on CUDA only. Generation tokens/s: the sweep's batches (all alphas mixed) for CLM, one "
              "model for the baselines."]
    primary = names[0]
    lines += ["", f"## One held-out sample of CLM {primary} at every alpha (same random numbers; the first sample "
              "that is negative at alpha 0)", "",
              "| alpha | completion |", "|---:|---|"]
    lines += [f"| {ex['alpha']:g} | {ex['prompt']} *{ex['completion'].strip()}* |" for ex in variants[primary]["examples"]]
    lines += ["", "## Checks", "", "| variant | monotone (all alphas) | monotone on [-1, 2] | some alpha > 1 beats 1 | "
              "gain vs full DPO at alpha 1 | best alpha |", "|---|---|---|---|---:|---:|"]
    for name, c in results["checks"].items():
        lines.append(f"| {name} | {c['monotone_all_alphas']} | {c['monotone_alpha_-1_to_2']} | "
                     f"{c.get('alpha_above_1_beats_1', 'n/a')} | {_fmt(c.get('gain_vs_full_at_alpha_1'), 2)} | "
                     f"{c['best_alpha']:g} |")
    lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {sec:.1f} |" for stage, sec in results["timings"].items()]
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write(markdown(results))
    return path


def plot(results: dict, out_dir: str) -> str:
    """Reward (with standard-error bars) and base-model perplexity against alpha; baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = results["alphas"]
    fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, variant in results["variants"].items():
        sweep = variant["sweep"]
        ax_r.errorbar(alphas, [r["reward"] for r in sweep], yerr=[r["reward_stderr"] for r in sweep],
                      marker="o", capsize=3, label=f"CLM {name}")
        ax_p.plot(alphas, [r["perplexity"] for r in sweep], marker="o", label=f"CLM {name}")
    lines = [("base", results["base"], "gray")] + [
        (f"{k} DPO", v, c) for (k, v), c in zip(results["baselines"].items(), ["black", "tab:red", "tab:purple"])]
    for label, row, color in lines:
        ax_r.axhline(row["reward"], color=color, linestyle="--", label=label)
        ax_p.axhline(row["perplexity"], color=color, linestyle="--", label=label)
    ax_r.set(xlabel="alpha", ylabel="VADER reward (mean ± s.e.)", title="Reward against alignment strength")
    ax_p.set(xlabel="alpha", ylabel="base-model perplexity of samples", yscale="log", title="Fluency")
    ax_r.legend(fontsize=8)
    ax_p.legend(fontsize=8)
    for ax in (ax_r, ax_p):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, PLOT_NAME)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
