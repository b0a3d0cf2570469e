"""`clm demo`: the end-to-end demo (see clm_ext.demo.pipeline)."""
import argparse
import math
import os

from . import UsageError
from ._checks import add_force_argument, optimizer_name, path_text, positive_float


def _floats(flag: str, text: str) -> tuple:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag}: expected comma-separated finite numbers, got {text!r}")
    return values


def _loss_overrides(args) -> dict:
    """--loss-type, --loss-weights and --identity-decay, checked before anything loads (TRL would only refuse
    an unknown loss type at the first training step)."""
    out = {}
    if args.loss_type is not None:
        from trl import DPOConfig

        known = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
        out["loss_type"] = _names("--loss-type", args.loss_type)
        unknown = [t for t in out["loss_type"] if f"'{t}'" not in known]
        if unknown:
            raise UsageError(f"--loss-type: unknown {', '.join(unknown)}; TRL's DPO losses: {known.split(': ', 1)[1].split('. ')[0]}")
    if args.loss_weights is not None:
        out["loss_weights"] = _floats("--loss-weights", args.loss_weights)
        types = out.get("loss_type", ("sigmoid",))
        if len(out["loss_weights"]) != len(types):
            raise UsageError(f"--loss-weights: expected one weight per --loss-type ({len(types)}), "
                             f"got {len(out['loss_weights'])}")
    if args.identity_decay is not None:
        if not (math.isfinite(args.identity_decay) and args.identity_decay >= 0):
            raise UsageError(f"--identity-decay must be a finite number >= 0, got {args.identity_decay}")
        out["identity_decay"] = args.identity_decay
    return out


def _names(flag: str, text: str) -> tuple:
    """A comma-separated list of names; an empty one (or an empty item) is refused, not read as the default."""
    names = tuple(text.split(","))
    if not all(n.strip() for n in names):
        raise UsageError(f"{flag}: expected comma-separated names, got {text!r}")
    return names


def _per_method(flag: str, items: list, what: str, parse) -> dict:
    """`METHOD=VALUE` items of a repeatable flag -> {method: parse(item, value)}."""
    from clm_ext.demo.pipeline import METHODS

    names = f"{', '.join(METHODS[:-1])} or {METHODS[-1]}"
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in METHODS:
            raise UsageError(f"{flag}: {item!r} must be METHOD={what} with METHOD {names}")
        out[key] = parse(item, value)
    return out


def _optimizer(item: str, value: str) -> str:
    try:
        return optimizer_name(value)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--optim: {e}") from None


def _learning_rate(item: str, value: str) -> float:
    try:
        lr = float(value)
    except ValueError:
        raise UsageError(f"--lr: {item!r} has no number after '='") from None
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr: {item!r} must be a finite number > 0")
    return lr


def _optimizers(items: list) -> dict:
    return _per_method("--optim", items, "NAME", _optimizer)


def _learning_rates(items: list) -> dict:
    return _per_method("--lr", items, "LR", _learning_rate)


def add_arguments(parser) -> None:
    parser.add_argument("--toy", action="store_true", help="the tiny model built here instead of a real one (a one-minute "
                        "look with --quick; what the tests run)")
    parser.add_argument("--quick", action="store_true", help="smoke-test size: same stages, a fraction of the work")
    parser.add_argument("--out", type=path_text, default="clm-demo-out", help="a new or empty output directory (default: ./clm-demo-out)")
    add_force_argument(parser)
    parser.add_argument("--model", type=path_text, help="the model to align: smollm2-135m-instruct (default), gemma3-270m, a local "
                        "checkpoint directory or a .gguf file")
    parser.add_argument("--dataset", type=path_text, help="train on this preference set (.jsonl or datasets directory) instead of "
                        "the on-policy VADER pairs")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--alphas", help="comma-separated alphas to sweep, e.g. --alphas -1,0,1,2")
    parser.add_argument("--dials", help="two named dials trained alone and composed in one model, then a grid of alpha "
                        "vectors (--alphas, default -1,0,0.5,1,2 per dial): positive,concise (linear layers, learning "
                        "rates 5e-4 and 1e-4; --lr clm/linear=X sets both)")
    parser.add_argument("--variants", help="comma-separated CLM variants layer/mode among linear/embed, linear/logits, "
                        "block/embed, block/logits (default: block/logits; toy: linear/embed,linear/logits,block/logits)")
    parser.add_argument("--baselines", help="comma-separated DPO baselines among full,lora, or 'none' (default: none; "
                        "toy: full,lora)")
    parser.add_argument("--model-size", choices=["tiny", "small"], help="size of the toy model (default tiny)")
    parser.add_argument("--dpo-steps", type=int, help="DPO optimizer steps per method")
    parser.add_argument("--dpo-batch", type=int, help="preference pairs per DPO step")
    parser.add_argument("--beta", type=positive_float, help="DPO beta (all methods)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="learning rate of one method: clm/linear, clm/block, full or lora (repeatable)")
    parser.add_argument("--optim", action="append", default=[], metavar="METHOD=NAME",
                        help="optimizer of one method, a transformers name such as sgd or adamw_torch (repeatable)")
    parser.add_argument("--loss-type", help="comma-separated TRL DPO loss types, e.g. ipo, or sigmoid,sft for DPO plus "
                        "the chosen answers' negative log-likelihood (RPO) (default sigmoid; all methods)")
    parser.add_argument("--loss-weights", help="comma-separated weights, one per --loss-type (default: all 1)")
    parser.add_argument("--identity-decay", type=float, help="decoupled decay of the CLM layer towards its identity "
                        "start after every step, w -= lr * RATE * (w - w0) (default 0: off)")
    parser.add_argument("--pair-prompts", type=int, help="prompts sampled for preference pairs")
    parser.add_argument("--pair-samples", type=int, help="samples per pair prompt; the most and least positive pair up")
    parser.add_argument("--min-margin", type=float, help="smallest VADER difference that makes a pair")
    parser.add_argument("--eval-prompts", type=int, help="held-out prompts of the sweep")
    parser.add_argument("--eval-samples", type=int, help="samples per held-out prompt and alpha")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per sample")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the toy model, whose small "
                        "matrices gain nothing from more and which then cannot stall on a busy machine; torch's "
                        "choice for a real model)")


POSITIVE_INTS = ("dpo_steps", "dpo_batch", "pair_prompts", "pair_samples", "eval_prompts", "eval_samples",
                 "max_new_tokens")


def _overrides(args) -> dict:
    """DemoConfig fields given on the command line, checked."""
    out = {}
    for name in POSITIVE_INTS:
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            out[name] = value
    for name in ("beta", "temperature"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise UsageError(f"--{name} must be > 0, got {value}")
            out[name] = value
    if args.min_margin is not None:
        if args.min_margin < 0:
            raise UsageError(f"--min-margin must be >= 0, got {args.min_margin}")
        out["min_margin"] = args.min_margin
    if args.seed is not None:
        out["seed"] = args.seed
    if args.model_size is not None:
        if not args.toy:
            raise UsageError("--model-size picks the toy model's size: use it with --toy")
        out["model_size"] = args.model_size
    out.update(_loss_overrides(args))
    if args.alphas is not None:
        out["alphas"] = _floats("--alphas", args.alphas)
    if args.variants is not None:
        if args.dials is not None:
            raise UsageError("--variants picks the one-dial demo's layers; --dials trains linear dials: drop one")
        out["variants"] = _names("--variants", args.variants)
    if args.baselines is not None:
        if args.dials is not None:
            raise UsageError("--baselines belongs to the one-dial demo; --dials trains no baseline: drop one")
        out["baselines"] = () if args.baselines == "none" else _names("--baselines", args.baselines)
    return out


def run(args) -> int:
    import torch

    from clm_ext.demo.pipeline import DemoConfig, run as run_demo

    from clm_ext.output_dirs import check_output_dir

    dials = _dial_names(args)
    check_output_dir(args.out, {"--model": args.model, "--dataset": args.dataset}, args.force)
    threads = args.threads if args.threads is not None else (1 if args.toy else None)
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    overrides = {"device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"), **_overrides(args)}
    if args.toy:
        defaults = DemoConfig.quick() if args.quick else DemoConfig()
    else:
        defaults = DemoConfig.real(quick=args.quick)
    if args.lr:
        overrides["lr"] = {**defaults.lr, **_learning_rates(args.lr)}
    if args.optim:
        overrides["optim"] = {**defaults.optim, **_optimizers(args.optim)}
    if dials and args.quick and not args.toy and args.max_new_tokens is None:
        overrides["max_new_tokens"] = 40  # a concise pair needs a finished answer: 16 tokens end almost none
    if args.toy:
        cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    else:
        cfg = DemoConfig.real(quick=args.quick, **overrides)
    out = os.path.abspath(args.out)
    if dials:
        results, plot, layers = _run_dials(cfg, dials, args, out)
    else:
        from clm_ext.demo.report import PLOT_NAME as plot

        results = run_demo(cfg, args.out, model=args.model, dataset_path=args.dataset, toy=args.toy)
        layers = [os.path.abspath(d) for d in dict.fromkeys(row["layer_dir"] for row in results["variants"].values())]
    print(open(os.path.join(out, "results.md")).read())
    print(f"wrote {out}/results.json, results.md, {plot} in {results['total_seconds']:.0f} s")
    model = os.path.join(out, "base-model") if args.toy else results["model"]
    print(serve_commands(model, layers, out))
    return 0


def _dial_names(args):
    """--dials checked before anything loads: two known dials, no --dataset (each dial makes its own pairs)."""
    if args.dials is None:
        return None
    from clm_ext.demo.named_dials import check_dial_names

    if args.dataset is not None:
        raise UsageError("--dataset: each dial makes its own on-policy pairs; drop --dataset with --dials")
    if args.alphas is not None and not {0.0, 1.0} <= set(_floats("--alphas", args.alphas)):
        raise UsageError(f"--alphas: the dial grid must hold 0 and 1 (its checks compare them), got {args.alphas!r}")
    try:
        return check_dial_names(_names("--dials", args.dials))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _run_dials(cfg, dials, args, out) -> tuple:
    """The two-dial demo: its results, its plot's name and the directory of the composed dials."""
    from clm_ext.demo import named_dials

    grid = cfg.alphas if args.alphas is not None else named_dials.GRID
    # each dial has its own default rate (named_dials.DIAL_LR); --lr clm/linear=X sets every dial's
    given = any(item.partition("=")[0] == "clm/linear" for item in args.lr)
    lr = dict.fromkeys(dials, cfg.lr["clm/linear"]) if given else None
    results = named_dials.run(cfg, dials, out, model=args.model, toy=args.toy, grid=grid, lr=lr)
    return results, named_dials.PLOT_NAME, [os.path.join(out, "dials")]


def serve_commands(model: str, layer_dirs: list, out: str) -> str:
    """What to run next to serve each layer the demo wrote: `clm serve`, and the vLLM route (export, then serve)."""
    import shlex

    from clm_ext.sources import resolve_model

    q = shlex.quote
    lines = []
    for layer in layer_dirs:
        name = os.path.basename(layer)
        served = os.path.join(out, f"vllm-{name}")
        lines += [f"serve {name} with a per-request alpha (OpenAI API, http://127.0.0.1:8000/v1):",
                  f"  clm serve --model {q(model)} --alignment {q(layer)}",
                  "  or on vLLM (./run setup-vllm first):",
                  f"  clm export-vllm --model {q(resolve_model(model))} --alignment {q(layer)} --out {q(served)}",
                  f"  VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model "
                  f"{q(served)} --middleware clm_ext.vllm.middleware.AlphaMiddleware"]
    return "\n".join(lines)
