"""`clm generate`: complete prompts at several alignment strengths and print them side by side."""
from __future__ import annotations

import shutil
import textwrap

from . import UsageError
from ._checks import finite_float, nonempty_text, positive_float, unit_interval
from ._load import add_model_arguments, load_model


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--alpha", type=finite_float, nargs="+", default=[0.0, 1.0], help="alignment strengths")
    parser.add_argument("--prompt", type=nonempty_text, nargs="+", required=True, help="one or more prompts")
    parser.add_argument("--mode", choices=["embed", "logits"], help="override the saved merge mode")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--top-p", type=unit_interval, default=1.0, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, help="total width in characters (default: the terminal's)")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="complete the raw prompt text (default: a user turn in the tokenizer's chat template, "
                        "when it has one)")


def side_by_side(titles, texts, width: int) -> str:
    """Columns of wrapped text, one per title."""
    gap = 3
    col = max(12, (width - gap * (len(titles) - 1)) // len(titles))
    columns = [[title.ljust(col), "-" * col] + (textwrap.wrap(text, col) or [""]) for title, text in zip(titles, texts)]
    height = max(len(c) for c in columns)
    rows = []
    for i in range(height):
        rows.append((" " * gap).join((c[i] if i < len(c) else "").ljust(col) for c in columns).rstrip())
    return "\n".join(rows)


def run(args) -> int:
    import torch

    import clm_ext

    model, tokenizer = load_model(args, mode=args.mode)
    if tokenizer is None:
        raise UsageError(f"--model {args.model}: no tokenizer found there")
    if not args.alignment:
        clm_ext.add_alignment_control(model, mode=args.mode or "embed")  # identity: every alpha is the base
    torch.manual_seed(args.seed)
    rendered = [clm_ext.chat_prompt(tokenizer, p, chat=not args.no_chat_template) for p in args.prompt]
    prompts = [p for p in rendered for _ in args.alpha]
    alphas = [a for _ in args.prompt for a in args.alpha]
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    if args.sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    completions = clm_ext.generate(model, tokenizer, prompts, alphas=alphas, **kwargs)
    width = args.width or shutil.get_terminal_size((120, 20)).columns
    n = len(args.alpha)
    for i, prompt in enumerate(args.prompt):
        print(f"prompt: {prompt}")
        print(side_by_side([f"alpha={a:g}" for a in args.alpha], completions[i * n:(i + 1) * n], width))
        print()
    return 0
