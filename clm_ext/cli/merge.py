"""`clm merge`: fold an alignment layer into a plain transformers model for one alpha."""
from __future__ import annotations

from ._checks import add_force_argument, finite_float, path_text
from ._load import add_model_arguments, load_model


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--alpha", type=finite_float, default=1.0, help="the alignment strength to fold in")
    parser.add_argument("--out", type=path_text, required=True,
                        help="a new or empty directory for the merged model (save_pretrained)")
    add_force_argument(parser)


def run(args) -> int:
    import clm_ext
    from clm_ext.output_dirs import check_output_dir, staged_into

    from . import UsageError

    if not args.alignment:
        raise UsageError("--alignment DIR is required (the layer to fold in)")
    check_output_dir(args.out, {"--model": args.model, "--alignment": args.alignment}, args.force)
    model, tokenizer = load_model(args)
    merged = clm_ext.merge_alignment(model, alpha=args.alpha)
    with staged_into(args.out) as stage:
        merged.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    print(f"merged the alignment layer at alpha={args.alpha:g} into {args.out}")
    return 0
