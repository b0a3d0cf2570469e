"""`clm merge`: fold an alignment layer into a plain transformers model for one alpha."""
from __future__ import annotations

from ._checks import add_force_argument, check_out, finite_float, same_directory
from ._load import add_model_arguments, load_model


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--alpha", type=finite_float, default=1.0, help="the alignment strength to fold in")
    parser.add_argument("--out", required=True, help="a new or empty directory for the merged model (save_pretrained)")
    add_force_argument(parser)


def run(args) -> int:
    import clm_ext

    if not args.alignment:
        raise SystemExit("clm merge: --alignment DIR is required (the layer to fold in)")
    if same_directory(args.out, args.model):
        raise SystemExit(f"clm merge: --out {args.out} is the --model directory; the merged model would overwrite "
                         "the base checkpoint it is read from: choose another directory")
    check_out("merge", args.out, args.force)
    model, tokenizer = load_model(args)
    merged = clm_ext.merge_alignment(model, alpha=args.alpha)
    merged.save_pretrained(args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    print(f"merged the alignment layer at alpha={args.alpha:g} into {args.out}")
    return 0
