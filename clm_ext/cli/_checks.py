"""Checks the `clm` commands share: argument types that refuse bad values at parse time, and a missing
--model directory (output directories: clm_ext.output_dirs)."""
from __future__ import annotations

import argparse
import math
import os

from . import UsageError


def finite_float(text: str) -> float:
    """An argparse type: a finite number (argparse names the flag in its error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def optimizer_name(text: str) -> str:
    """An argparse type: an optimizer name transformers' Trainer knows (its `optim` argument)."""
    from transformers.training_args import OptimizerNames

    if text not in {o.value for o in OptimizerNames}:
        raise argparse.ArgumentTypeError(f"{text!r} is not an optimizer transformers knows (e.g. sgd, adamw_torch)")
    return text


def nonempty_text(text: str) -> str:
    """An argparse type: text with something besides whitespace."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty text, got an empty one")
    return text


def unit_interval(text: str) -> float:
    """An argparse type: a number in (0, 1] (a probability mass, such as top-p)."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def path_text(text: str) -> str:
    """An argparse type: a path, never empty (an empty one would silently mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return text


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out (files of the same "
                        "names are replaced, nothing else is deleted)")


def check_model_dir(model: str) -> None:
    """Refuse a --model that names a missing local path (anything else may be a packaged model's name)."""
    if os.path.exists(model):
        return
    if os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1:
        raise UsageError(f"--model {model}: no such directory")


def check_device(device: str) -> None:
    """Refuse a --device this torch build or machine cannot use, in one line (not torch's traceback)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise UsageError(f"--device {device}: {why}; use --device cpu")
