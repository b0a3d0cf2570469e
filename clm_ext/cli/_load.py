"""Loading what the `clm generate` / `clm merge` commands share: a local model, its tokenizer, a layer."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a local Hugging Face causal LM directory (or hub id)")
    parser.add_argument("--alignment", help="a directory written by clm_ext.save_alignment / clm train")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_model(args, mode=None):
    """The model (in eval mode, with the alignment layer loaded if given) and its tokenizer (or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import clm_ext

    from ._checks import check_model_dir

    check_model_dir(args.command, args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device).eval()
    if args.alignment:
        clm_ext.load_alignment(model, args.alignment, mode=mode)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
