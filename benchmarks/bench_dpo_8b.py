"""DPO at the paper's scale: one training step of a Llama-3.1-8B-shaped model on one GPU, CLM against TRL.

Why: the paper trains the layer of 7-8B models; at 0.3B (bench_dpo) the step is launch-bound and says little
about what one GPU can align. No weights are needed to measure time and memory, so the model has Llama-3.1-8B's
shape with random weights: built on the meta device (no host memory, no init time) and materialised on the
target device in bf16 (`to_empty`, then normal(0, 0.02) weights, unit norms, the rotary buffers rebuilt).

Providers, each in a fresh subprocess (its own allocator, so torch.cuda.max_memory_allocated is its own):
- clm: CLMDPOTrainer on the linear layer (reference = the same model at alpha 0, no copy);
- full: TRL DPOTrainer, every weight trains, a frozen reference copy, AdamW on bf16 weights (bf16 states);
- clm-block: CLMDPOTrainer on the paper's block layer;
- lora: TRL DPOTrainer + PEFT LoRA r 16 on every linear layer (all but the head).
In this order (of value: the headline is clm against full), so that a run cut short keeps the headline.
Each: 4 preference pairs of 512 prompt + 512 completion tokens, gradient checkpointing on, 1 warm-up step
then 3 timed steps. If a provider runs out of GPU memory, the OOM is recorded (metric oom_at_pairs) and the
batch is halved, one short run (1 warm-up + 1 timed step) per try, down to 1 pair: the largest batch that
fits is recorded (largest_fitting_pairs) with its step time and peak.

`--time-limit` bounds the whole run: results are written after every provider, and a provider that could not
start in the time left is reported as cut. `--smoke` runs a tiny model of the same family (GQA, untied head)
in-process: the code path, not a measurement. `--shape tiny` keeps the subprocesses (what the dry run of
./run gpu-check rehearses).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402
import common  # noqa: E402

SHAPES = {
    # meta-llama/Llama-3.1-8B's config.json (8.03B parameters); its llama3 rope scaling changes neither
    # time nor memory and is left out.
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=256),
}
PROVIDERS = ("clm", "full", "clm-block", "lora")  # in order of value: a stage cut short keeps the headline
TRAINER = {"clm": "clm", "clm-block": "clm", "full": "full", "lora": "lora"}
LORA_R = 16
# shape -> (pairs, prompt tokens, completion tokens, warm-up steps, timed steps)
SETTINGS = {"llama-3.1-8b": (4, 512, 512, 1, 3), "tiny": (4, 16, 16, 1, 3)}
SEARCH_STEPS = (1, 1)  # warm-up, timed: each try of the smaller-batch search after an OOM


def materialise(shape: str, device: torch.device, dtype: torch.dtype):
    """A LlamaForCausalLM of SHAPES[shape], built on the meta device and materialised on `device` with
    seeded random weights: the 8B model never exists on the host, and no init kernel runs twice."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02, generator=g)
        for module in model.modules():  # non-persistent buffers (rotary inv_freq) are garbage after to_empty
            if hasattr(module, "inv_freq"):
                fresh = type(module)(module.config).to(device)
                for name, buf in fresh.named_buffers():
                    setattr(module, name, buf)
    return model


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def worker(provider: str, shape: str, pairs: int, warmup: int, steps: int, device: torch.device,
           dtype: torch.dtype) -> dict:
    """One provider in this process: materialise, train warmup + steps, return timings and memory (or the OOM)."""
    import datasets
    from trl import DPOConfig

    import clm_ext
    from clm_ext.train import default_lora_config, make_dpo_trainer

    datasets.disable_progress_bars()
    _, prompt, completion, _, _ = SETTINGS[shape]
    vocab = SHAPES[shape]["vocab_size"]
    t0 = time.perf_counter()
    model = materialise(shape, device, dtype)
    common.sync(device)
    materialise_s = time.perf_counter() - t0
    base_params = sum(p.numel() for p in model.parameters())
    if provider == "clm-block":
        clm_ext.add_alignment_control(model, layer="block")
    extra = {"peft_config": default_lora_config(LORA_R)} if provider == "lora" else {}
    times = []
    result = dict(provider=provider, pairs=pairs, materialise_s=materialise_s,
                  shape=f"{shape}: {_count(base_params)} params, {pairs} pairs, seq={prompt}+{completion}, "
                        f"checkpointing on")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(output_dir=tmp, per_device_train_batch_size=pairs, max_steps=warmup + steps,
                        learning_rate=1e-6, max_length=prompt + completion + 2, report_to="none",
                        save_strategy="no", logging_strategy="no", use_cpu=device.type == "cpu",
                        dataloader_pin_memory=False, seed=0, disable_tqdm=True, bf16=False,
                        gradient_checkpointing=True, optim="adamw_torch")
        data = bench_dpo.dataset(pairs * (warmup + steps), prompt, completion, vocab)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:  # the reference copy of "full" is made here: an OOM can come before the first step
            trainer = make_dpo_trainer(TRAINER[provider], model, cfg, data, bench_dpo.tokenizer(vocab), **extra)
            trainer.add_callback(bench_dpo.step_timer(device, times))
            trainer.train()
        except torch.OutOfMemoryError as e:
            result.update(oom=True, error=str(e).splitlines()[0][:300])
            if device.type == "cuda":
                result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            return result
        params = [p for p in trainer.model.parameters()]
        result.update(first_step_s=times[0], step_s=times[warmup:],
                      trainable_params=sum(p.numel() for p in params if p.requires_grad))
        if device.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        else:  # no allocator statistics on the CPU: weights (with the reference copy), gradients, optimizer
            modules = [trainer.model] + ([trainer.ref_model] if isinstance(trainer.ref_model, torch.nn.Module) else [])
            opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            every = [p for m in modules for p in m.parameters()]
            result["accounted_bytes"] = (bench_dpo.tensor_bytes(every) + bench_dpo.tensor_bytes(
                [p for p in every if p.requires_grad]) + bench_dpo.tensor_bytes(state))
    return result


def halvings(pairs: int) -> list:
    """The batches an OOM search tries after `pairs` did not fit: pairs // 2, pairs // 4, ..., 1."""
    out = []
    while pairs > 1:
        pairs //= 2
        out.append(pairs)
    return out


def largest_fitting(try_batch, pairs: int):
    """Try halvings of `pairs` in turn; return the first result that did not run out of memory, else None."""
    for b in halvings(pairs):
        r = try_batch(b)
        if not r.get("oom"):
            return r
    return None


def run_provider(args, provider: str, pairs: int, warmup: int, steps: int, timeout: float) -> dict:
    if args.in_process:
        device, dtype = common.resolve(args)
        return worker(provider, args.shape, pairs, warmup, steps, device, dtype)
    cmd = [sys.executable, __file__, "--worker", provider, "--shape", args.shape, "--pairs", str(pairs),
           "--steps", f"{warmup},{steps}", "--device", args.device] + \
          (["--dtype", args.dtype] if args.dtype else []) + (["--threads", str(args.threads)] if args.threads else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=None if timeout == float("inf") else timeout)
    except subprocess.TimeoutExpired:
        return dict(provider=provider, pairs=pairs, cut=f"did not finish in the {timeout:.0f} s left")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench_dpo_8b worker {provider} ({pairs} pairs) failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def record(rows: common.Rows, r: dict, case: str = "dpo_step") -> None:
    shape, provider = r["shape"], r["provider"]
    if r.get("oom"):
        rows.add(case, shape, provider, "oom_at_pairs", "pairs", r["pairs"])
        print(f"  {provider:9s} {r['pairs']} pairs: out of memory ({r['error']})", flush=True)
        return
    rows.add(case, shape, provider, "first_step_s", "s", r["first_step_s"])
    rows.add(case, shape, provider, "step_s", "s", r["step_s"])
    rows.add(case, shape, provider, "trainable_params", "params", r["trainable_params"])
    rows.add(case, shape, provider, "materialise_s", "s", r["materialise_s"])
    mem = "peak_bytes" if "peak_bytes" in r else "accounted_bytes"
    rows.add(case, shape, provider, mem, "B", r[mem])
    print(f"  {provider:9s} {shape}: step {common.quantiles(r['step_s'])[0]:.3f} s "
          f"(first {r['first_step_s']:.2f} s), {mem} {r[mem] / 2**20:.0f} MiB, "
          f"materialised in {r['materialise_s']:.1f} s", flush=True)


def main(argv=None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--shape", choices=tuple(SHAPES), help="model shape (default: llama-3.1-8b; --smoke: tiny)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (default: none)")
    p.add_argument("--in-process", action="store_true", help="every provider in this process (no isolation)")
    p.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.smoke else "llama-3.1-8b")
    args.in_process = args.in_process or args.smoke
    device, dtype = common.resolve(args)
    if args.worker:
        warmup, steps = map(int, args.steps.split(","))
        print("RESULT " + json.dumps(worker(args.worker, args.shape, args.pairs, warmup, steps, device, dtype)),
              flush=True)
        return 0
    providers = args.providers.split(",")
    unknown = [x for x in providers if x not in PROVIDERS]
    if unknown:
        raise SystemExit(f"--providers: unknown {', '.join(unknown)}; expected a subset of {', '.join(PROVIDERS)}")
    pairs, _, _, warmup, steps = SETTINGS[args.shape]
    end = time.monotonic() + (args.time_limit or float("inf"))
    rows = common.Rows("bench_dpo_8b", device, dtype)
    print(f"bench_dpo_8b on {rows.common['device_name']}, {dtype}, shape {args.shape}", flush=True)
    cut = []
    for provider in providers:
        left = end - time.monotonic()
        if left < 5:
            cut.append(f"{provider} (no time left)")
            continue
        r = run_provider(args, provider, pairs, warmup, steps, left)
        if r.get("cut"):
            cut.append(f"{provider} ({r['cut']})")
            continue
        record(rows, r)
        if r.get("oom"):  # the largest batch that fits, halving, one short run per try
            fit = largest_fitting(lambda b: run_provider(args, provider, b, *SEARCH_STEPS,
                                                         max(end - time.monotonic(), 1)), pairs)
            if fit is not None and fit.get("cut"):
                cut.append(f"{provider} batch search ({fit['cut']})")
            elif fit is not None:
                rows.add("dpo_step", fit["shape"], provider, "largest_fitting_pairs", "pairs", fit["pairs"])
                record(rows, fit, case="dpo_step_largest_fitting")
            else:
                rows.add("dpo_step", r["shape"], provider, "largest_fitting_pairs", "pairs", 0)
                print(f"  {provider}: not even 1 pair fits", flush=True)
        rows.write(args.out)  # after every provider: a run stopped at its budget keeps what it measured
    stem = rows.write(args.out)
    if cut:
        print("cut: " + "; ".join(cut), flush=True)
    print(f"wrote {stem}.json and .csv ({len(rows.rows)} rows)" + (f"; cut: {len(cut)}" if cut else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
