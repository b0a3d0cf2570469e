"""`clm`: the command line. Each sub-command lives in its own module of this package, which defines
`add_arguments(parser)` and `run(args)`; modules are imported only when their command runs.

Every user error, whichever command and whichever layer finds it, ends the same way: one line on stderr,
`clm COMMAND: error: MESSAGE`, and exit code 2 (`USAGE_EXIT_CODE`). A command raises `UsageError` for what it
checks itself; argparse's errors and the library's own input errors (ValueError, OSError, whose messages name
the argument or file) are reported through the same line.
"""
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
USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """A user error the command found: the message names the argument and what was expected."""


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors take the path of every other user error (the usage is one `--help` away)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv=None) -> int:
    """Run one command; a user error ends in one line on stderr and exit code 2, not a traceback."""
    argv = _attach_list_values(list(argv if argv is not None else sys.argv[1:]))
    command = argv[0] if argv[:1] and argv[0] in COMMANDS else None
    try:
        args = _parser(command).parse_args(argv)
        return importlib.import_module(_module(args.command)).run(args) or 0
    except (UsageError, ValueError, OSError) as e:
        print(f"clm{' ' + command if command else ''}: error: {_one_line(e)}", file=sys.stderr)
        return USAGE_EXIT_CODE


def _parser(command) -> argparse.ArgumentParser:
    """The parser, with the arguments of `command` only (the others' modules are not imported)."""
    parser = _Parser(prog="clm", description="clm-ext: an alignment dial for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(_module(name)).add_arguments(p)
    return parser


def _module(command: str) -> str:
    return f"clm_ext.cli.{command.replace('-', '_')}"


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
