"""The demo's outputs: results.json, results.md (markdown tables) and reward_vs_alpha.png."""
import json
import os

PLOT_NAME = "reward_vs_alpha.png"


def spearman(xs: list, ys: list) -> float:
    """Spearman rank correlation (ties get their mean rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else 0.0


def _judge_checks(alphas, sweep, key, base, full) -> dict:
    means = [row[key] for row in sweep]
    within = [(a, m) for a, m in zip(alphas, means) if -1 <= a <= 2]
    at = dict(zip(alphas, means))
    out = {
        "monotone_all_alphas": all(x < y for x, y in zip(means, means[1:])),
        "monotone_alpha_-1_to_2": all(x[1] < y[1] for x, y in zip(within, within[1:])),
        "spearman_alpha_-1_to_2": spearman([a for a, _ in within], [m for _, m in within]) if len(within) > 1 else None,
        "best_alpha": alphas[means.index(max(means))],
    }
    if 1.0 in at:
        out["alpha_above_1_beats_1"] = any(m > at[1.0] for a, m in at.items() if a > 1)
        if full is not None and full[key] != base[key]:
            out["gain_vs_full_at_alpha_1"] = (at[1.0] - base[key]) / (full[key] - base[key])
    if 1.0 in at and 2.0 in at:
        out["alpha_2_beats_1"] = at[2.0] > at[1.0]
    return out


def checks(results: dict) -> dict:
    """The demo's claims, checked on the measured means (no tolerance: noise can fail them, and is reported),
    for the training judge (VADER) and the held-out judge (TextBlob), plus fluency against the base model."""
    alphas = results["alphas"]
    base = results["base"]
    full = results["baselines"].get("full")
    out = {}
    for name, variant in results["variants"].items():
        sweep = variant["sweep"]
        entry = _judge_checks(alphas, sweep, "reward", base, full)
        entry["heldout"] = _judge_checks(alphas, sweep, "heldout_reward", base, full)
        mild = [row for a, row in zip(alphas, sweep) if a <= 1.5]
        entry["max_perplexity_ratio_alpha_le_1.5"] = max(row["perplexity"] for row in mild) / base["perplexity"]
        entry["max_repeated_4gram_alpha_le_1.5"] = max(row["repeated_4gram"] for row in mild)
        entry["max_unknown_words_alpha_le_1.5"] = max(row["unknown_words"] for row in mild)
        out[name] = entry
    return out


def write_json(results: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path


def _fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _cell(row, key):
    return f"{row[key]:.3f} ± {row[key + '_stderr']:.3f}"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.0f}%"


def markdown(results: dict) -> str:
    alphas, variants = results["alphas"], results["variants"]
    names = list(variants)
    lines = [f"# clm demo on {results['model']}: {results['pairs']} preference pairs", "",
             "## Reward against alpha (mean ± standard error): VADER (training judge) / TextBlob (held-out judge)",
             "", "| alpha | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, alpha in enumerate(alphas):
        cells = [f"{_cell(variants[n]['sweep'][i], 'reward')} / {_cell(variants[n]['sweep'][i], 'heldout_reward')}"
                 for n in names]
        lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Fluency against alpha: base-model perplexity / distinct-2 / share of samples with a repeated "
              "4-gram / share of words in no English word list / mean words", "", "| alpha | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, alpha in enumerate(alphas):
        cells = [_fluency(variants[n]["sweep"][i]) for n in names]
        lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Base model and baselines", "",
              "| model | VADER | TextBlob | perplexity / distinct-2 / repeated 4-gram / unknown words / mean words |",
              "|---|---:|---:|---:|"]
    for name, row in [("base (no alignment)", results["base"])] + [
            (f"{k} DPO", v) for k, v in results["baselines"].items()]:
        lines.append(f"| {name} | {_cell(row, 'reward')} | {_cell(row, 'heldout_reward')} | {_fluency(row)} |")
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
    examples = variants[primary]["examples"]
    lines += ["", f"## One held-out prompt, CLM {primary} at every alpha (same random numbers; the first sample "
              "that is negative under VADER at alpha 0)", "", f"Prompt: *{examples[0]['prompt'].strip()}*", "",
              "| alpha | completion |", "|---:|---|"]
    lines += [f"| {ex['alpha']:g} | {one_line(ex['completion'])} |" for ex in examples]
    lines += ["", "## Checks (VADER / TextBlob)", "",
              "| variant | Spearman on [-1, 2] | monotone on [-1, 2] | alpha 2 > alpha 1 | gain vs full DPO at "
              "alpha 1 | best alpha | max perplexity ratio, alpha <= 1.5 |", "|---|---|---|---|---:|---:|---:|"]
    for name, c in results["checks"].items():
        h = c["heldout"]
        lines.append(
            f"| {name} | {_fmt(c['spearman_alpha_-1_to_2'], 2)} / {_fmt(h['spearman_alpha_-1_to_2'], 2)} | "
            f"{c['monotone_alpha_-1_to_2']} / {h['monotone_alpha_-1_to_2']} | "
            f"{c.get('alpha_2_beats_1', 'n/a')} / {h.get('alpha_2_beats_1', 'n/a')} | "
            f"{_pct(c.get('gain_vs_full_at_alpha_1'))} / {_pct(h.get('gain_vs_full_at_alpha_1'))} | "
            f"{c['best_alpha']:g} / {h['best_alpha']:g} | {c['max_perplexity_ratio_alpha_le_1.5']:.2f} |")
    if results.get("alpha0_identical_to_base") is not None:
        lines += ["", f"At alpha 0, {100 * results['alpha0_identical_to_base']:.1f}% of the samples are identical to "
                  "the base model's (same random numbers)."]
    lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {sec:.1f} |" for stage, sec in results["timings"].items()]
    return "\n".join(lines) + "\n"


def _fluency(row) -> str:
    return (f"{row['perplexity']:.2f} / {row['distinct_2']:.3f} / {row['repeated_4gram']:.3f} / "
            f"{row['unknown_words']:.3f} / {row['mean_words']:.1f}")


def one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def write_markdown(results: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write(markdown(results))
    return path


def plot(results: dict, out_dir: str) -> str:
    """Both judges' rewards (with standard-error bars) and two fluency measures against alpha; the base model and
    the baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = results["alphas"]
    panels = [("reward", "VADER reward (training judge)"), ("heldout_reward", "TextBlob polarity (held-out judge)"),
              ("perplexity", "base-model perplexity of samples"), ("repeated_4gram", "share with a repeated 4-gram")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    lines = [("base", results["base"], "gray")] + [
        (f"{k} DPO", v, c) for (k, v), c in zip(results["baselines"].items(), ["black", "tab:red", "tab:purple"])]
    for ax, (key, title) in zip(axes, panels):
        for name, variant in results["variants"].items():
            sweep = variant["sweep"]
            errors = [r[key + "_stderr"] for r in sweep] if key + "_stderr" in sweep[0] else None
            ax.errorbar(alphas, [r[key] for r in sweep], yerr=errors, marker="o", capsize=3, label=f"CLM {name}")
        for label, row, color in lines:
            ax.axhline(row[key], color=color, linestyle="--", label=label)
        ax.set(xlabel="alpha", title=title)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['model']}: reward and fluency against alignment strength")
    return save_figure(fig, os.path.join(out_dir, PLOT_NAME))


def save_figure(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
