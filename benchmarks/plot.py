"""PNG charts and the headline-ratio table from the benchmark results (benchmarks/results/*.json).

Why: benchmarks/README.md's table must come from measured rows, never be typed by hand; `--table` prints it as
markdown, with the device and date of the rows it used. Targets missing from the results (e.g. the GPU rows
before a GPU run) are listed as pending.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

OP_PROVIDERS = ("clm", "eager", "compile", "gemm")


def index(rows):
    """{(case, shape, provider, metric): row}."""
    return {(r["case"], r["shape"], r["provider"], r["metric"]): r for r in rows}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_op(rows, out: Path) -> list[Path]:
    """Forward+backward time over the GEMM floor against N, one panel per (op, d); and the decode step."""
    plt = _plt()
    idx = index(rows)
    shapes = defaultdict(set)  # d -> {N}
    for r in rows:
        if r["case"].endswith("/fwdbwd") and r["shape"].startswith("N="):
            n, d = (int(part.split("=")[1]) for part in r["shape"].split())
            shapes[d].add(n)
    ops = ("alignment_mix", "embed_alignment_mix")
    paths = []
    if shapes:
        ds = sorted(shapes)
        fig, axes = plt.subplots(len(ops), len(ds), figsize=(4 * len(ds), 3.2 * len(ops)), squeeze=False)
        for i, op in enumerate(ops):
            for j, d in enumerate(ds):
                ax = axes[i][j]
                ns = sorted(shapes[d])
                for provider in OP_PROVIDERS:
                    pts = [(n, idx[k]["median"] / idx[f]["median"]) for n in ns
                           for k, f in [((f"{op}/per_seq/fwdbwd", f"N={n} d={d}", provider, "time_s"),
                                         (f"{op}/per_seq/fwdbwd", f"N={n} d={d}", "gemm", "time_s"))]
                           if k in idx and f in idx]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=provider)
                ax.set_xscale("log", base=2)
                ax.axhline(1.0, color="grey", lw=0.5)
                ax.set_title(f"{op}, d={d}", fontsize=9)
                ax.set_xlabel("tokens N")
                if j == 0:
                    ax.set_ylabel("fwd+bwd time / GEMM floor")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(_title(rows, "fused op, forward+backward, per-sequence alpha"), fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out / f"op_fwdbwd_{rows[0]['device']}.png"))
    decode = [r for r in rows if r["case"] == "decode" and r["metric"] == "time_s"]
    if decode:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        shapes_ = sorted({r["shape"] for r in decode}, key=lambda s: (int(s.split()[1][2:]), int(s.split()[0][2:])))
        provs = sorted({r["provider"] for r in decode})
        width = 0.8 / len(provs)
        for k, provider in enumerate(provs):
            vals = [idx.get(("decode", s, provider, "time_s"), {}).get("median", float("nan")) * 1e6 for s in shapes_]
            ax.bar([i + k * width for i in range(len(shapes_))], vals, width, label=provider)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes_))], [s.rsplit(" ", 1)[0] for s in shapes_],
                      rotation=30, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time per step (us)")
        ax.legend(fontsize=7)
        ax.set_title(_title(rows, "decode step of the layer"), fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out / f"op_decode_{rows[0]['device']}.png"))
    return paths


def plot_relative(rows, out: Path, name: str, metrics: dict, baseline: str) -> list[Path]:
    """Bars of each provider's metric relative to `baseline`, one group per (case, model shape)."""
    plt = _plt()
    idx = index(rows)
    groups = sorted({(r["case"], r["shape"]) for r in rows})
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics.items()):
        width = 0.8 / len(provs)
        for k, provider in enumerate(provs):
            vals = []
            for case, s in groups:
                row, base = idx.get((case, s, provider, metric)), idx.get((case, s, baseline, metric))
                # a baseline measured at 0 (a smoke run's memory delta) has no ratio: drawn as a gap
                vals.append(row["median"] / base["median"] if row and base and base["median"] else float("nan"))
            ax.bar([i + k * width for i in range(len(groups))], vals, width, label=provider)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))],
                      [s.split(":")[0] + ("\n" + case.split("/", 1)[1] if "/" in case else "") for case, s in groups],
                      fontsize=7)
        ax.set_ylabel(f"{label} / {baseline}")
        ax.legend(fontsize=7)
    fig.suptitle(_title(rows, name), fontsize=9)
    fig.tight_layout()
    return [_save(fig, out / f"{name}_{rows[0]['device']}.png")]


def _title(rows, what: str) -> str:
    r = rows[0]
    return f"{what}\n{r['device_name']}, {r['dtype']}, torch {r['torch']}, {r['date'][:10]}"


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The headline table: one line per performance target (benchmarks/README.md) that these scripts measure.


def _ratio(idx, a, b, metric="time_s"):
    ra, rb = idx.get(a[:3] + (metric,)), idx.get(b[:3] + (metric,))
    return ra["median"] / rb["median"] if ra and rb else None


def _fmt(x, suffix="x"):
    return "n/a" if x is None else f"{x:.2f}{suffix}"


def headline(results: Path) -> list[str]:
    lines = ["| target | measured | device | command |", "|---|---|---|---|"]
    for device in ("cuda", "cpu"):
        path = results / f"bench_op_{device}.json"
        if not path.exists():
            lines.append(f"| fused op, {device} | pending: no {device} results | | `clm bench op --device {device}` |")
            continue
        rows = common.load_rows(path)
        idx, where = index(rows), f"{rows[0]['device_name']}, {rows[0]['dtype']}"
        n, d = (16384, 4096) if device == "cuda" else (4096, 512)
        shape = f"N={n} d={d}"
        cmd = f"`clm bench op --device {device}`"
        for alpha in ("per_seq", "scalar"):
            case = f"alignment_mix/{alpha}/fwdbwd"
            k = lambda p: (case, shape, p)  # noqa: E731
            if k("clm") + ("time_s",) not in idx:
                continue
            lines.append(
                f"| fused op fwd+bwd {shape}, {alpha} alpha | eager/clm {_fmt(_ratio(idx, k('eager'), k('clm')))}, "
                f"compile/clm {_fmt(_ratio(idx, k('compile'), k('clm')))}, "
                f"clm/floor {_fmt(_ratio(idx, k('clm'), k('gemm')))} | {where} | {cmd} |")
        saved = [r for r in rows if r["metric"] == "saved_bytes" and r["case"].endswith("alpha_trainable")
                 and r["shape"] == shape]
        if saved:
            by = {(r["case"].split("/")[0], r["provider"]): r["median"] for r in saved}
            lines.append(
                "| saved for backward, alpha trainable, " + shape + " | " + "; ".join(
                    f"{op}: clm {by[(op, 'clm')] / 2**20:.2f} MiB vs eager {by[(op, 'eager')] / 2**20:.2f} MiB"
                    for op in ("alignment_mix", "embed_alignment_mix") if (op, "clm") in by)
                + f" | {where} | {cmd} |")
        decode = sorted({r["shape"] for r in rows if r["case"] == "decode"})
        big = [s for s in decode if s.startswith("B=64") and f"d={d} " in s + " "]
        for s in big[:1]:
            k = lambda p: ("decode", s, p)  # noqa: E731
            kernels = idx.get(k("clm_cached_lerp") + ("kernels",))
            lines.append(
                f"| decode step {s} | eager/fused {_fmt(_ratio(idx, k('eager'), k('clm_fused')))}, "
                f"eager/cached-lerp {_fmt(_ratio(idx, k('eager'), k('clm_cached_lerp')))}"
                + (f", cached-lerp kernels {kernels['median']:.0f}" if kernels else "") + f" | {where} | {cmd} |")
    for device in ("cuda", "cpu"):
        path = results / f"bench_generate_{device}.json"
        if not path.exists():
            lines.append(f"| generation tokens/s, {device} | pending: no {device} results | | "
                         f"`clm bench generate --device {device}` |")
            continue
        rows = common.load_rows(path)
        idx, where = index(rows), f"{rows[0]['device_name']}, {rows[0]['dtype']}"
        for s in sorted({r["shape"] for r in rows}):
            provs = [r["provider"] for r in rows if r["shape"] == s and r["metric"] == "tokens_per_s"]
            ratios = ", ".join(f"{p} {_fmt(_ratio(idx, ('generate', s, p), ('generate', s, 'base'), 'tokens_per_s'))}"
                               for p in provs if p != "base")
            lines.append(f"| generation tokens/s vs base, {s} | {ratios} | {where} | "
                         f"`clm bench generate --device {device}` |")
    for device in ("cuda", "cpu"):
        path = results / f"bench_dpo_{device}.json"
        if not path.exists():
            lines.append(f"| DPO step, {device} | pending: no {device} results | | `clm bench dpo --device {device}` |")
            continue
        rows = common.load_rows(path)
        idx, where = index(rows), f"{rows[0]['device_name']}, {rows[0]['dtype']}"
        mem = "peak_bytes" if device == "cuda" else "accounted_bytes"
        for case, s in sorted({(r["case"], r["shape"]) for r in rows}):
            k = lambda p: (case, s, p)  # noqa: E731
            for clm in ("clm", "clm-block"):
                if k(clm) + ("step_s",) not in idx:
                    continue
                parts = []
                for base in ("full", "lora"):
                    parts.append(f"vs {base}: time {_fmt(_ratio(idx, k(clm), k(base), 'step_s'))}, "
                                 f"{mem} {_fmt(_ratio(idx, k(clm), k(base), mem))}"
                                 + ("" if device == "cuda" else
                                    f", peak RSS delta {_fmt(_ratio(idx, k(clm), k(base), 'peak_rss_delta_bytes'))}"))
                lines.append(f"| DPO step ({clm}), {s}, {case.split('/', 1)[1].replace('_', ' ')} | "
                             f"{'; '.join(parts)} | {where} | `clm bench dpo --device {device}` |")
    return lines


# ----------------------------------------------------------------------------------------------
# The side-by-side: the layer variants against full fine-tuning DPO (and LoRA), per model config.
# (variant, generate provider, DPO provider, note). The DPO trainer trains mode "embed"; at alpha 0 (the
# reference) and 1 (the policy) mode "logits" is the same network, so a logits variant's DPO step is its
# embed twin's (measured once).
VARIANTS = (
    ("linear/embed", "clm_mixed", "clm", ""),
    ("linear/logits", "clm_logits", "clm", "DPO: = linear/embed"),
    ("block/logits", "clm_block_logits", "clm-block", ""),
    ("block/embed", "clm_block_embed", "clm-block", "DPO: = block/logits"),
    ("full FT DPO", None, "full", "generation: not measured; the fine-tuned model is the base architecture"),
    ("LoRA DPO", None, "lora", "generation: not measured; merged LoRA is the base architecture"),
)


def _model_of(shape: str) -> str:
    return shape.split(":", 1)[0]


def _variant_data(results: Path, device: str):
    """{model: {...}} from bench_generate_<device>.json and bench_dpo_<device>.json (either may be missing)."""
    gen_path, dpo_path = results / f"bench_generate_{device}.json", results / f"bench_dpo_{device}.json"
    gen = common.load_rows(gen_path) if gen_path.exists() else []
    dpo = common.load_rows(dpo_path) if dpo_path.exists() else []
    models = list(dict.fromkeys(_model_of(r["shape"]) for r in dpo + gen))
    data = {}
    for m in models:
        g = {(r["provider"], r["metric"]): r for r in gen if _model_of(r["shape"]) == m}
        d = {(r["case"].split("/", 1)[-1].removeprefix("checkpointing_"), r["provider"], r["metric"]): r
             for r in dpo if _model_of(r["shape"]) == m}
        data[m] = dict(gen=g, dpo=d, gen_shape=next((r["shape"] for r in gen if _model_of(r["shape"]) == m), None),
                       dpo_shape=next((r["shape"] for r in dpo if _model_of(r["shape"]) == m), None))
    return gen, dpo, data


def _rel(num, den, fmt):
    if num is None:
        return "n/a"
    text = fmt(num["median"])
    return f"{text} ({num['median'] / den['median']:.2f}x)" if den else text


def variants_table(results: Path) -> list[str]:
    """Markdown: per device and model config, each variant's trainable parameters, DPO step time and memory
    against full fine-tuning DPO, and generation tokens/s against the base model."""
    lines = []
    for device in ("cuda", "cpu"):
        gen, dpo, data = _variant_data(results, device)
        if not gen and not dpo:
            lines.append(f"\nSide-by-side of the variants, {device}: pending: no {device} results "
                         f"(`clm bench generate --device {device}`, `clm bench dpo --device {device}`)")
            continue
        first = (dpo or gen)[0]
        mem = "peak_bytes" if device == "cuda" else "accounted_bytes"
        for model, v in data.items():
            ckpts = [c for c in ("off", "on") if any(k[0] == c for k in v["dpo"])]
            lines += ["", f"Side-by-side of the variants, {model}, {first['device_name']}, {first['dtype']}, "
                          f"{first['date'][:10]}. DPO: {v['dpo_shape'] or 'not measured'}; generation: "
                          f"{v['gen_shape'] or 'not measured'} (mixed per-sequence alphas in [-1, 2]). "
                          "Ratios in brackets: DPO against full FT DPO, generation against the base model.", ""]
            head = ["variant", "trainable params"]
            for c in ckpts:
                head += [f"DPO step, ckpt {c}", f"DPO {mem.replace('_bytes', '')} MiB, ckpt {c}"]
                if device == "cpu":
                    head.append(f"DPO peak RSS delta MiB, ckpt {c}")
            head += ["generation tok/s", "note"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for name, gp, dp, note in VARIANTS:
                params = v["dpo"].get((ckpts[0], dp, "trainable_params")) if ckpts else None
                if params is None and gp:
                    params = v["gen"].get((gp, "alignment_params"))
                full_params = v["dpo"].get((ckpts[0], "full", "trainable_params")) if ckpts else None
                cells = [name, "n/a" if params is None else f"{params['median'] / 1e6:.3f}M" + (
                    f" ({100 * params['median'] / full_params['median']:.2f}% of full)" if full_params else "")]
                for c in ckpts:
                    full = lambda metric: v["dpo"].get((c, "full", metric))  # noqa: E731
                    own = lambda metric: v["dpo"].get((c, dp, metric))  # noqa: E731
                    cells.append(_rel(own("step_s"), full("step_s"), lambda x: f"{x:.3f} s"))
                    cells.append(_rel(own(mem), full(mem), lambda x: f"{x / 2**20:.0f}"))
                    if device == "cpu":
                        cells.append(_rel(own("peak_rss_delta_bytes"), full("peak_rss_delta_bytes"),
                                          lambda x: f"{x / 2**20:.0f}"))
                if gp:
                    cells.append(_rel(v["gen"].get((gp, "tokens_per_s")), v["gen"].get(("base", "tokens_per_s")),
                                      lambda x: f"{x:.0f}"))
                else:
                    cells.append("—")
                cells.append(note)
                lines.append("| " + " | ".join(cells) + " |")
            base = v["gen"].get(("base", "tokens_per_s"))
            if base:
                lines.append(f"| base model (no layer) | 0 | " + " | ".join(["—"] * (len(head) - 4))
                             + f" | {base['median']:.0f} (1.00x) | |")
    return lines


def plot_variants(results: Path, out: Path, device: str) -> list[Path]:
    """Four panels per device: trainable parameters, DPO step time and memory against full FT DPO
    (checkpointing off where measured), generation tokens/s against the base model; one group per model."""
    gen, dpo, data = _variant_data(results, device)
    if not gen and not dpo:
        return []
    plt = _plt()
    mem = "peak_bytes" if device == "cuda" else "accounted_bytes"
    models = list(data)
    panels = (("trainable params", None), ("DPO step time / full FT", "step_s"),
              (f"DPO {mem.replace('_', ' ')} / full FT", mem), ("generation tok/s / base", "tokens_per_s"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    width = 0.8 / len(VARIANTS)
    for ax, (label, metric) in zip(axes[0], panels):
        for k, (name, gp, dp, _) in enumerate(VARIANTS):
            vals = []
            for m in models:
                v = data[m]
                ckpt = "off" if any(key[0] == "off" for key in v["dpo"]) else "on"
                if metric is None:
                    r = v["dpo"].get((ckpt, dp, "trainable_params")) or (v["gen"].get((gp, "alignment_params"))
                                                                        if gp else None)
                    vals.append(r["median"] if r else float("nan"))
                elif metric == "tokens_per_s":
                    r, b = (v["gen"].get((gp, metric)) if gp else None), v["gen"].get(("base", metric))
                    vals.append(r["median"] / b["median"] if r and b else float("nan"))
                else:
                    r, b = v["dpo"].get((ckpt, dp, metric)), v["dpo"].get((ckpt, "full", metric))
                    vals.append(r["median"] / b["median"] if r and b else float("nan"))
            ax.bar([i + k * width for i in range(len(models))], vals, width, label=name)
        if metric is None:
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models, fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[0][0].legend(fontsize=7)
    first = (dpo or gen)[0]
    fig.suptitle(f"variants side by side (DPO: checkpointing off where measured; generation: mixed alphas)\n"
                 f"{first['device_name']}, {first['dtype']}, torch {first['torch']}, {first['date'][:10]}", fontsize=9)
    fig.tight_layout()
    return [_save(fig, out / f"variants_{device}.png")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=common.RESULTS, help="folder of the *.json results")
    p.add_argument("--out", type=Path, help="folder for the PNGs (default: --results)")
    p.add_argument("--table", action="store_true", help="print the headline-ratio table (markdown)")
    args = p.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for path in sorted(args.results.glob("*.json")):
        rows = common.load_rows(path)
        if not rows:
            continue
        script = rows[0]["script"]
        if script == "bench_op":
            made += plot_op(rows, out)
        elif script == "bench_generate":
            made += plot_relative(rows, out, "generate", {"tokens_per_s": "tokens/s"}, "base")
        elif script == "bench_dpo":
            mem = "peak_bytes" if rows[0]["device"] == "cuda" else "accounted_bytes"
            metrics = {"step_s": "step time", mem: mem.replace("_", " ")}
            if rows[0]["device"] == "cpu":
                metrics["peak_rss_delta_bytes"] = "peak RSS delta"
            made += plot_relative(rows, out, "dpo", metrics, "full")
    for device in ("cuda", "cpu"):
        made += plot_variants(args.results, out, device)
    for path in made:
        print(f"wrote {path}")
    if args.table:
        print("\n".join(headline(args.results) + variants_table(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
