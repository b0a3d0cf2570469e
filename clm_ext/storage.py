"""The files of a saved alignment layer, swapped so that no reader ever sees a missing or half-written layer.

Format 2 (written now): DIR/alignment_config.json describes the layer and names its weights file,
`"weights": "alignment-<random>.safetensors"`, beside it. A save writes new weights under a fresh name, then
writes the new config under a temporary name and moves it over the old one with a single os.replace: the
only step a reader can observe, so a reader (or a kill at any point) sees the old layer or the new one,
never a mix. Then the weights no config names are deleted. Savers hold an flock on DIR/.alignment.lock, so
that this cleanup never deletes another saver's new weights; readers take no lock: a reader whose weights
were deleted under it re-reads the (then newer) config.

Format 1 (clm-ext 0.1.0): alignment.safetensors and alignment_config.json side by side. It is read, and the
next save converts it. Files in DIR that are not the layer's own are never touched.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
from typing import Dict, Iterator, Tuple

import torch
from torch import Tensor

from .output_dirs import nonempty_path

CONFIG_NAME = "alignment_config.json"
LEGACY_WEIGHTS_NAME = "alignment.safetensors"
LOCK_NAME = ".alignment.lock"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# name -> JSON type every config must have
REQUIRED_FIELDS = {"model_type": str, "hidden_size": int, "layer": str, "mode": str}
_WEIGHTS = re.compile(r"alignment-[0-9a-f]{16}\.safetensors")
_TEMPORARY = re.compile(r"\.alignment_config-[0-9a-f]{16}\.json\.tmp")
_READ_ATTEMPTS = 50


def is_layer_file(name: str) -> bool:
    """Whether a file name in a layer directory is one a save writes (and so may replace or delete)."""
    return name in (CONFIG_NAME, LEGACY_WEIGHTS_NAME, LOCK_NAME) or bool(_WEIGHTS.fullmatch(name) or _TEMPORARY.fullmatch(name))


def check_target(directory: str, what: str = "save_alignment") -> None:
    """Refuse a path that is not a directory, or a directory that holds other files but no saved layer."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        kind = "a symlink to nothing" if os.path.islink(directory) else "not a directory"
        raise FileExistsError(f"{what}: {directory} exists and is {kind}")
    if not os.path.isdir(directory):
        return
    names = os.listdir(directory)
    if CONFIG_NAME in names:
        try:
            read_config(directory)
        except ValueError as e:  # an alignment_config.json that is not ours is never overwritten
            raise FileExistsError(f"{what}: {directory} holds an {CONFIG_NAME} that is not a readable layer ({e})") from None
    elif any(not is_layer_file(n) for n in names):
        raise FileExistsError(
            f"{what}: {directory} is a non-empty directory that holds no alignment layer; "
            "choose a new or empty directory"
        )


def write_layer(directory: str, tensors: Dict[str, Tensor], info: dict) -> str:
    """Save `tensors` and the config `info` as a format-2 layer in `directory` (created if missing)."""
    from safetensors.torch import save

    directory = os.path.abspath(nonempty_path(directory, "save_alignment"))
    check_target(directory)
    os.makedirs(directory, exist_ok=True)
    with _save_lock(directory):
        check_target(directory)  # again: another saver may have written here meanwhile
        token = secrets.token_hex(8)
        weights = f"alignment-{token}.safetensors"
        _write_new(os.path.join(directory, weights), save(tensors, metadata={"format": "pt", "layer": info["layer"]}))
        config = {"format_version": FORMAT_VERSION, **info, "weights": weights}
        temporary = os.path.join(directory, f".alignment_config-{token}.json.tmp")
        _write_new(temporary, (json.dumps(config, indent=2) + "\n").encode())
        os.replace(temporary, os.path.join(directory, CONFIG_NAME))
        _fsync_directory(directory)
        for name in os.listdir(directory):
            if name != weights and (name == LEGACY_WEIGHTS_NAME or _WEIGHTS.fullmatch(name) or _TEMPORARY.fullmatch(name)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(directory, name))
    return directory


def read_layer(directory: str) -> Tuple[dict, Dict[str, Tensor]]:
    """The checked config and tensors of the layer saved in `directory` (format 1 or 2)."""
    directory = nonempty_path(directory, "load_alignment")
    for _ in range(_READ_ATTEMPTS):
        text = _read_config_text(directory)
        info = parse_config(text, os.path.join(directory, CONFIG_NAME))
        path = os.path.join(directory, info["weights"] if info["format_version"] == 2 else LEGACY_WEIGHTS_NAME)
        try:
            with open(path, "rb") as f:  # once open, a concurrent save's cleanup cannot take it away
                data = f.read()
        except FileNotFoundError:
            if _read_config_text(directory) != text:
                continue  # a save replaced the layer between the two reads: read the new one
            raise FileNotFoundError(
                f"load_alignment: {directory} is not a complete alignment layer: {CONFIG_NAME} names "
                f"{os.path.basename(path)}, which is missing"
            ) from None
        return info, _checked_tensors(data, path, info.get("dtype"))
    raise RuntimeError(f"load_alignment: {directory} kept changing while being read ({_READ_ATTEMPTS} saves)")


def read_config(directory: str) -> dict:
    """The checked config of the layer saved in `directory`."""
    directory = nonempty_path(directory, "load_alignment")
    return parse_config(_read_config_text(directory), os.path.join(directory, CONFIG_NAME))


def parse_config(text: str, path: str) -> dict:
    """Check a config's structure; every error names the file."""
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"load_alignment: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(info, dict):
        raise ValueError(f"load_alignment: {path} must hold a JSON object, got a {type(info).__name__}")
    version = info.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        found = "has no format_version" if version is None else f"has format_version {version!r}"
        raise ValueError(
            f"load_alignment: {path} {found}; this clm-ext reads format_version {READABLE_VERSIONS} "
            "(a newer clm-ext may have written it)"
        )
    for key, kind in REQUIRED_FIELDS.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise ValueError(f"load_alignment: {path} needs {key!r} ({kind.__name__}), got {info.get(key)!r}")
    if version == 2 and not (isinstance(info.get("weights"), str) and _WEIGHTS.fullmatch(info["weights"])):
        raise ValueError(
            f"load_alignment: {path} needs 'weights', the name of an alignment-<16 hex>.safetensors file "
            f"beside it, got {info.get('weights')!r}"
        )
    return info


def _read_config_text(directory: str) -> str:
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"load_alignment: {directory} is not a saved alignment layer (no {CONFIG_NAME})") from None
    except PermissionError:
        raise PermissionError(f"load_alignment: cannot read {path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"load_alignment: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _checked_tensors(data: bytes, path: str, dtype_name=None) -> Dict[str, Tensor]:
    """The file's tensors: floating, finite as stored and finite in the dtype the config says the layer was
    saved from (the dtype a model of the same kind uses it in)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except SafetensorError as e:
        raise ValueError(f"load_alignment: {path} is not a readable safetensors file ({e})") from None
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise ValueError(f"load_alignment: {path}: tensor {key!r} has dtype {value.dtype}, expected a floating type")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"load_alignment: {path}: tensor {key!r} holds {bad} NaN or infinite value(s)")
    saved_as = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if isinstance(saved_as, torch.dtype) and saved_as.is_floating_point:
        check_finite_in(tensors, [saved_as], f"load_alignment: {path} (saved as {dtype_name})")
    return tensors


def check_finite_in(tensors: Dict[str, Tensor], dtypes, where: str) -> None:
    """Refuse weights that are not finite in each of `dtypes`, the dtypes they will be used in: a float64 1e300
    is finite as saved, and inf once cast to float32 (then even alpha 0 gives non-finite logits)."""
    for key, value in tensors.items():
        for dtype in sorted(set(dtypes), key=str):
            bad = int((~torch.isfinite(value.to(dtype))).sum())
            if bad:
                largest = float(value.abs().max())
                raise ValueError(f"{where}: tensor {key!r} holds {bad} value(s) that are not finite in {dtype} "
                                 f"(largest magnitude {largest:g}), the dtype it is used in")


def _write_new(path: str, data: bytes) -> None:
    """Create `path` (mode 0666 less the umask, as any file the user makes) with `data`, on disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _save_lock(directory: str) -> Iterator[None]:
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
