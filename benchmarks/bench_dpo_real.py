"""The cost of a DPO step on a real model (default SmolLM2-135M-Instruct, packaged on PyPI, float32): the CLM
layer against TRL full fine-tuning with a reference copy and TRL + PEFT LoRA, same pairs, batch and lengths,
plus the CLM layer with precomputed reference log-probs.

Providers (all through `clm_ext.train.make_dpo_trainer`):
- clm: CLMDPOTrainer, only the d x d layer trains, the reference is the same model at alpha 0 (one forward more
  per step, no copy);
- clm-precompute: the same with `precompute_ref_log_probs=True`: the reference is the frozen base, so its
  log-probs are computed once, before training (in the trainer's constructor), and no step runs a reference pass;
- full: TRL DPOTrainer, every weight trains, an explicit frozen reference copy in memory;
- lora: TRL DPOTrainer + PEFT LoRA r=8 on all linear layers (reference = adapter disabled).

Per provider: construct_s (building the trainer: tokenising, and for clm-precompute the reference pass over the
whole dataset), first_step_s, step_s (steady-state steps), peak memory (CPU: max RSS at the end of the last step
minus RSS before the model was loaded; CUDA: torch.cuda.max_memory_allocated), trainable_params and
checkpoint_bytes (one Trainer checkpoint at the last step: CLM's layer-only checkpoint, TRL's full / adapter ones).
Each provider runs in a fresh subprocess; the providers are run in interleaved rounds (clm, clm-precompute,
full, lora, then again), so a change of machine load hits all of them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_dpo import step_timer, warm_up_libraries  # noqa: E402

PROVIDERS = ("clm", "clm-precompute", "full", "lora")
WORDS = ("the service was slow but the food arrived warm and the staff smiled while we waited for a table near "
         "window on a quiet evening in late autumn with rain outside and music playing softly").split()


def pairs(rows: int, prompt_words: int, completion_words: int):
    """Seeded plain-text preference pairs; long enough that every sequence is cut to --max-length exactly."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())

    return Dataset.from_list([dict(prompt=text(prompt_words), chosen=" " + text(completion_words),
                                   rejected=" " + text(completion_words)) for _ in range(rows)])


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def worker(args) -> dict:
    """One provider in this process: load, build the trainer, train warmup + steps with one checkpoint at the
    end; return timings, memory, trainable parameters and the checkpoint's size."""
    import datasets
    import psutil
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from clm_ext.train import make_dpo_trainer

    datasets.disable_progress_bars()
    device, dtype = common.resolve(args)
    warm_up_libraries(device, dtype)
    rss_before = psutil.Process().memory_info().rss
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    base_params = sum(p.numel() for p in model.parameters())
    total = args.warmup + args.steps
    times, peak = [], {}

    def record_peak():
        # Before the checkpoint of the last step is written (saving is not part of a step's memory).
        peak["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if device.type == "cuda":
            peak["cuda"] = torch.cuda.max_memory_allocated(device)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=total, learning_rate=1e-5,
                        max_length=args.max_length, report_to="none", save_strategy="steps", save_steps=total,
                        logging_strategy="no", use_cpu=device.type == "cpu", dataloader_pin_memory=False, seed=0,
                        disable_tqdm=True, bf16=False, gradient_checkpointing=False,
                        precompute_ref_log_probs=args.worker == "clm-precompute")
        data = pairs(args.batch * total, args.max_length // 2, args.max_length)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        trainer = make_dpo_trainer(args.worker.split("-")[0], model, cfg, data, tokenizer)
        construct_s = time.perf_counter() - t0
        trainer.add_callback(step_timer(device, times, record_peak))
        trainer.train()
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        checkpoint = os.path.join(tmp, f"checkpoint-{total}")
        result = dict(
            shape=f"{args.model_name}: {base_params / 1e6:.1f}M params, batch={args.batch} pairs, "
                  f"max_length={args.max_length}",
            construct_s=construct_s, first_step_s=times[0],
            step_s=times[args.warmup:], trainable_params=sum(p.numel() for p in params),
            checkpoint_bytes=folder_bytes(checkpoint), checkpoint_files=sorted(
                os.path.relpath(os.path.join(d, f), checkpoint) for d, _, fs in os.walk(checkpoint) for f in fs),
        )
        if device.type == "cuda":
            result["peak_bytes"] = peak["cuda"]
        else:
            result["peak_rss_delta_bytes"] = peak["rss"] - rss_before
    return result


def run_provider(args, provider: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", provider, "--model-dir", args.model_dir, "--model-name",
           args.model_name, "--device", args.device, "--batch", str(args.batch), "--max-length",
           str(args.max_length), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += (["--dtype", args.dtype] if args.dtype else []) + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench_dpo_real worker {provider} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def write(device, dtype, runs: dict, out: Path) -> Path:
    rows = common.Rows("bench_dpo_real", device, dtype)
    case = "dpo_step_real/checkpointing_off"
    memory = "peak_bytes" if device.type == "cuda" else "peak_rss_delta_bytes"
    for name, results in runs.items():
        shape = results[0]["shape"]
        for metric, unit in (("construct_s", "s"), ("first_step_s", "s"), (memory, "B"), ("load_1min", "load")):
            rows.add(case, shape, name, metric, unit, [r[metric] for r in results])
        rows.add(case, shape, name, "step_s", "s", [s for r in results for s in r["step_s"]])
        rows.add(case, shape, name, "trainable_params", "params", results[0]["trainable_params"])
        rows.add(case, shape, name, "checkpoint_bytes", "B", results[0]["checkpoint_bytes"])
    return rows.write(out)


def main(argv=None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a packaged model name, a GGUF file or a checkpoint directory (clm_ext.sources)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all providers (default 2)")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step (default 4: 8 sequences)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run (default 1)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (default 2)")
    p.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--model-name", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    from clm_ext.sources import resolve_model

    args.model_dir, args.model_name = resolve_model(args.model), os.path.basename(os.path.normpath(args.model))
    device, dtype = common.resolve(args)
    providers = args.providers.split(",")
    print(f"bench_dpo_real on {common.device_name(device)}, {dtype}, {args.model}", flush=True)
    runs = {name: [] for name in providers}
    for round_ in range(args.rounds):
        for name in providers:
            load = os.getloadavg()[0]
            r = run_provider(args, name)
            r["load_1min"] = load
            runs[name].append(r)
            mem = r.get("peak_bytes", r.get("peak_rss_delta_bytes"))
            print(f"  round {round_} {name:15s} step {common.quantiles(r['step_s'])[0]:.2f} s  peak {mem / 2**20:.0f} "
                  f"MiB  checkpoint {r['checkpoint_bytes'] / 2**20:.1f} MiB  load {load:.1f}", flush=True)
        stem = write(device, dtype, runs, args.out)  # after every round: a long run cut short keeps what it did
        print(f"wrote {stem}.json and .csv ({round_ + 1} round(s))", flush=True)
    for name, results in runs.items():
        print(f"  {name} checkpoint: {', '.join(results[0]['checkpoint_files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
