"""Shared helpers of the benchmark scripts: timing, memory accounting and the result rows.

Timings are per call, median and 20th/80th percentiles over repeats after a warm-up. On CUDA one repeat is
a pair of CUDA events around `number` calls (the stream is synchronised before reading them); on CPU it is
`time.perf_counter` around the same. `number` is chosen so one repeat lasts at least `min_repeat_s`, so
that microsecond calls are not dominated by the clock. Competing providers are timed in interleaved rounds.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("script", "case", "shape", "dtype", "provider", "metric", "unit", "median", "p20", "p80", "n",
           "device", "device_name", "torch", "date")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Llama configs of bench_generate and bench_dpo, built from scratch (random weights, nothing downloaded).
MODELS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=256),
    "cpu-7M": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688,
                   vocab_size=8192),
    "cpu-33M": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376,
                    vocab_size=8192),
    "gpu-0.3B": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, intermediate_size=2816,
                     vocab_size=32000),
    "gpu-1B": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, intermediate_size=5632,
                   vocab_size=32000),
}


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every script takes: --device, --dtype, --quick, --smoke, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--quick", action="store_true", help="the headline cases only")
    p.add_argument("--smoke", action="store_true", help="the tiniest settings: checks the script runs")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and CSV results")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    return p


def resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    return torch.device(args.device), dtype


def build_llama(name: str, device: torch.device, dtype: torch.dtype):
    """A LlamaForCausalLM of config MODELS[name], seeded random weights, untied embeddings."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(median, p20, p80) with linear interpolation between order statistics."""
    v = sorted(values)
    if not v:
        raise ValueError("quantiles: no values")

    def q(p: float) -> float:
        pos = p * (len(v) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def time_fns(fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 20, warmup: int = 2,
             min_repeat_s: float = 2e-3, budget_s: Optional[float] = None) -> dict[str, list[float]]:
    """Seconds per call of each function, one value per repeat.

    The functions are timed in interleaved rounds (one repeat of each per round), so that a change of load
    on the machine hits every provider alike and their ratios stay fair. `budget_s` caps the rounds (never
    below 5) so that slow shapes keep the whole run bounded.
    """
    number, round_s = {}, 0.0
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        if min_repeat_s <= 0 and budget_s is None:
            number[name] = 1  # long calls: nothing to calibrate
            continue
        once = float("inf")
        for _ in range(2):  # the faster of two: one descheduled call must not set `number`
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            once = min(once, max(time.perf_counter() - t0, 1e-7))
        number[name] = max(1, math.ceil(min_repeat_s / once))
        round_s += once * number[name]
    if budget_s is not None:
        repeats = max(5, min(repeats, int(budget_s / round_s)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, number[name], device))
    return samples


def _time_once(fn: Callable[[], object], number: int, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def peak_cuda_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of `fn` above what was allocated before it (CUDA only)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while `fn` runs: activations only.

    Parameters (nn.Parameter, or any tensor in `exclude`, e.g. a frozen table) are not counted; tensors
    saved more than once, or views of one storage, count once (by storage).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, torch.nn.Parameter) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class Rows:
    """Result rows of one script run; `write` saves <script>_<device>.json and .csv under the folder."""

    def __init__(self, script: str, device: torch.device, dtype: torch.dtype):
        self.script, self.device, self.rows = script, device, []
        self.common = dict(script=script, dtype=str(dtype).removeprefix("torch."), device=device.type,
                           device_name=device_name(device), torch=torch.__version__,
                           date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def add(self, case: str, shape: str, provider: str, metric: str, unit: str, values, **overrides) -> dict:
        """One row; `values` is a list of samples (reduced to median/p20/p80) or a single number."""
        samples = list(values) if isinstance(values, (list, tuple)) else [float(values)]
        med, p20, p80 = quantiles(samples)
        row = dict(self.common, case=case, shape=shape, provider=provider, metric=metric, unit=unit,
                   median=med, p20=p20, p80=p80, n=len(samples))
        row.update(overrides)
        self.rows.append(row)
        return row

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"{self.script}_{self.device.type}"
        stem.with_suffix(".json").write_text(json.dumps(self.rows, indent=1) + "\n")
        with stem.with_suffix(".csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        return stem


def load_rows(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())
