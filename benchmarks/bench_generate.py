"""Generation throughput: the base model against the same model with the alignment dial.

Why: benchmarks/README.md targets >= 0.98x of the base model's tokens/s at any alpha and with mixed
per-sequence alphas, and 1.0x for the merged model. Every provider generates from the same prompts (greedy,
exactly `new` tokens per sequence: min_new_tokens = max_new_tokens) with `model.generate`, KV cache on:
- base: the plain model; clm_alpha1: embed mode at alpha 1; clm_mixed: one alpha per sequence in [-1, 2];
- clm_cached: as clm_mixed with `cache_aligned_table=True` (a gather + lerp per step, no GEMM);
- clm_logits: mode "logits" (two streams, so about 2x the work: the fidelity mode, not the fast one); the
  layer runs on the aligned stream's rows only, the unaligned stream is a plain lookup;
- clm_logits_all_rows: mode "logits" as it was before the embedding skipped the unaligned half: the layer's
  op over all 2B rows, with alpha 0 for the unaligned half (the same numbers; what skipping that half saves). Case
  "logits_embedding_prefill" times the embedding's forward alone on the prefill's 2B rows for both;
- merged: `clm_ext.merge_alignment(model, 1.0)`, a plain model again;
- clm_block_logits: layer "block" (the paper's variant: a new first decoder block), mode "logits", mixed alphas;
- clm_block_embed: layer "block", mode "embed" (the block's output mixed before the first block), mixed alphas;
- clm_dials3: three named linear dials, a different alpha vector in [-1, 2]^3 per sequence (against clm_mixed,
  one dial, in row "tokens_per_s_vs_one_dial").
The issue-7 side-by-side of the variants, all at the same mixed per-sequence alphas: linear/embed = clm_mixed,
linear/logits = clm_logits, block/logits = clm_block_logits (block/embed = clm_block_embed).
Models come from Llama configs with random weights (the layer gets W = I + noise, as if trained). Calls are
timed interleaved (one of each provider per round) so that load changes hit all alike.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import clm_ext  # noqa: E402
from clm_ext.model import alignment_parameters, alignment_site  # noqa: E402

# (models, batch, prompt tokens, new tokens)
SETTINGS = {
    ("cpu", "smoke"): (("tiny",), 4, 8, 4),
    ("cpu", "quick"): (("cpu-7M",), 8, 32, 32),
    ("cpu", "full"): (("cpu-7M", "cpu-33M"), 8, 32, 32),
    ("cuda", "smoke"): (("tiny",), 4, 8, 4),
    ("cuda", "quick"): (("gpu-0.3B",), 32, 128, 64),  # shorter: ./run gpu-check has ~8 minutes for all
    ("cuda", "full"): (("gpu-0.3B", "gpu-1B"), 32, 128, 128),
}


def controlled(base, alpha, **kwargs):
    """A copy of `base` with the dial, its layer perturbed from the identity (a trained layer's cost; for
    layer="block" this also makes the zeroed output projections non-zero)."""
    model = clm_ext.add_alignment_control(copy.deepcopy(base), **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    clm_ext.set_alpha(model, alpha)
    return model.eval()


def three_dials(base, batch):
    """Three named linear dials, each perturbed as if trained, one alpha vector per sequence."""
    names = ["positive", "concise", "simple"]
    g = torch.Generator().manual_seed(1)
    vectors = [dict(zip(names, (torch.rand(3, generator=g) * 3 - 1).tolist())) for _ in range(batch)]
    return controlled(base, vectors, dials=names)


def all_rows_logits(base, alpha):
    """Mode "logits" with the layer's op run over both streams (alpha 0 for the unaligned rows, 1 for the
    aligned ones), as the embedding ran before it skipped the unaligned half: the same numbers, more work.
    (Llama configs: no embedding scale to apply.)"""
    model = controlled(base, alpha, mode="logits")
    site = alignment_site(model)

    def forward(input_ids):
        streams = torch.ones(input_ids.shape[0], device=input_ids.device)
        streams[: input_ids.shape[0] // 2] = 0.0
        weight, bias = (t.to(site.weight.dtype) for t in (site.alignment.weight, site.alignment.bias))
        return clm_ext.ops.embed_alignment_mix(input_ids, site.weight, weight, bias, streams)

    site.forward = forward
    return model


def two_stream_embedding(model, ids):
    """The embedding's forward alone on a prefill's two-stream batch (2B rows), as the logits-mode model
    calls it: what skipping the unaligned half saves, without the rest of the network around it."""
    site = alignment_site(model)
    both = torch.cat([ids, ids])

    def call():
        site._stream_rows = both.shape[0]
        try:
            return site(both)
        finally:
            site._stream_rows = None

    return call


def providers(base, batch):
    mixed = torch.linspace(-1.0, 2.0, batch)
    one = controlled(base, 1.0)
    return {
        "base": base,
        "clm_alpha1": one,
        "clm_mixed": controlled(base, mixed),
        "clm_cached": controlled(base, mixed, cache_aligned_table=True),
        "clm_logits": controlled(base, mixed, mode="logits"),
        "clm_logits_all_rows": all_rows_logits(base, mixed),
        "merged": clm_ext.merge_alignment(one, 1.0).eval(),
        "clm_block_logits": controlled(base, mixed, mode="logits", layer="block"),
        "clm_block_embed": controlled(base, mixed, mode="embed", layer="block"),
        "clm_dials3": three_dials(base, batch),
    }


def main(argv=None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="timed generate calls per provider")
    p.add_argument("--providers", help="comma-separated subset of the providers (default: all)")
    p.add_argument("--models", help=f"comma-separated model configs of {', '.join(common.MODELS)} (default: the mode's)")
    p.add_argument("--new-tokens", type=int, help="new tokens per sequence (default: the mode's)")
    args = p.parse_args(argv)
    device, dtype = common.resolve(args)
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    models, batch, prompt, new = SETTINGS[(device.type, mode)]
    if args.models:
        models = tuple(args.models.split(","))
        unknown = [m for m in models if m not in common.MODELS]
        if unknown:
            raise SystemExit(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(common.MODELS)}")
    if args.new_tokens is not None:
        if args.new_tokens < 1:
            raise SystemExit(f"--new-tokens: expected a positive number of tokens, got {args.new_tokens}")
        new = args.new_tokens
    repeats = args.repeats or (2 if args.smoke else (3 if args.quick else 5))
    rows = common.Rows("bench_generate", device, dtype)
    print(f"bench_generate on {rows.common['device_name']}, {dtype}", flush=True)
    for name in models:
        base = common.build_llama(name, device, dtype).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, common.MODELS[name]["vocab_size"], (batch, prompt), generator=g).to(device)
        mask = torch.ones_like(ids)
        models_ = providers(base, batch)
        if args.providers:
            models_ = {k: m for k, m in models_.items() if k in args.providers.split(",")}

        def gen(model):
            return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0)

        with torch.inference_mode():
            times = common.time_fns({k: gen(m) for k, m in models_.items()}, device, repeats=repeats, warmup=1,
                                    min_repeat_s=0.0)
        params = sum(p.numel() for p in base.parameters()) / 1e6
        shape = f"{name}: {params:.1f}M params, batch={batch}, prompt={prompt}, new={new}"
        for provider, t in times.items():
            rows.add("generate", shape, provider, "time_s", "s", t)
            rows.add("generate", shape, provider, "tokens_per_s", "tok/s", [batch * new / s for s in t])
            if "base" in times:  # tokens/s against the base within each interleaved round: the ratio's spread
                rows.add("generate", shape, provider, "tokens_per_s_vs_base", "x",
                         [b / s for b, s in zip(times["base"], t)])
            if provider == "clm_dials3" and "clm_mixed" in times:  # K = 3 dials against one, per round
                rows.add("generate", shape, provider, "tokens_per_s_vs_one_dial", "x",
                         [m / s for m, s in zip(times["clm_mixed"], t)])
            if alignment_site(models_[provider]) is not None:  # the alignment layer's size
                rows.add("generate", shape, provider, "alignment_params", "params",
                         sum(p.numel() for p in alignment_parameters(models_[provider])))
        two_stream = {k: two_stream_embedding(models_[k], ids) for k in ("clm_logits", "clm_logits_all_rows")
                      if k in models_}
        if two_stream:
            with torch.inference_mode():
                layer_times = common.time_fns(two_stream, device, repeats=4 * repeats)
            for provider, t in layer_times.items():
                rows.add("logits_embedding_prefill", shape, provider, "time_s", "s", t)
            print("    logits-mode embedding forward, prefill: " + "  ".join(
                f"{k}={common.quantiles(t)[0] * 1e6:.0f}us" for k, t in layer_times.items()), flush=True)
        base_s = common.quantiles(times["base" if "base" in times else next(iter(times))])[0]
        print(f"  {shape}\n    " + "  ".join(
            f"{k}={batch * new / common.quantiles(t)[0]:.0f} tok/s ({base_s / common.quantiles(t)[0]:.3f}x)"
            for k, t in times.items()), flush=True)
        del models_, base
    stem = rows.write(args.out)
    print(f"wrote {stem}.json and .csv ({len(rows.rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
