"""Loading what the `clm generate` / `clm merge` / `clm train` commands share: a model (by name, directory or GGUF
file), its tokenizer, a layer."""
from __future__ import annotations

import torch

from ._checks import check_device, check_model_dir, path_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser) -> None:
    parser.add_argument("--model", type=path_text, required=True, help="smollm2-135m-instruct, gemma3-270m, a local "
                        "checkpoint directory or a .gguf file (converted once into a cached checkpoint)")
    parser.add_argument("--alignment", type=path_text, help="a directory written by clm_ext.save_alignment / clm train")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_model(args, mode=None):
    """The model (in eval mode, with the alignment layer loaded if given) and its tokenizer (or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import clm_ext
    from clm_ext.sources import resolve_model

    check_model_dir(args.model)
    check_device(args.device)
    model_dir = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype]).to(args.device).eval()
    if args.alignment:
        clm_ext.load_alignment(model, args.alignment, mode=mode)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
