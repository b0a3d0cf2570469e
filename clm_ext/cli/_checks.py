"""Checks the `clm` commands share: argument types that refuse bad values at parse time, and output
directories, which are looked at before any work starts and never written into silently."""
from __future__ import annotations

import argparse
import math
import os


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


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out (files of the same names are replaced)")


def check_out(command: str, out: str, force: bool) -> None:
    """Refuse an --out that is a file, or a non-empty directory without --force (SystemExit: one line)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise SystemExit(f"clm {command}: --out {out} exists and is not a directory; choose a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise SystemExit(
            f"clm {command}: --out {out} is a non-empty directory; pass --force to write into it "
            "(files of the same names are replaced) or choose a new directory"
        )


def check_model_dir(command: str, model: str) -> None:
    """Refuse a --model that names a missing local path (anything else may be a hub id) in one line."""
    if os.path.exists(model):
        return
    if os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1:
        raise SystemExit(f"clm {command}: --model {model}: no such directory")


def check_device(command: str, device: str) -> None:
    """Refuse a --device this torch build or machine cannot use, in one line (not torch's traceback)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SystemExit(f"clm {command}: --device {device!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise SystemExit(f"clm {command}: --device {device}: {why}; use --device cpu")


def same_directory(a: str, b: str) -> bool:
    """Whether two paths name the same existing directory (through symlinks and relative paths)."""
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)
