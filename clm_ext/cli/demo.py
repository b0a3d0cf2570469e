"""`clm demo`: the end-to-end demo (see clm_ext.demo.pipeline)."""
import math
import os

from ._checks import add_force_argument, check_out, positive_float


def _floats(text: str) -> tuple:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"--alphas: expected comma-separated finite numbers, got {text!r}")
    return values


def _learning_rates(items: list) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in ("clm/linear", "clm/block", "full", "lora"):
            raise ValueError(f"--lr: {item!r} must be METHOD=LR with METHOD clm/linear, clm/block, full or lora")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--lr: {item!r} has no number after '='") from None
        if not (math.isfinite(out[key]) and out[key] > 0):
            raise ValueError(f"--lr: {item!r} must be a finite number > 0")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke-test size (under a minute on an idle CPU core; the test budget is 3 minutes)")
    parser.add_argument("--out", default="clm-demo-out", help="a new or empty output directory (default: ./clm-demo-out)")
    add_force_argument(parser)
    parser.add_argument("--model", help="a local checkpoint directory to align instead of the demo's tiny model "
                        "(needs --dataset)")
    parser.add_argument("--dataset", help="a preference set (.jsonl or datasets directory) for --model")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--alphas", help="comma-separated alphas to sweep")
    parser.add_argument("--variants", help="comma-separated CLM variants layer/mode "
                        "(default linear/embed,linear/logits,block/logits)")
    parser.add_argument("--baselines", help="comma-separated DPO baselines among full,lora (default both; "
                        "'none' for none)")
    parser.add_argument("--model-size", choices=["tiny", "small"], help="size of the demo's model (default tiny)")
    parser.add_argument("--dpo-steps", type=int, help="DPO optimizer steps per method")
    parser.add_argument("--beta", type=positive_float, help="DPO beta (all methods)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="learning rate of one method: clm/linear, clm/block, full or lora (repeatable)")
    parser.add_argument("--pair-prompts", type=int, help="prompts sampled for preference pairs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the demo's tiny model, whose "
                        "small matrices gain nothing from more and which then cannot stall on a busy machine; "
                        "torch's choice with --model)")


def run(args) -> int:
    import torch

    from clm_ext.demo.pipeline import DemoConfig, run as run_demo

    check_out("demo", args.out, args.force)
    threads = args.threads if args.threads is not None else (None if args.model else 1)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    overrides = {"device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.dpo_steps is not None:
        if args.dpo_steps < 1:
            raise ValueError(f"--dpo-steps must be >= 1, got {args.dpo_steps}")
        overrides["dpo_steps"] = args.dpo_steps
    if args.beta is not None:
        overrides["beta"] = args.beta
    if args.model_size is not None:
        overrides["model_size"] = args.model_size
    if args.pair_prompts is not None:
        overrides["pair_prompts"] = args.pair_prompts
    if args.lr:
        overrides["lr"] = {**DemoConfig().lr, **_learning_rates(args.lr)}
    if args.alphas:
        overrides["alphas"] = _floats(args.alphas)
    if args.variants:
        overrides["variants"] = tuple(args.variants.split(","))
    if args.baselines:
        overrides["baselines"] = () if args.baselines == "none" else tuple(args.baselines.split(","))
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    results = run_demo(cfg, args.out, model_dir=args.model, dataset_path=args.dataset)
    out = os.path.abspath(args.out)
    print(open(os.path.join(out, "results.md")).read())
    print(f"wrote {out}/results.json, results.md, reward_vs_alpha.png in {results['total_seconds']:.0f} s")
    return 0
