"""`clm train`: DPO on a preference file, training the alignment layer (or a full / LoRA baseline).

Output: OUT holds the result, the alignment layer (save_alignment, so `load_alignment(model, OUT)` takes it) for
--method clm, the model or LoRA adapter plus the tokenizer for full / lora, and OUT/metrics.json (the logged
history). OUT is checked before training starts: it must be new or empty, or hold a previous result that --force
(or --resume) may replace. Trainer checkpoints, which --resume restarts from, go to --checkpoint-dir (default
OUT-checkpoints, a sibling). Under accelerate: `accelerate launch -m clm_ext.cli.train ARGS`.
"""
import argparse
import json
import os
import sys

from . import UsageError
from ._checks import add_force_argument, check_model_dir, finite_float, optimizer_name, path_text, positive_float

DEFAULT_LR = {"full": 5e-6, "lora": 5e-5}  # --method clm: the demo's rate for the layer (default_lr)
SUMMARY_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def add_arguments(parser):
    parser.add_argument("--model", type=path_text, required=True, help="smollm2-135m-instruct, gemma3-270m, a model directory "
                        "(save_pretrained) with its tokenizer, or a .gguf file")
    parser.add_argument("--dataset", type=path_text, required=True, help="preference JSONL file or datasets save_to_disk directory")
    parser.add_argument("--eval-dataset", type=path_text, help="optional held-out preferences, same formats")
    parser.add_argument("--out", type=path_text, required=True, help="output directory: new, empty, or a previous result (with --force)")
    add_force_argument(parser)
    parser.add_argument("--checkpoint-dir", type=path_text, help="trainer checkpoints (default: OUT-checkpoints)")
    parser.add_argument("--method", choices=("clm", "full", "lora"), default="clm",
                        help="clm: the alignment layer only (default); full / lora: TRL baselines")
    parser.add_argument("--beta", type=positive_float, default=0.1, help="DPO beta (default 0.1)")
    parser.add_argument("--loss-type", nargs="+", default=["sigmoid"], help="TRL loss type(s), e.g. sigmoid ipo")
    parser.add_argument("--loss-weights", nargs="+", type=finite_float, help="one weight per --loss-type")
    parser.add_argument("--max-length", type=int, default=512, help="truncate prompt+completion (default 512)")
    parser.add_argument("--epochs", type=positive_float, default=3.0,
                        help="training epochs (default 3: one pass over a few hundred pairs is too few steps for the layer)")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    parser.add_argument("--lr", type=positive_float, help=f"learning rate (default: for --method clm the real demo's "
                        f"rate for the --layer, DemoConfig.real().lr; otherwise per method, {DEFAULT_LR})")
    parser.add_argument("--optim", type=optimizer_name,
                        help="optimizer, a transformers name such as sgd or adamw_torch (default: TRL's, AdamW)")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch of preference pairs")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    parser.add_argument("--eval-steps", type=int,
                        help="evaluate every N steps (needs --eval-dataset; default: after each epoch)")
    parser.add_argument("--resume", type=path_text, nargs="?", const="latest", metavar="CHECKPOINT",
                        help="resume from the latest checkpoint in --checkpoint-dir, or from CHECKPOINT")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--precompute-ref-log-probs", action="store_true",
                        help="score the reference once before training instead of every step")
    parser.add_argument("--layer", choices=("linear", "block"),
                        help="alignment layer kind for --method clm (default block: the layer the demo measured best "
                        "and the one clm serve serves by default; linear with --dial; see add_alignment_control)")
    parser.add_argument("--dial", metavar="NAME",
                        help="train one named dial (method clm, layer linear); OUT holds that dial alone, to load "
                        "into a model with other dials: load_alignment(model, OUT, dial=NAME)")
    parser.add_argument("--with-dial", action="append", type=path_text, default=[], metavar="DIR",
                        help="with --dial: a dial saved before (clm train --dial) loaded beside the one trained, "
                        "frozen; repeatable")
    parser.add_argument("--fixed-alpha", action="append", type=fixed_alpha, default=[], metavar="NAME=VALUE",
                        help="with --dial: the alpha a --with-dial dial holds in both the policy and the reference "
                        "while --dial trains (default 0); repeatable")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (method lora)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat-template", action="store_true",
                        help="train on plain-text rows as they are (default: when the tokenizer has a chat template, "
                        "a plain prompt becomes a user turn and each completion the assistant's reply)")


def default_lr(method: str, layer: str) -> float:
    """The learning rate of a run that sets none: for the CLM layer, the one the real demo trains that layer with."""
    if method != "clm":
        return DEFAULT_LR[method]
    from clm_ext.demo.pipeline import DemoConfig

    return DemoConfig.real().lr[f"clm/{layer}"]


def fixed_alpha(text: str) -> tuple:
    """NAME=VALUE with a finite VALUE (argparse type of --fixed-alpha)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, finite_float(value)


def _load_other_dials(model, args) -> dict:
    """Load the --with-dial dials beside --dial; the --fixed-alpha values they hold, each a loaded dial."""
    import clm_ext
    from clm_ext.model import alignment_site, read_alignment_config

    for directory in args.with_dial:
        try:
            saved = read_alignment_config(directory)
            if args.dial in (saved.get("dial"), *saved.get("dials", ())):
                raise ValueError(f"it holds the dial {args.dial!r}, the one --dial trains")
            clm_ext.load_alignment(model, directory)
        except (OSError, ValueError) as e:
            raise UsageError(f"--with-dial {directory}: {e}".splitlines()[0]) from None
    fixed = dict(args.fixed_alpha)
    others = [name for name in alignment_site(model).dial_names if name != args.dial]
    for name in fixed:
        if name not in others:
            raise UsageError(f"--fixed-alpha {name}: not a dial loaded with --with-dial (loaded: {others or 'none'})")
    return fixed


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    import clm_ext
    from clm_ext.checkpoints import CheckpointError
    from clm_ext.preferences import load_preferences
    from clm_ext.sources import resolve_model
    from clm_ext.train import default_lora_config, make_dpo_trainer

    if args.eval_steps is not None and args.eval_dataset is None:
        raise UsageError("--eval-steps needs --eval-dataset")
    args.layer = args.layer or ("linear" if args.dial is not None else "block")
    if args.dial is not None and (args.method != "clm" or args.layer != "linear"):
        raise UsageError("--dial trains a named linear dial: it needs --method clm and --layer linear")
    if args.dial is None and (args.with_dial or args.fixed_alpha):
        raise UsageError("--with-dial and --fixed-alpha set the other dials while one trains: they need --dial NAME")
    check_model_dir(args.model)
    checkpoints = args.checkpoint_dir or os.path.normpath(args.out) + "-checkpoints"
    resume = _resume_point(args.resume, checkpoints)
    _check_out(args, resume)
    train_dataset = load_preferences(args.dataset)
    eval_dataset = load_preferences(args.eval_dataset) if args.eval_dataset else None
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not args.no_chat_template and getattr(tokenizer, "chat_template", None):
        train_dataset = as_conversations(train_dataset)
        eval_dataset = as_conversations(eval_dataset) if eval_dataset is not None else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    if args.method == "clm":
        try:
            clm_ext.add_alignment_control(model, layer=args.layer, dials=None if args.dial is None else [args.dial])
        except ValueError as e:
            raise UsageError(f"--dial: {e}") from None
        fixed = _load_other_dials(model, args) if args.dial is not None else {}
    config = DPOConfig(
        output_dir=checkpoints,
        beta=args.beta,
        loss_type=args.loss_type,
        loss_weights=args.loss_weights,
        max_length=args.max_length,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr if args.lr is not None else default_lr(args.method, args.layer),
        **({"optim": args.optim} if args.optim else {}),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        eval_strategy="steps" if args.eval_steps else ("epoch" if eval_dataset is not None else "no"),
        eval_steps=args.eval_steps,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        precompute_ref_log_probs=args.precompute_ref_log_probs,
        seed=args.seed,
        report_to="none",
        # Without this, processes launched on a machine with no accelerator each train alone (accelerate only
        # forms a gloo group when told the run is on CPU).
        use_cpu=not torch.accelerator.is_available(),
    )
    extra = {"peft_config": default_lora_config(args.lora_r)} if args.method == "lora" else {}
    if args.dial is not None:
        extra.update(dial=args.dial, fixed_alphas=fixed)
    trainer = make_dpo_trainer(args.method, model, config, train_dataset, tokenizer, eval_dataset, **extra)
    _check_truncation(args, train_dataset, trainer.train_dataset, "--dataset")
    if eval_dataset is not None:
        _check_truncation(args, eval_dataset, trainer.eval_dataset, "--eval-dataset")
    try:
        trainer.train(resume_from_checkpoint=resume)
    except CheckpointError as e:
        raise UsageError(f"--resume: {e}") from None

    _save_result(trainer, args, tokenizer)
    if trainer.accelerator.is_main_process:
        history = trainer.state.log_history
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(history, f, indent=1)
        print(f"clm train: {summary_line(args.method, trainer.state.global_step, history, args.out)}")
    # Under a launcher, destroy the process group before exit, as torch asks of a clean shutdown (the tests'
    # workers saw gloo/DeepSpeed threads abort at interpreter exit even after this: tests/test_train_distributed).
    trainer.accelerator.end_training()
    return 0


def as_conversations(dataset):
    """Plain-text preference rows as one user turn and the assistant's replies (TRL then applies the chat
    template, as the model saw in its instruction tuning); conversational rows are left as they are."""
    if not isinstance(dataset[0]["prompt"], str):
        return dataset
    return dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                                    "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
                                    "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]})


def summary_line(method: str, steps: int, history: list, out: str) -> str:
    """What the run ended on: the last logged loss and rewards, when any were logged."""
    last = next((h for h in reversed(history) if "loss" in h), {})
    parts = [f"{method} done after {steps} steps", ", ".join(f"{k} {last[k]:.4f}" for k in SUMMARY_KEYS if k in last),
             f"wrote {out}"]
    return "; ".join(p for p in parts if p)


def _check_out(args, resume) -> None:
    """Before training: --out and --checkpoint-dir stay apart from every input, and --out must take the result:
    a previous result is replaced only with --force or --resume (which continues the run that wrote it)."""
    from clm_ext import storage
    from clm_ext.output_dirs import check_apart, check_output_dir

    inputs = {"--model": args.model, "--dataset": args.dataset, "--eval-dataset": args.eval_dataset}
    if args.checkpoint_dir:
        check_apart(args.checkpoint_dir, inputs, "--checkpoint-dir")
    inputs["--resume"] = resume
    replace = args.force or args.resume is not None
    if args.method != "clm":
        check_output_dir(args.out, inputs, replace)
        return
    check_apart(args.out, inputs)
    storage.check_target(args.out, "--out")
    if os.path.isdir(args.out) and storage.CONFIG_NAME in os.listdir(args.out) and not replace:
        raise UsageError(f"--out {args.out} holds a saved alignment layer; pass --force to replace it "
                         "(or --resume to continue the run that wrote it)")


def _check_truncation(args, rows, tokenized, flag: str) -> None:
    """TRL drops the rows whose prompt alone fills max_length (no completion token would be left): say so,
    and stop before training when that leaves nothing."""
    dropped = len(rows) - len(tokenized)
    path = getattr(args, flag[2:].replace("-", "_"))
    if dropped == len(rows):
        raise UsageError(f"every row of {flag} {path} has a prompt of --max-length {args.max_length} "
                         "tokens or more, which leaves no room for a completion; raise --max-length")
    if dropped:
        print(f"clm train: {dropped} of {len(rows)} rows of {flag} {path} dropped: their prompts fill "
              f"--max-length {args.max_length}", file=sys.stderr)


def _resume_point(resume, checkpoints):
    """The checkpoint to resume from. A bare --resume takes the newest complete one (a run killed while writing
    checkpoint-N leaves it partial; it is skipped, and the choice printed with the reason); a named one must be
    complete."""
    from clm_ext.checkpoints import incomplete_reason, last_complete_checkpoint

    if resume is None:
        return None
    if resume == "latest":
        last, partial = last_complete_checkpoint(checkpoints) if os.path.isdir(checkpoints) else (None, [])
        skipped = "; ".join(f"{os.path.basename(p)}: {incomplete_reason(p)}" for p in partial)
        skipped = f" (skipped partial {skipped})" if partial else ""
        if last is None:
            raise UsageError(f"--resume: no complete checkpoint-* directory in {checkpoints}{skipped}")
        print(f"clm train: resuming from {last}{skipped}", flush=True)
        return last
    if not os.path.isdir(resume):
        raise UsageError(f"--resume: checkpoint directory {resume!r} does not exist")
    reason = incomplete_reason(resume)
    if reason:
        raise UsageError(f"--resume: {resume} is not a complete checkpoint: {reason}")
    return resume


def _save_result(trainer, args, tokenizer):
    """Called on every process: save_model gathers sharded weights collectively; the layer is written once."""
    import clm_ext

    if args.method != "clm":
        trainer.save_model(args.out)
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(args.out)
    else:
        clm_ext.save_alignment(trainer.accelerator.unwrap_model(trainer.model), args.out, dial=args.dial,
                               is_main_process=trainer.accelerator.is_main_process)


if __name__ == "__main__":  # `accelerate launch -m clm_ext.cli.train ...` (a launcher needs a module or a script)
    from clm_ext.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
