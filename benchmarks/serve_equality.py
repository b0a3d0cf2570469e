"""`clm serve`'s engine on a device: mixed per-request alphas, each completion equal to `clm_ext.generate` alone.

Why: the serving engine turns the dial per token inside transformers' continuous batching (paged KV cache,
chunked prefill, hooks that give each packed row its request's alpha). Its CPU tests (tests/test_serve.py)
cannot show that the same holds on CUDA, where the engine's batches, kernels and device copies differ. This
runs the engine that `clm serve --device DEVICE` runs, in-process, on a tiny Llama in float32 (TF32 off: greedy
tokens then depend on the dial, not on reduction order) for each layer kind: requests at alphas spread over
[-1, 3] submitted concurrently, each compared token for token with greedy `model.generate` of that prompt
alone at that alpha. A layer kind the engine refuses (its ValueError) is reported as skipped, not failed.
Prints one RESULT line per layer kind; exits 1 if any completion differs.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402  (its word-level tokenizer: one token per word)
import common  # noqa: E402

import clm_ext  # noqa: E402

ALPHAS = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def aligned(base, layer: str):
    """A copy of `base` with the dial, its trainable weights moved well off the identity (alpha matters), and
    a head that never picks </s> (every completion runs to max_new_tokens: lengths are deterministic)."""
    model = clm_ext.add_alignment_control(copy.deepcopy(base), layer=layer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id].zero_()
        for p in model.parameters():
            if p.requires_grad:
                scale = 0.4 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.005
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return model.eval()


def reference(model, ids: list, alpha: float, new: int) -> list:
    with clm_ext.alignment_strength(model, alpha), torch.no_grad():
        x = torch.tensor([ids], device=model.device)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


async def served(engine, prompts: list, alphas: list, new: int) -> list:
    from clm_ext.serve.batch_hooks import RequestSpec

    async def one(ids, alpha):
        last = None
        async for step in engine.generate(ids, RequestSpec(alpha=alpha), max_new_tokens=new):
            last = step
        if last.error:
            raise RuntimeError(f"the engine failed a request: {last.error}")
        return last.tokens

    return await asyncio.gather(*[one(p, a) for p, a in zip(prompts, alphas)])


def check(layer: str, base, tok, requests: int, new: int, device: torch.device) -> dict:
    from clm_ext.serve.engine import Engine, EngineConfig

    model = aligned(base, layer)
    try:  # small pages and batches: prompts span pages, prefill is chunked, requests share steps
        engine = Engine(model, tok, EngineConfig(max_queue=requests, page_size=16, num_blocks=96,
                                                 max_batch_tokens=48))
    except ValueError as e:
        return dict(layer=layer, status="skipped", detail=f"the engine refuses it: {str(e).split(';')[0][:200]}")
    g = torch.Generator().manual_seed(1)
    vocab = base.config.vocab_size
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 40, (requests,), generator=g)]
    alphas = [ALPHAS[i % len(ALPHAS)] for i in range(requests)]
    try:
        t0 = time.perf_counter()
        got = asyncio.run(served(engine, prompts, alphas, new))
        seconds = time.perf_counter() - t0
    finally:
        engine.stop()
    want = [reference(model, p, a, new) for p, a in zip(prompts, alphas)]
    equal = sum(g_ == w for g_, w in zip(got, want))
    # A dial that changes nothing would make the check vacuous: the first prompt at every alpha must differ.
    distinct = len({tuple(reference(model, prompts[0], a, new)) for a in ALPHAS})
    ok = equal == requests and distinct > 1
    return dict(layer=layer, status="ok" if ok else "failed", equal=equal, requests=requests,
                distinct_over_alphas=distinct, tokens_per_s=sum(map(len, got)) / seconds,
                detail=f"{equal}/{requests} completions equal clm_ext.generate alone, mixed alphas in "
                       f"[{min(ALPHAS)}, {max(ALPHAS)}]; first prompt: {distinct} distinct completions over "
                       f"{len(ALPHAS)} alphas; engine {sum(map(len, got)) / seconds:.0f} tok/s (tiny model)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--layers", default="linear,block", help="comma-separated layer kinds (linear, block)")
    p.add_argument("--requests", type=int, default=14)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    base = common.build_llama("tiny", device, torch.float32).eval()
    tok = bench_dpo.tokenizer(base.config.vocab_size)
    failed = False
    for layer in args.layers.split(","):
        r = check(layer, base, tok, args.requests, args.new_tokens, device)
        failed |= r["status"] == "failed"
        print("RESULT " + json.dumps(r), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
