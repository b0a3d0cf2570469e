"""`clm`: the command line. Each sub-command lives in its own module of this package, which defines
`add_arguments(parser)` and `run(args)`; modules are imported only when their command runs."""
import argparse
import importlib
import sys

COMMANDS = {
    "generate": "Generate at several alignment strengths side by side.",
    "train": "Train the alignment layer with DPO (or a full / LoRA DPO baseline).",
    "merge": "Fold the alignment layer into a plain transformers model for one alpha.",
    "demo": "The end-to-end demo: align a real model (or --toy) on VADER-judged pairs, then sweep alpha.",
    "bench": "Run one of the benchmark scripts.",
    "serve": "Serve the model over an OpenAI-compatible API, with an alpha per request.",
    "export-vllm": "Write a checkpoint that vLLM serves with the clm-ext plugin (per-request alpha).",
}
LIST_OPTIONS = ("--alphas",)  # comma-separated numbers that may start with '-'


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the usage itself is one `--help` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    """Run one command; bad input (ValueError, OSError) ends in one line on stderr and exit code 2, not a
    traceback."""
    parser = _Parser(prog="clm", description="clm-ext: an alignment dial for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = _attach_list_values(list(argv if argv is not None else sys.argv[1:]))
    chosen = argv[:1]
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if chosen == [name]:
            importlib.import_module(f"clm_ext.cli.{name.replace('-', '_')}").add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(f"clm_ext.cli.{args.command.replace('-', '_')}").run(args) or 0
    except (ValueError, OSError) as e:
        print(f"clm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _attach_list_values(argv: list) -> list:
    """`--alphas -1,0,1` -> `--alphas=-1,0,1`: argparse would take a value starting with '-' for an option."""
    out = []
    for token in argv:
        if out and out[-1] in LIST_OPTIONS and token[:1] == "-" and token[1:2] in set("0123456789."):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


if __name__ == "__main__":
    sys.exit(main())
