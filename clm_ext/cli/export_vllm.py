"""`clm export-vllm`: a model directory that `vllm serve` loads with the clm-ext plugin (clm_ext.vllm)."""
from __future__ import annotations

from ._checks import add_force_argument


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="the base model: a local Hugging Face directory (safetensors)")
    parser.add_argument("--alignment", required=True,
                        help="a layer written by clm_ext.save_alignment / clm train (linear or block, mode embed)")
    parser.add_argument("--out", required=True, help="the directory to write: new or empty (or with --force, "
                        "written into), apart from --model and --alignment")
    parser.add_argument("--default-alpha", type=float, default=1.0,
                        help="the alpha of a request that names none (default 1: the aligned model)")
    add_force_argument(parser)


def run(args) -> int:
    from clm_ext.vllm_export import export_for_vllm

    # A bad argument raises ValueError / OSError: `clm` prints it as one line and exits with 2.
    out = export_for_vllm(args.model, args.alignment, args.out, default_alpha=args.default_alpha, force=args.force)
    print(f"wrote {out}: serve it with `python -m vllm.entrypoints.openai.api_server --model {out}` "
          "where clm-ext is installed beside vLLM")
    return 0
