"""Layer-only training checkpoints: what identifies the frozen base a layer was trained on, and which
`checkpoint-N` folder a resume can trust.

A CLMDPOTrainer checkpoint holds `alignment/` (the layer, `save_alignment` format: safetensors + JSON), the
Trainer's own optimizer / scheduler / RNG / trainer-state files, and `clm_checkpoint.json` (this module): the
base model's identity, so a resume on another base or another layer kind is refused instead of silently
continuing a layer that was trained for different weights.

A checkpoint is complete when every file a resume reads is there and readable (`incomplete_reason`): a run
killed while writing one, or a damaged file, makes it partial, and a resume falls back to an older one or
names the file, instead of failing inside the Trainer.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Optional

import torch
from torch import nn

from .model import alignment_site, text_config

INFO_NAME = "clm_checkpoint.json"
LAYER_DIR = "alignment"
TRAINER_STATE_NAME = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it is partial
OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer.pt", "scheduler.pt"  # torch.save'd by the Trainer
FORMAT_VERSION = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Config fields that tell two bases apart; the embedding digest tells apart two trainings of one architecture.
_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                "num_attention_heads")
_DIGEST_ROWS = 64


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the directory or file."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was made on another base model or with another alignment layer."""


class IncompleteCheckpointError(CheckpointError):
    """A file the resume reads is missing or unreadable."""


def describe_base(model: nn.Module) -> dict:
    """The identity of the frozen base: architecture fields and a digest of the first rows of its embedding
    table (cast to bfloat16, so an fp32 and a bf16 load of the same weights agree). The digest is None where the
    table is not materialised on this process (a ZeRO-3 partition)."""
    config = text_config(model)
    table = model.get_input_embeddings().weight
    digest = None
    if table.dim() == 2 and table.shape[0] > 0 and not hasattr(table, "device_mesh"):
        rows = table.detach()[:_DIGEST_ROWS].to("cpu", torch.bfloat16).contiguous()
        digest = hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    info = {key: getattr(config, key, None) for key in _CONFIG_KEYS}
    info["name_or_path"] = getattr(model.config, "_name_or_path", None) or None
    info["embedding_digest"] = digest
    return info


def write_info(directory: str, base: dict, model: nn.Module) -> None:
    site = alignment_site(model)
    info = {"format_version": FORMAT_VERSION, "base_model": base, "layer": site.layer_kind, "mode": site.mode}
    with open(os.path.join(directory, INFO_NAME), "w") as f:
        json.dump(info, f, indent=2)


def check_info(directory: str, base: dict, model: nn.Module) -> None:
    """Raise CheckpointMismatchError unless `directory` is a layer checkpoint made on this base and layer, and
    IncompleteCheckpointError unless every file the resume reads is readable."""
    path = os.path.join(directory, INFO_NAME)
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(directory, LAYER_DIR)):
        raise CheckpointMismatchError(
            f"resume_from_checkpoint: {directory} is not a CLMDPOTrainer checkpoint (expected {INFO_NAME} and "
            f"{LAYER_DIR}/); a checkpoint of another trainer cannot resume the alignment layer"
        )
    reason = incomplete_reason(directory)
    if reason:
        raise IncompleteCheckpointError(f"resume_from_checkpoint: {directory} is not a complete checkpoint: {reason}")
    info = _read_info(path)
    site = alignment_site(model)
    for key, have in (("layer", site.layer_kind), ("mode", site.mode)):
        if info.get(key) != have:
            raise CheckpointMismatchError(
                f"resume_from_checkpoint: {directory} holds a {key}={info.get(key)!r} alignment layer, the model "
                f"being trained has {key}={have!r}"
            )
    saved = info.get("base_model", {})
    differs = [k for k in (*_CONFIG_KEYS, "embedding_digest")
               if saved.get(k) is not None and base.get(k) is not None and saved[k] != base[k]]
    if differs:
        raise CheckpointMismatchError(
            f"resume_from_checkpoint: {directory} was made on another base model "
            f"({saved.get('name_or_path')!r}: {', '.join(f'{k}={saved[k]!r}' for k in differs)}), this model "
            f"({base.get('name_or_path')!r}) has {', '.join(f'{k}={base[k]!r}' for k in differs)}; resume on the "
            "base the layer was trained on"
        )


def _read_info(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise IncompleteCheckpointError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(info, dict):
        raise IncompleteCheckpointError(f"{path} must hold a JSON object, got a {type(info).__name__}")
    return info


def is_complete(directory: str) -> bool:
    """Whether a resume can read every file of the checkpoint (`incomplete_reason` says why not)."""
    return incomplete_reason(directory) is None


def incomplete_reason(directory: str) -> Optional[str]:
    """None for a complete checkpoint; else what is missing or unreadable, naming the file. Checked: the trainer
    state (written last; the fields a resume reads), the optimizer and scheduler states and RNG states where the
    Trainer wrote them as plain torch files (read as tensors only, never unpickled as objects), and for a layer
    checkpoint its clm_checkpoint.json and layer. A sharded (FSDP, DeepSpeed) optimizer state is left to its
    loader."""
    names = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    if TRAINER_STATE_NAME not in names:
        return f"no {TRAINER_STATE_NAME}"
    problem = _trainer_state_problem(os.path.join(directory, TRAINER_STATE_NAME))
    if problem:
        return problem
    sharded = any(n.startswith(("optimizer_", "global_step")) or n == "optimizer.bin" for n in names)
    needed = [] if sharded else [OPTIMIZER_NAME, SCHEDULER_NAME]
    for name in needed + sorted(n for n in names if n.startswith("rng_state") and n.endswith(".pth")):
        if name not in names:
            return f"no {name}"
        problem = _torch_file_problem(os.path.join(directory, name))
        if problem:
            return problem
    if INFO_NAME in names or LAYER_DIR in names:
        return _layer_problem(directory)
    return None


def _trainer_state_problem(path: str) -> Optional[str]:
    from transformers import TrainerState

    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return f"{path} is not readable JSON ({e})"
    if not isinstance(state, dict):
        return f"{path} must hold a JSON object, got a {type(state).__name__}"
    for key in ("global_step", "max_steps"):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            return f"{path} has no valid {key!r} (got {state.get(key)!r})"
    try:
        TrainerState(**state)
    except (TypeError, ValueError) as e:
        return f"{path} is not a trainer state ({e})"
    return None


def _torch_file_problem(path: str) -> Optional[str]:
    from transformers.trainer_pt_utils import safe_globals  # the numpy types the Trainer allows in its RNG state

    try:
        with safe_globals():
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a damaged or foreign file fails in many ways (pickle, zip, EOF, weights_only)
        detail = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())
        return f"{path} is not a readable torch.save file ({type(e).__name__}: {detail[:100]})"
    if not isinstance(state, (dict, list, tuple)):
        return f"{path} holds a {type(state).__name__}, not a saved state"
    return None


def _layer_problem(directory: str) -> Optional[str]:
    from . import storage

    try:
        _read_info(os.path.join(directory, INFO_NAME))
        storage.read_layer(os.path.join(directory, LAYER_DIR))
    except (OSError, ValueError) as e:
        return str(e)
    return None


def last_complete_checkpoint(folder: str) -> tuple[Optional[str], list[str]]:
    """The newest complete `checkpoint-N` in `folder`, and the newer ones skipped as partial (a run killed
    while writing one leaves it without trainer_state.json; `incomplete_reason` says what each lacks)."""
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(folder)
                    if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(folder, name))), reverse=True)
    skipped = []
    for _, name in steps:
        path = os.path.join(folder, name)
        if is_complete(path):
            return path, skipped
        skipped.append(path)
    return None, skipped
