"""Layer-only training checkpoints: what identifies the frozen base a layer was trained on, and which
`checkpoint-N` folder a resume can trust.

A CLMDPOTrainer checkpoint holds `alignment/` (the layer, `save_alignment` format: safetensors + JSON), the
Trainer's own optimizer / scheduler / RNG / trainer-state files, and `clm_checkpoint.json` (this module): the
base model's identity, so a resume on another base or another layer kind is refused instead of silently
continuing a layer that was trained for different weights.
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
FORMAT_VERSION = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Config fields that tell two bases apart; the embedding digest tells apart two trainings of one architecture.
_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                "num_attention_heads")
_DIGEST_ROWS = 64


class CheckpointMismatchError(ValueError):
    """The checkpoint was made on another base model or with another alignment layer."""


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
    """Raise CheckpointMismatchError unless `directory` is a layer checkpoint made on this base and layer."""
    path = os.path.join(directory, INFO_NAME)
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(directory, LAYER_DIR)):
        raise CheckpointMismatchError(
            f"resume_from_checkpoint: {directory} is not a CLMDPOTrainer checkpoint (expected {INFO_NAME} and "
            f"{LAYER_DIR}/); a checkpoint of another trainer cannot resume the alignment layer"
        )
    with open(path) as f:
        info = json.load(f)
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


def is_complete(directory: str) -> bool:
    """A checkpoint the Trainer finished writing: its trainer_state.json (written last) exists and parses."""
    try:
        with open(os.path.join(directory, TRAINER_STATE_NAME)) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(folder: str) -> tuple[Optional[str], list[str]]:
    """The newest complete `checkpoint-N` in `folder`, and the newer ones skipped as partial (a run killed
    while writing one leaves it without trainer_state.json)."""
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(folder)
                    if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(folder, name))), reverse=True)
    skipped = []
    for _, name in steps:
        path = os.path.join(folder, name)
        if is_complete(path):
            return path, skipped
        skipped.append(path)
    return None, skipped
