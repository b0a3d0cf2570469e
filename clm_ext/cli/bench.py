"""`clm bench op|generate|dpo|dpo-real|serve|plot [args]`: run one of the benchmark scripts of the checkout.

The scripts live in the repository's benchmarks/ folder, not in the installed package, so this command
works from a source checkout (an editable install) and says so when the folder is missing.
"""
import argparse
import subprocess
import sys
from pathlib import Path

from . import UsageError

SCRIPTS = {"op": "bench_op.py", "generate": "bench_generate.py", "dpo": "bench_dpo.py",
           "dpo-real": "bench_dpo_real.py", "serve": "bench_serve.py", "plot": "plot.py"}


def benchmarks_dir() -> Path:
    """benchmarks/ next to the clm_ext package of this checkout."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", choices=tuple(SCRIPTS), help="which benchmark to run (plot: PNGs and table)")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="passed to the script, e.g. --device cpu --quick (see `clm bench op --help`)")


def run(args: argparse.Namespace) -> int:
    path = benchmarks_dir() / SCRIPTS[args.script]
    if not path.is_file():
        raise UsageError(f"{path} not found. The benchmark scripts ship with the clm-ext source checkout, not "
                         "with the installed package: clone the repository and install it with `pip install -e .`.")
    return subprocess.call([sys.executable, str(path), *args.args])
