"""Directories a command writes (merge, train, demo, export-vllm, a converted model): kept apart from what the
command reads, and filled without deleting anything a user owns.

Two rules, one place:
- An output directory may not be, contain, or lie inside one of the command's inputs (checked on real paths,
  through symlinks), even with --force: writing there would replace or bury the files being read.
- `force` means "files of the same names are replaced, nothing else is deleted". `staged_into` writes a new
  directory beside the target and then moves its files in one by one (each an atomic os.replace); the target
  is never removed, and a failure before the move leaves it as it was.
New directories are made with mode 0777 less the umask, as any directory the user makes (not mkdtemp's 0700:
a service account serving the output must be able to read it).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Iterator, Mapping, Optional


class OutputDirError(ValueError):
    """An output directory that cannot be written as asked; the message names the argument."""


def nonempty_path(path, what: str) -> str:
    """`path` as a string; an empty one is refused (it would silently mean the current directory)."""
    text = os.fspath(path) if path is not None else ""
    if not text.strip():
        raise OutputDirError(f"{what}: expected a path, got an empty one")
    return text


def check_apart(out: str, inputs: Mapping[str, Optional[str]], what: str = "--out") -> None:
    """Refuse an `out` that is, contains, or lies inside one of `inputs` ({argument name: path}; inputs that
    are not local paths, such as a packaged model's name, or are None, are skipped)."""
    target = os.path.realpath(os.path.expanduser(out))
    for name, path in inputs.items():
        if not path or not os.path.exists(os.path.expanduser(path)):
            continue
        source = os.path.realpath(os.path.expanduser(path))
        common = os.path.commonpath([target, source])
        if target == source:
            relation = f"is the {name} {path}"
        elif common == target:
            relation = f"contains the {name} {path}"
        elif common == source:
            relation = f"lies inside the {name} {path}"
        else:
            continue
        raise OutputDirError(f"{what} {out} {relation}; writing there would replace what is being read, even with "
                             "--force: choose a directory apart from the inputs")


def check_output_dir(out: str, inputs: Mapping[str, Optional[str]], force: bool, what: str = "--out") -> None:
    """Before any work: `out` must be apart from the inputs, not a file, and new or empty unless `force`."""
    nonempty_path(out, what)
    check_apart(out, inputs, what)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OutputDirError(f"{what} {out} exists and is not a directory; choose a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise OutputDirError(f"{what} {out} is a non-empty directory; pass --force to write into it (files of the "
                             "same names are replaced, nothing else is deleted) or choose a new directory")


def make_dir(path: str) -> str:
    """Create a new directory with mode 0777 less the umask (mkdtemp's would be 0700)."""
    os.mkdir(path, 0o777)
    return path


@contextlib.contextmanager
def staged_into(out: str) -> Iterator[str]:
    """Yield a new directory beside `out` to write into; on success its files move into `out` (made if missing),
    replacing files of the same names and nothing else; on an error `out` is left as it was."""
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    stage = make_dir(os.path.join(parent, f".{os.path.basename(out)}.tmp-{secrets.token_hex(6)}"))
    try:
        yield stage
        move_into(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # the stage is ours; whatever was moved out is no longer in it


def move_into(source: str, target: str) -> None:
    """Move the files under `source` into `target`, replacing files of the same relative names. Every clash
    that cannot be a plain replacement (a directory or symlink where a file goes) is refused before anything
    moves. JSON files move last, so that configs and indexes land after the weights they describe."""
    if not os.path.lexists(target):
        os.replace(source, target)
        return
    moves = []
    _plan_moves(source, target, moves)
    for src, dst in sorted(moves, key=lambda m: m[1].endswith(".json")):
        os.replace(src, dst)


def _plan_moves(source: str, target: str, moves: list) -> None:
    if os.path.islink(target) or not os.path.isdir(target):
        raise OutputDirError(f"{target} exists and is not a directory; it cannot take the directory being written")
    for name in sorted(os.listdir(source)):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src) and os.path.lexists(dst):
            _plan_moves(src, dst, moves)
        elif os.path.isdir(dst) and not os.path.islink(dst):
            raise OutputDirError(f"{dst} is a directory; it cannot be replaced by the file being written")
        else:
            moves.append((src, dst))
