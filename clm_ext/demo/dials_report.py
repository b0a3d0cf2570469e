"""The many-dials demo's outputs: results.json, results.md (the grid as tables, the checks, the cost) and the
heatmaps (dials_grid.png)."""
import json
import os

from .named_dials import PLOT_NAME, cells_by_vector
from .report import one_line, save_figure

# (key in a grid cell, title, number format)
PANELS = [("reward", "VADER (positive's judge)", "{:.2f}"), ("mean_words", "mean words (concise's judge)", "{:.1f}"),
          ("heldout_reward", "TextBlob (held-out judge)", "{:.2f}"), ("perplexity", "base-model perplexity", "{:.1f}")]


def _table(results: dict, key: str, fmt: str) -> list:
    first, second = results["dials"]
    grid = results["grid"]
    at = cells_by_vector((first, second), grid, results["cells"])
    err = key + "_stderr"
    lines = [f"| {first} \\ {second} | " + " | ".join(f"{y:g}" for y in grid) + " |", "|---:|" + "---:|" * len(grid)]
    for x in grid:
        cells = [fmt.format(at[(x, y)][key]) + (f" ± {at[(x, y)][err]:.2f}" if err in at[(x, y)] else "")
                 for y in grid]
        lines.append(f"| {x:g} | " + " | ".join(cells) + " |")
    return lines


def _share(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _pair_counts(results: dict) -> str:
    return ", ".join(f"{name}: {d['pairs']}" for name, d in results["per_dial"].items())


def markdown(results: dict) -> str:
    first, second = results["dials"]
    lines = [f"# clm demo --dials {first},{second} on {results['model']}", "",
             f"Each dial trained alone on its own pairs ({_pair_counts(results)}),"
             " then both loaded into one model. Rows: "
             f"{first}'s alpha; columns: {second}'s alpha; each cell {results['cells'][0]['n']} held-out samples "
             "(mean ± standard error, the same random numbers in every cell)."]
    for key, title, fmt in PANELS:
        lines += ["", f"## {title}", ""] + _table(results, key, fmt)
    lines += ["", f"## One held-out request at a few vectors ({first}, {second}), the same random numbers", "",
              f"Request: *{results['example_prompt'].strip()}*", "", f"| {first} | {second} | completion |",
              "|---:|---:|---|"]
    lines += [f"| {ex['alpha'][first]:g} | {ex['alpha'][second]:g} | {one_line(ex['completion'])} |"
              for ex in results["examples"]]
    lines += ["", "## Checks", "",
              "| dial | judge | Spearman (other dial at 0) | least Spearman over the other dial | effect at 1 | "
              "cross effect on the other judge (share of its own effect) | at (1, 1), share of the effect at 1 |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, c in results["checks"].items():
        other = next(n for n in results["dials"] if n != name)
        lines.append(f"| {name} | {c['judge']} | {c['spearman']:.2f} ({'met' if c['monotone'] else 'not met'}) | "
                     f"{c['spearman_min_over_other_dial']:.2f} | {c['effect_at_1']:+.3f} | "
                     f"{c[f'cross_effect_on_{other}']:+.3f} ({_share(c['cross_share'])}: "
                     f"{'met' if c['independent'] else 'not met'}) | {_share(c['composed_share_at_1_1'])} "
                     f"({'met' if c['composes'] else 'not met'}) |")
    lines += ["", "Effects are signed so that more of the dial is positive (concise: words removed). Targets: "
              "Spearman >= 0.9; cross effect < 25% of the other dial's own effect at 1; at (1, 1) >= 80% of each "
              "dial's effect at 1.", "", "## Cost", "", "| dial | pairs | trainable params | file (bytes) | "
              "DPO seconds |", "|---|---:|---:|---:|---:|"]
    for name, d in results["per_dial"].items():
        lines.append(f"| {name} | {d['pairs']} | {d['train']['trainable_params']:,} | {d['file_bytes']:,} | "
                     f"{d['train']['seconds']:.0f} |")
    speed = results["decode_tokens_per_s"]
    lines += ["", "Decoding, the same 32 prompts x 32 greedy tokens, mixed alphas per row, median of interleaved "
              "rounds: " + ", ".join(f"{k} {v:.0f} tokens/s" for k, v in speed.items()) +
              f"; two dials / one dial = {speed['two dials'] / speed['one dial']:.3f}x. "
              f"The grid sweep sampled {results['grid_tokens_per_s']:.0f} tokens/s.",
              "", "## Time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {sec:.1f} |" for stage, sec in results["timings"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: str) -> str:
    """One heatmap per judge over the grid, each cell labelled with its mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = results["dials"]
    grid = results["grid"]
    at = cells_by_vector((first, second), grid, results["cells"])
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.6))
    for ax, (key, title, fmt) in zip(axes, PANELS):
        values = [[at[(x, y)][key] for y in grid] for x in grid]
        image = ax.imshow(values, origin="lower", cmap="viridis", aspect="auto")
        low, high = image.get_clim()
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                bright = high > low and (value - low) / (high - low) > 0.6  # viridis is light at the top
                ax.text(j, i, fmt.format(value), ha="center", va="center", color="black" if bright else "white",
                        fontsize=8)
        ticks = [f"{a:g}" for a in grid]
        ax.set(xticks=range(len(grid)), xticklabels=ticks, yticks=range(len(grid)), yticklabels=ticks,
               xlabel=f"{second} alpha", ylabel=f"{first} alpha", title=title)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"{results['model']}: two dials, one model, one forward pass")
    return save_figure(fig, os.path.join(out_dir, PLOT_NAME))


def write(results: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    plot(results, out_dir)
