"""The demo end to end: corpus -> tokenizer -> tiny LM -> VADER-judged pairs -> DPO (CLM layer and
baselines) -> alpha sweep -> report. Each stage has its own progress bar and its wall time in the results.

With `model_dir` and `dataset` the first stages are skipped: a local checkpoint and preference set are used
as they are (nothing is downloaded), and prompts held out of the preference set are swept.
"""
import copy
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm.auto import tqdm

import clm_ext

from . import corpus, dpo, lm, pairs, report, sampling, sweep
from .judge import reward
from .tokenizer import train_tokenizer

ALPHAS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
VARIANTS = ("linear/embed", "linear/logits", "block/logits")
BASELINES = ("full", "lora")


@dataclass
class DemoConfig:
    seed: int = 0
    corpus_size: int = 20000
    vocab_size: int = 512
    model_size: str = "tiny"
    pretrain_steps: int = 1000
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    pair_prompts: int = 256
    pair_samples: int = 4          # completions per prompt; the best and worst make a pair
    min_margin: float = 0.3        # smallest VADER difference that makes a pair
    eval_prompts: int = 128
    eval_samples: int = 8          # completions per prompt and alpha
    max_new_tokens: int = 32
    dpo_steps: int = 100
    dpo_batch: int = 16
    beta: float = 1.0
    lr: dict = field(default_factory=lambda: {"clm/linear": 1.5e-4, "clm/block": 4e-5, "full": 5e-5, "lora": 1e-3})
    alphas: tuple = ALPHAS
    variants: tuple = VARIANTS     # "layer/mode": the CLM variants swept
    baselines: tuple = BASELINES   # DPO methods compared with the CLM layer
    device: str = "cpu"

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A smoke-test size: same stages, a fraction of the work (minutes on two CPU cores)."""
        small = dict(corpus_size=4000, pretrain_steps=300, pair_prompts=64, eval_prompts=16, eval_samples=2,
                     max_new_tokens=24, dpo_steps=20, dpo_batch=8)
        return cls(**{**small, **overrides})


def parse_variant(name: str) -> tuple:
    layer, _, mode = name.partition("/")
    if layer not in ("linear", "block") or mode not in ("embed", "logits"):
        raise ValueError(f"variants: {name!r} is not 'layer/mode' with layer linear|block and mode embed|logits")
    return layer, mode


class _Stages:
    """Progress bar and wall time per stage."""

    def __init__(self):
        self.timings = {}

    @contextmanager
    def __call__(self, name: str, total: int):
        begin = time.perf_counter()
        with tqdm(total=total, desc=name, unit="it", dynamic_ncols=True) as bar:
            yield bar
        self.timings[name] = time.perf_counter() - begin


def _build_world(cfg: DemoConfig, stage: _Stages):
    """Corpus, tokenizer, pretrained base model, and the prompts: those for pairs and the held-out ones."""
    with stage("corpus + tokenizer", 1) as bar:
        reviews = corpus.make_corpus(cfg.corpus_size, cfg.seed)
        texts = [r.text for r in reviews]
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
        bar.update(1)
    base = lm.make_model(tokenizer, cfg.model_size, cfg.seed).to(cfg.device)
    with stage("pretrain", cfg.pretrain_steps) as bar:
        losses = lm.pretrain(base, tokenizer, texts, cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr,
                             cfg.seed, progress=bar)
    prompts = corpus.make_prompts(cfg.pair_prompts + cfg.eval_prompts, cfg.seed + 1)
    info = {"pretrain_final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "base_params": sum(p.numel() for p in base.parameters())}
    return tokenizer, base, prompts[:cfg.pair_prompts], prompts[cfg.pair_prompts:], info


def _make_pairs(cfg, base, tokenizer, prompts, stage):
    with stage("preference pairs", len(prompts) * cfg.pair_samples) as bar:
        drawn = sampling.sample(base, tokenizer, prompts, cfg.pair_samples, cfg.seed, cfg.max_new_tokens,
                                progress=bar)
        rows = pairs.make_pairs(drawn.prompts, drawn.completions, cfg.min_margin)
    if not rows:
        raise RuntimeError("no preference pair passed min_margin: lower min_margin or raise pair_samples")
    return rows


def _load_local(cfg, model_dir: str, dataset_path: str):
    """A local checkpoint and preference set; held-out prompts are the last `eval_prompts` distinct ones."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clm_ext.preferences import load_preferences

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model: {model_dir} is not a directory holding a saved checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(cfg.device).eval()
    data = load_preferences(dataset_path)
    as_text = [_prompt_text(tokenizer, p) for p in data["prompt"]]
    distinct = list(dict.fromkeys(as_text))
    if len(distinct) <= cfg.eval_prompts:
        raise ValueError(f"--dataset: {len(distinct)} distinct prompts, need more than eval_prompts={cfg.eval_prompts}")
    held_out = set(distinct[-cfg.eval_prompts:])
    train_rows = [row for row, text in zip(data, as_text) if text not in held_out]
    return tokenizer, base, Dataset.from_list(train_rows), distinct[-cfg.eval_prompts:]


def _prompt_text(tokenizer, prompt) -> str:
    """A conversational prompt is rendered with the chat template, as TRL does for training."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _train(cfg, method, lr, model, tokenizer, dataset, stage, name):
    with stage(f"DPO {name}", cfg.dpo_steps) as bar, tempfile.TemporaryDirectory(prefix="clm-demo-") as tmp:
        args = dpo.dpo_config(tmp, cfg.dpo_steps, cfg.dpo_batch, lr, cfg.beta, cfg.seed, cfg.device, max_length=256)
        torch.manual_seed(cfg.seed)  # LoRA's adapter initialisation
        return dpo.train(method, model, tokenizer, dataset, args, progress=bar)


def _train_info(result: dpo.DPOResult) -> dict:
    return {f.name: getattr(result, f.name) for f in fields(result) if f.name != "model"}


def _evaluate(cfg, model, tokenizer, prompts, base, stage, name, alphas=None):
    rows = len(prompts) * cfg.eval_samples * (len(alphas) if alphas else 1)
    with stage(f"sample {name}", rows) as bar:
        drawn = sampling.sample(model, tokenizer, prompts, cfg.eval_samples, cfg.seed + 2, cfg.max_new_tokens,
                                alphas=list(alphas) if alphas else None, progress=bar)
    with stage(f"score {name}", 1) as bar:
        if alphas:
            scored = {"sweep": [{"alpha": a, **s} for a, s in zip(alphas, sweep.score_sweep(drawn, list(alphas), base, tokenizer))]}
        else:
            scored = sweep.score(drawn.completions, drawn.prompts, base, tokenizer)
        bar.update(1)
    scored["tokens_per_s"] = drawn.new_tokens / drawn.seconds
    scored["examples"] = _examples(drawn, alphas)
    return scored


def _examples(drawn, alphas) -> list:
    """One sample's completion at every alpha (the same random numbers): the first held-out sample that is
    negative at alpha 0 (or at the first alpha), so the table shows what the dial changes; else the first."""
    if not alphas:
        return [{"prompt": drawn.prompts[0], "completion": drawn.completions[0]}]
    per_alpha = len(drawn.completions) // len(alphas)
    reference = list(alphas).index(0.0) if 0.0 in alphas else 0
    at_reference = drawn.completions[reference * per_alpha:(reference + 1) * per_alpha]
    pick = next((i for i, text in enumerate(at_reference) if reward(text) < 0), 0)
    return [{"alpha": a, "prompt": drawn.prompts[k * per_alpha + pick],
             "completion": drawn.completions[k * per_alpha + pick]} for k, a in enumerate(alphas)]


def run(cfg: DemoConfig, out_dir: str, model_dir: str = None, dataset_path: str = None) -> dict:
    """Run every stage and write results.json, results.md and the plot to `out_dir`; returns the results."""
    if (model_dir is None) != (dataset_path is None):
        raise ValueError("--model and --dataset go together: give both (a real checkpoint) or neither (the demo)")
    variants = [parse_variant(v) for v in cfg.variants]
    unknown = [b for b in cfg.baselines if b not in ("full", "lora")]
    if unknown:
        raise ValueError(f"baselines: unknown method(s) {unknown}; choose from full, lora")
    import datasets

    datasets.disable_progress_bars()  # one bar per stage: TRL's dataset preparation would add its own
    os.makedirs(out_dir, exist_ok=True)
    stage = _Stages()
    results = {"config": {**asdict(cfg), "model": model_dir, "dataset": dataset_path}}
    if model_dir is None:
        tokenizer, base, pair_prompts, eval_prompts, info = _build_world(cfg, stage)
        # Saved so that `--model DIR/base-model --dataset DIR/pairs.jsonl` and `clm generate` can reuse them.
        base.save_pretrained(os.path.join(out_dir, "base-model"))
        tokenizer.save_pretrained(os.path.join(out_dir, "base-model"))
        rows = _make_pairs(cfg, base, tokenizer, pair_prompts, stage)
        pairs.write_jsonl(rows, os.path.join(out_dir, "pairs.jsonl"))
        dataset = datasets.Dataset.from_list(rows)
        results.update(info)
    else:
        tokenizer, base, dataset, eval_prompts = _load_local(cfg, model_dir, dataset_path)
    results["pairs"] = len(dataset)
    results["alphas"] = list(cfg.alphas)

    results["base"] = _evaluate(cfg, base, tokenizer, eval_prompts, base, stage, "base")
    results["variants"] = _run_variants(cfg, variants, base, tokenizer, dataset, eval_prompts, out_dir, stage)
    results["baselines"] = {}
    for method in cfg.baselines:
        trained = _train(cfg, method, cfg.lr[method], copy.deepcopy(base), tokenizer, dataset, stage, method)
        results["baselines"][method] = {"train": _train_info(trained),
                                        **_evaluate(cfg, trained.model, tokenizer, eval_prompts, base, stage, method)}
    primary = results["variants"][cfg.variants[0]]["sweep"]
    results["reward"] = [row["reward"] for row in primary]
    results["reward_stderr"] = [row["reward_stderr"] for row in primary]
    results["checks"] = report.checks(results)
    results["timings"] = stage.timings
    results["total_seconds"] = sum(stage.timings.values())
    report.write_json(results, out_dir)
    report.write_markdown(results, out_dir)
    report.plot(results, out_dir)
    return results


def _run_variants(cfg, variants, base, tokenizer, dataset, eval_prompts, out_dir, stage) -> dict:
    """Train one CLM layer per layer kind, then sweep alpha for each of its variants (merge modes)."""
    results = {}
    for layer in dict.fromkeys(layer for layer, _ in variants):
        model = clm_ext.add_alignment_control(copy.deepcopy(base), mode="embed", layer=layer)
        trained = _train(cfg, "clm", cfg.lr[f"clm/{layer}"], model, tokenizer, dataset, stage, f"CLM {layer}")
        layer_dir = os.path.join(out_dir, f"alignment-{layer}")
        clm_ext.save_alignment(trained.model, layer_dir)
        for v_layer, mode in variants:
            if v_layer != layer:
                continue
            name = f"{layer}/{mode}"
            served = trained.model if mode == "embed" else clm_ext.load_alignment(copy.deepcopy(base), layer_dir, mode=mode)
            # CLMDPOTrainer trains in mode "embed"; at alpha 0 and 1 both modes are the same network, so
            # the logits variant serves the same trained layer (its training cost is the embed run's).
            results[name] = {"train": _train_info(trained), "layer_dir": layer_dir,
                             **_evaluate(cfg, served, tokenizer, eval_prompts, base, stage, f"CLM {name}",
                                         alphas=cfg.alphas)}
    return {name: results[name] for name in cfg.variants}
