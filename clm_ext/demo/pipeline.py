"""The demo end to end. Each stage has its own progress bar (with its ETA) and its wall time in the results.

- Real model (default, `clm demo [--model NAME|DIR|FILE.gguf]`): neutral review/description requests in the
  model's chat template -> on-policy pairs from the base model's own samples judged by VADER -> DPO of the
  CLM layer (and, on request, full fine-tuning / LoRA baselines) -> an alpha sweep on held-out requests,
  judged by VADER and by TextBlob, with the base model's perplexity and repetition measures -> report.
  `--dataset` trains on a given preference set instead of the on-policy pairs.
- Toy (`clm demo --toy`): corpus -> tokenizer -> tiny LM pretrained here -> the same pairs, DPO and sweep.
"""
import copy
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm.auto import tqdm

from ..generation import chat_prompt
from ..model import add_alignment_control, load_alignment, save_alignment
from . import corpus, dpo, lm, pairs, report, requests, sampling, sweep
from .judge import reward
from .tokenizer import train_tokenizer

ALPHAS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
VARIANTS = ("linear/embed", "linear/logits", "block/logits")
BASELINES = ("full", "lora")
METHODS = ("clm/linear", "clm/block", "full", "lora")  # the keys of DemoConfig.lr and .optim
REAL_ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


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
    optim: dict = field(default_factory=lambda: dict.fromkeys(METHODS, "adamw_torch"))  # transformers' names
    loss_type: tuple = ("sigmoid",)  # TRL's DPO loss types (all methods); "sft" adds the chosen answers' NLL (RPO)
    loss_weights: tuple = None       # one weight per loss type (TRL's default: all 1)
    identity_decay: float = 0.0      # the CLM layer's decay towards its identity start (dpo.DecayToStart)
    alphas: tuple = ALPHAS
    variants: tuple = VARIANTS     # "layer/mode": the CLM variants swept
    baselines: tuple = BASELINES   # DPO methods compared with the CLM layer
    device: str = "cpu"
    temperature: float = 1.0       # sampling temperature (pairs and sweep)
    sample_batch: int = 512        # rows per generate call
    max_length: int = 256          # DPO: prompt + completion tokens

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A smoke-test size: same stages, a fraction of the work (minutes on two CPU cores)."""
        small = dict(corpus_size=4000, pretrain_steps=300, pair_prompts=64, eval_prompts=16, eval_samples=2,
                     max_new_tokens=24, dpo_steps=20, dpo_batch=8)
        return cls(**{**small, **overrides})

    @classmethod
    def real(cls, quick: bool = False, **overrides) -> "DemoConfig":
        """The real-model demo's sizes, planned to finish in 20 minutes on two CPU cores (docs/demo/README.md: Time)."""
        # The block layer, trained one epoch over 373 pairs, is what reached full DPO's held-out gain at alpha 1
        # (docs/demo/experiments): the linear layer and 103 pairs seen 2.5 times stopped at 71-75%.
        sizes = dict(pair_prompts=480, pair_samples=4, min_margin=0.4, eval_prompts=24, eval_samples=4,
                     max_new_tokens=40, dpo_steps=47, dpo_batch=8, beta=0.1,
                     lr={"clm/linear": 5e-4, "clm/block": 1e-4, "full": 1e-5, "lora": 5e-4},
                     alphas=REAL_ALPHAS, variants=("block/logits",), baselines=(), temperature=0.8,
                     sample_batch=128, max_length=160)
        if quick:
            sizes.update(pair_prompts=16, eval_prompts=4, eval_samples=2, max_new_tokens=16, dpo_steps=2,
                         dpo_batch=4)
        return cls(**{**sizes, **overrides})


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
                                batch_size=cfg.sample_batch, progress=bar, temperature=cfg.temperature)
        rows = pairs.make_pairs(drawn.prompts, drawn.completions, cfg.min_margin)
    if not rows:
        raise RuntimeError("no preference pair passed min_margin: lower --min-margin or raise --pair-samples")
    return rows


def _load_real(cfg, model: str):
    """The base model (resolved to a local checkpoint: a name, a directory or a .gguf file) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..sources import resolve_model

    model_dir = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    return tokenizer, base.to(cfg.device).eval()


def _real_prompts(cfg, tokenizer) -> tuple:
    """Training and evaluation requests (disjoint subjects), rendered with the chat template when the tokenizer
    has one; returns (training prompts, evaluation prompts, rendered prompt -> request text)."""
    train = requests.make_requests(cfg.pair_prompts, "train", cfg.seed)
    held_out = requests.make_requests(cfg.eval_prompts, "eval", cfg.seed)
    request_of = {chat_prompt(tokenizer, r): r for r in train + held_out}
    by_request = {r: p for p, r in request_of.items()}
    return [by_request[r] for r in train], [by_request[r] for r in held_out], request_of


def _conversational(rows: list, request_of: dict) -> list:
    """Pairs in TRL's conversational form (TRL then applies the same chat template to them)."""
    return [{"prompt": [{"role": "user", "content": request_of[row["prompt"]]}],
             "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]} for row in rows]


def _train(cfg, key, model, tokenizer, dataset, stage, name, **train_kwargs):
    """DPO of one method; `key` names its learning rate and optimizer in cfg (clm/linear, clm/block, full, lora);
    `train_kwargs` go to `dpo.train`."""
    with stage(f"DPO {name}", cfg.dpo_steps) as bar, tempfile.TemporaryDirectory(prefix="clm-demo-") as tmp:
        args = dpo.dpo_config(tmp, cfg.dpo_steps, cfg.dpo_batch, cfg.lr[key], cfg.beta, cfg.seed, cfg.device,
                              max_length=cfg.max_length, optim=cfg.optim[key], loss_type=cfg.loss_type,
                              loss_weights=cfg.loss_weights)
        if key.startswith("clm/"):
            train_kwargs = {"identity_decay": cfg.identity_decay, **train_kwargs}
        torch.manual_seed(cfg.seed)  # LoRA's adapter initialisation
        return dpo.train(key.partition("/")[0], model, tokenizer, dataset, args, progress=bar, **train_kwargs)


def _train_info(result: dpo.DPOResult) -> dict:
    return {f.name: getattr(result, f.name) for f in fields(result) if f.name != "model"}


def _evaluate(cfg, model, tokenizer, prompts, base, stage, name, alphas=None, request_of=None):
    rows = len(prompts) * cfg.eval_samples * (len(alphas) if alphas else 1)
    with stage(f"sample {name}", rows) as bar:
        drawn = sampling.sample(model, tokenizer, prompts, cfg.eval_samples, cfg.seed + 2, cfg.max_new_tokens,
                                alphas=list(alphas) if alphas else None, batch_size=cfg.sample_batch,
                                progress=bar, temperature=cfg.temperature)
    with stage(f"score {name}", 1) as bar:
        if alphas:
            scored = {"sweep": [{"alpha": a, **s} for a, s in zip(alphas, sweep.score_sweep(drawn, list(alphas), base, tokenizer))]}
        else:
            scored = sweep.score(drawn.completions, drawn.prompts, base, tokenizer)
        bar.update(1)
    scored["tokens_per_s"] = drawn.new_tokens / drawn.seconds
    scored["examples"] = [{**ex, "prompt": (request_of or {}).get(ex["prompt"], ex["prompt"])}
                          for ex in _examples(drawn, alphas)]
    scored["completions"] = drawn.completions
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


@dataclass
class World:
    model: str             # the model's name or path, "toy" for the model built here
    tokenizer: object
    base: object
    pair_prompts: list
    eval_prompts: list
    request_of: dict       # rendered prompt -> request text (None for the toy)
    info: dict             # the toy's pretraining facts (empty for a real model)


def prepare(cfg: DemoConfig, model: str, toy: bool, out_dir: str, stage: _Stages) -> World:
    """The base model, its tokenizer and the prompts, with one progress bar per stage; the toy's model and
    tokenizer are saved to out_dir/base-model (for `clm serve --model`, `clm generate`, `--dataset` reuse)."""
    import datasets

    import transformers

    from ..sources import DEFAULT_MODEL

    datasets.disable_progress_bars()  # one bar per stage: TRL's dataset preparation would add its own
    transformers.utils.logging.disable_progress_bar()  # and transformers' weight loading
    os.makedirs(out_dir, exist_ok=True)
    if toy:
        tokenizer, base, pair_prompts, eval_prompts, info = _build_world(cfg, stage)
        base.save_pretrained(os.path.join(out_dir, "base-model"))
        tokenizer.save_pretrained(os.path.join(out_dir, "base-model"))
        return World("toy", tokenizer, base, pair_prompts, eval_prompts, None, info)
    model = model or DEFAULT_MODEL
    with stage("load model", 1) as bar:
        tokenizer, base = _load_real(cfg, model)
        bar.update(1)
    pair_prompts, eval_prompts, request_of = _real_prompts(cfg, tokenizer)
    return World(model, tokenizer, base, pair_prompts, eval_prompts, request_of, {})


def run(cfg: DemoConfig, out_dir: str, model: str = None, dataset_path: str = None, toy: bool = False) -> dict:
    """Run every stage and write results.json, results.md and the plot to `out_dir`; returns the results.

    toy: the tiny model built here. Otherwise `model` (a packaged name, a checkpoint directory or a .gguf file;
    default smollm2-135m-instruct) is aligned on on-policy pairs, or on `dataset_path` when given."""
    if toy and (model is not None or dataset_path is not None):
        raise ValueError("--toy builds its own model and pairs: drop --model / --dataset, or drop --toy")
    variants = [parse_variant(v) for v in cfg.variants]
    unknown = [b for b in cfg.baselines if b not in ("full", "lora")]
    if unknown:
        raise ValueError(f"--baselines: unknown method(s) {unknown}; choose from full, lora (or none)")
    import datasets

    stage = _Stages()
    world = prepare(cfg, model, toy, out_dir, stage)
    tokenizer, base, eval_prompts, request_of = world.tokenizer, world.base, world.eval_prompts, world.request_of
    results = {"model": world.model, "config": {**asdict(cfg), "model": None if toy else world.model,
                                                "dataset": dataset_path}, **world.info}
    if dataset_path is None:
        rows = _make_pairs(cfg, base, tokenizer, world.pair_prompts, stage)
        if getattr(tokenizer, "chat_template", None):
            rows = _conversational(rows, request_of)
        pairs.write_jsonl(rows, os.path.join(out_dir, "pairs.jsonl"))
        dataset = datasets.Dataset.from_list(rows)
    else:
        from ..preferences import load_preferences

        dataset = load_preferences(dataset_path)
    results["pairs"] = len(dataset)
    results["alphas"] = list(cfg.alphas)

    results["base"] = _evaluate(cfg, base, tokenizer, eval_prompts, base, stage, "base", request_of=request_of)
    results["variants"] = _run_variants(cfg, variants, base, tokenizer, dataset, eval_prompts, out_dir, stage,
                                        request_of)
    results["baselines"] = {}
    _write(results, cfg, stage, out_dir)  # the layer's results stand alone while the baselines train
    for method in cfg.baselines:
        trained = _train(cfg, method, copy.deepcopy(base), tokenizer, dataset, stage, method)
        if not toy:  # the baseline's weights, for `clm generate --model OUT/full-dpo`
            trained.model.save_pretrained(os.path.join(out_dir, f"{method}-dpo"))
            tokenizer.save_pretrained(os.path.join(out_dir, f"{method}-dpo"))
        results["baselines"][method] = {"train": _train_info(trained),
                                        **_evaluate(cfg, trained.model, tokenizer, eval_prompts, base, stage, method,
                                                    request_of=request_of)}
        del trained
        _write(results, cfg, stage, out_dir)
    return results


def _write(results: dict, cfg: DemoConfig, stage, out_dir: str) -> None:
    """Fill in the summary keys and write results.json, results.md and the plot (samples themselves are not kept)."""
    primary = results["variants"][cfg.variants[0]]
    results["reward"] = [row["reward"] for row in primary["sweep"]]
    results["reward_stderr"] = [row["reward_stderr"] for row in primary["sweep"]]
    results["heldout_reward"] = [row["heldout_reward"] for row in primary["sweep"]]
    results["heldout_reward_stderr"] = [row["heldout_reward_stderr"] for row in primary["sweep"]]
    if "alpha0_identical_to_base" not in results:
        results["alpha0_identical_to_base"] = _alpha0_identical(results, cfg)
    for row in [results["base"], *results["variants"].values(), *results["baselines"].values()]:
        row.pop("completions", None)
    results["checks"] = report.checks(results)
    results["timings"] = dict(stage.timings)
    results["total_seconds"] = sum(stage.timings.values())
    report.write_json(results, out_dir)
    report.write_markdown(results, out_dir)
    report.plot(results, out_dir)


def _alpha0_identical(results: dict, cfg: DemoConfig):
    """Share of the primary variant's alpha-0 samples that are character for character the base model's (same
    random numbers): the layer at alpha 0 must be the base model."""
    if 0.0 not in cfg.alphas:
        return None
    base = results["base"]["completions"]
    sweep = results["variants"][cfg.variants[0]]["completions"]
    k = list(cfg.alphas).index(0.0)
    at_zero = sweep[k * len(base):(k + 1) * len(base)]
    return sum(a == b for a, b in zip(base, at_zero)) / len(base)


def _run_variants(cfg, variants, base, tokenizer, dataset, eval_prompts, out_dir, stage, request_of) -> dict:
    """Train one CLM layer per layer kind, then sweep alpha for each of its variants (merge modes)."""
    results = {}
    for layer in dict.fromkeys(layer for layer, _ in variants):
        model = add_alignment_control(copy.deepcopy(base), mode="embed", layer=layer)
        trained = _train(cfg, f"clm/{layer}", model, tokenizer, dataset, stage, f"CLM {layer}")
        layer_dir = os.path.join(out_dir, f"alignment-{layer}")
        save_alignment(trained.model, layer_dir)
        for v_layer, mode in variants:
            if v_layer != layer:
                continue
            name = f"{layer}/{mode}"
            served = trained.model if mode == "embed" else load_alignment(copy.deepcopy(base), layer_dir, mode=mode)
            # CLMDPOTrainer trains in mode "embed"; at alpha 0 and 1 both modes are the same network, so
            # the logits variant serves the same trained layer (its training cost is the embed run's).
            results[name] = {"train": _train_info(trained), "layer_dir": layer_dir,
                             **_evaluate(cfg, served, tokenizer, eval_prompts, base, stage, f"CLM {name}",
                                         alphas=cfg.alphas, request_of=request_of)}
    return {name: results[name] for name in cfg.variants}
