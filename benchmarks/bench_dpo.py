"""One DPO training step: clm-ext (the layer only, reference = the same model at alpha 0) against TRL full
fine-tuning with a frozen reference copy and TRL + PEFT LoRA; same model config, data, batch and lengths.

clm-ext runs twice: "clm" trains the linear layer (layer="linear"), "clm-block" the paper's decoder-block
layer (layer="block"), both through CLMDPOTrainer. The trainer trains in mode "embed"; at alpha 0 and 1 that is
the same network as mode "logits", so the DPO step of linear/logits is clm's and that of block/logits is
clm-block's (measured once each, not twice). trainable_params is reported for every provider.

Why: benchmarks/README.md targets peak memory <= 0.55x and step time <= 0.8x of full DPO, and <= 1.0x of
LoRA DPO. Each provider runs in a fresh subprocess (no allocator or import state shared; --smoke runs them
in-process, as it only checks that the code runs), through
`clm_ext.train.make_dpo_trainer`, for `warmup + steps` optimizer steps on random-token preference pairs.

Rows per provider: first_step_s (the first, cold step), step_s (steady-state steps), steps_per_s, and
memory. On CUDA peak_bytes is torch.cuda.max_memory_allocated over the whole run (weights, reference copy,
gradients, optimizer state, activations). On CPU torch's allocator keeps no statistics, so two figures:
peak_rss_delta_bytes (the process's max RSS minus its RSS before the model was built; includes allocator
and Python overhead, noisy) and accounted_bytes = param_bytes + grad_bytes + optimizer_bytes + saved_bytes
(activations autograd saved in one training forward, parameters excluded), which is deterministic.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# clm: layer="linear" (the d x d layer); clm-block: layer="block" (a new first decoder block, the paper's variant).
# Both train in mode "embed", which at alpha 0 (the reference) and 1 (the policy) is the same network as mode
# "logits": the step of linear/logits is that of clm, the step of block/logits that of clm-block.
PROVIDERS = ("clm", "clm-block", "full", "lora")
TRAINER = {"clm": "clm", "clm-block": "clm", "full": "full", "lora": "lora"}

# (models, batch of pairs, prompt tokens, completion tokens, warm-up steps, timed steps)
SETTINGS = {
    ("cpu", "smoke"): (("tiny",), 2, 8, 8, 1, 2),
    ("cpu", "quick"): (("cpu-7M",), 4, 64, 64, 1, 3),
    ("cpu", "full"): (("cpu-7M", "cpu-33M"), 4, 64, 64, 1, 3),
    ("cuda", "smoke"): (("tiny",), 2, 8, 8, 1, 2),
    ("cuda", "quick"): (("gpu-0.3B",), 8, 128, 384, 2, 5),  # fewer steps: ./run gpu-check has ~8 minutes
    ("cuda", "full"): (("gpu-0.3B", "gpu-1B"), 8, 128, 384, 2, 10),
}


def tokenizer(vocab: int):
    """A word-level tokenizer over the words t3..t{vocab-1} (one token per word): exact sequence lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def dataset(rows: int, prompt: int, completion: int, vocab: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(f"t{i}" for i in torch.randint(3, vocab, (n,), generator=g).tolist())

    return Dataset.from_list([dict(prompt=text(prompt), chosen=" " + text(completion),
                                   rejected=" " + text(completion)) for _ in range(rows)])


def tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def warm_up_libraries(device: torch.device, dtype: torch.dtype) -> None:
    """One tiny training step first, so that the RSS baseline already holds the code pages and buffers of
    the math libraries (BLAS, oneDNN, autograd, AdamW) and the RSS delta counts the provider's data."""
    model = common.build_llama("tiny", device, dtype)
    ids = torch.randint(3, 256, (2, 16), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(model.parameters()).step()


def step_timer(device: torch.device, times: list, after_step=None):
    """A Trainer callback appending each optimizer step's wall time (device synchronised) to `times`;
    `after_step()` runs at the end of each step, before the Trainer saves or logs."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            common.sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            common.sync(device)
            times.append(time.perf_counter() - self.t0)
            if after_step is not None:
                after_step()

    return StepTimer()


def worker(args) -> dict:
    """One provider in this process: build, train warmup + steps, return timings and memory."""
    import datasets
    import psutil
    from trl import DPOConfig

    from clm_ext.train import make_dpo_trainer

    datasets.disable_progress_bars()
    device, dtype = common.resolve(args)
    models, batch, prompt, completion, warmup, steps = SETTINGS[(device.type, args.mode)]
    vocab = common.MODELS[args.model]["vocab_size"]
    warm_up_libraries(device, dtype)
    rss_before = psutil.Process().memory_info().rss
    model = common.build_llama(args.model, device, dtype)
    base_params = sum(p.numel() for p in model.parameters())
    if args.worker == "clm-block":
        import clm_ext

        clm_ext.add_alignment_control(model, layer="block")  # mode "embed": what CLMDPOTrainer trains
    times = []

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch, max_steps=warmup + steps,
                        learning_rate=1e-5, max_length=prompt + completion + 2, report_to="none",
                        save_strategy="no", logging_strategy="no", use_cpu=device.type == "cpu",
                        dataloader_pin_memory=False, seed=0, disable_tqdm=True, bf16=False,
                        gradient_checkpointing=args.checkpointing == "on")
        data = dataset(batch * (warmup + steps), prompt, completion, vocab)
        trainer = make_dpo_trainer(TRAINER[args.worker], model, cfg, data, tokenizer(vocab))
        trainer.add_callback(step_timer(device, times))
        saved = {}
        original = trainer.compute_loss

        def counted(*a, **k):  # activations saved by the first training forward (policy and reference)
            if saved:
                return original(*a, **k)
            out = {}
            saved["bytes"] = common.saved_activation_bytes(lambda: out.setdefault("loss", original(*a, **k)))
            return out["loss"]

        trainer.compute_loss = counted
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        modules = [trainer.model] + ([trainer.ref_model] if isinstance(trainer.ref_model, torch.nn.Module) else [])
        params = [p for m in modules for p in m.parameters()]
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        result = dict(
            shape=f"{args.model}: {base_params / 1e6:.1f}M params, "
                  f"batch={batch} pairs, seq={prompt}+{completion}",
            first_step_s=times[0], step_s=times[warmup:],
            trainable_params=sum(p.numel() for p in params if p.requires_grad),
            param_bytes=tensor_bytes(params),
            grad_bytes=tensor_bytes([p for p in params if p.requires_grad]),
            optimizer_bytes=tensor_bytes(state), saved_bytes=saved["bytes"],
        )
        result["accounted_bytes"] = sum(result[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes",
                                                              "saved_bytes"))
        if device.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        else:
            result["peak_rss_delta_bytes"] = peak_rss - rss_before
    return result


def run_provider(args, model: str, provider: str, checkpointing: str) -> dict:
    args = argparse.Namespace(**{**vars(args), "worker": provider, "model": model, "checkpointing": checkpointing})
    if args.smoke:  # checks the code path only: in this process, no isolation
        return worker(args)
    cmd = [sys.executable, __file__, "--worker", provider, "--model", model, "--device", args.device,
           "--mode", args.mode, "--checkpointing", args.checkpointing] + (["--dtype", args.dtype] if args.dtype else []) + \
          (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench_dpo worker {provider} on {model} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def record(rows: common.Rows, case: str, provider: str, r: dict) -> None:
    shape = r["shape"]
    rows.add(case, shape, provider, "first_step_s", "s", r["first_step_s"])
    rows.add(case, shape, provider, "step_s", "s", r["step_s"])
    rows.add(case, shape, provider, "steps_per_s", "1/s", [1 / s for s in r["step_s"]])
    rows.add(case, shape, provider, "trainable_params", "params", r["trainable_params"])
    for key in ("peak_bytes", "peak_rss_delta_bytes", "accounted_bytes", "param_bytes", "grad_bytes",
                "optimizer_bytes", "saved_bytes"):
        if key in r:
            rows.add(case, shape, provider, key, "B", r[key])
    mem = r.get("peak_bytes", r.get("peak_rss_delta_bytes"))
    print(f"  {case:26s} {shape:50s} {provider:9s} step {common.quantiles(r['step_s'])[0]:.3f} s  "
          f"peak {mem / 2**20:.0f} MiB  accounted {r['accounted_bytes'] / 2**20:.0f} MiB", flush=True)


def main(argv=None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    p.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=tuple(common.MODELS), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("smoke", "quick", "full"), help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                   help="activation (gradient) checkpointing: on is TRL's DPOConfig default; default: both")
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    args.mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    device, dtype = common.resolve(args)
    rows = common.Rows("bench_dpo", device, dtype)
    print(f"bench_dpo on {rows.common['device_name']}, {dtype}", flush=True)
    for model in SETTINGS[(device.type, args.mode)][0]:
        for ckpt in ("on", "off") if args.checkpointing == "both" else (args.checkpointing,):
            for provider in args.providers.split(","):
                record(rows, f"dpo_step/checkpointing_{ckpt}", provider, run_provider(args, model, provider, ckpt))
    stem = rows.write(args.out)
    print(f"wrote {stem}.json and .csv ({len(rows.rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
