"""The checkpoint the vLLM plugin serves: a base model directory plus the alignment layer.

`export_for_vllm` copies the base model's files, adds the layer as `clm_alignment.safetensors` under the
key names the plugin's embedding loads (the same names `save_pretrained` gives a wrapped HF model), and
rewrites `architectures` to the plugin's class, so `vllm serve DIR` (with clm-ext installed beside vLLM)
picks the plugin. This module is the format both sides share; it imports neither vLLM nor the plugin.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from . import storage
from .alpha import alpha_number

# Base architecture -> the plugin's class for it.
ARCHITECTURES = {
    "LlamaForCausalLM": "ClmLlamaForCausalLM",
    "Qwen2ForCausalLM": "ClmQwen2ForCausalLM",
}
LAYER_FILE = "clm_alignment.safetensors"
LAYER_PREFIX = "model.embed_tokens.alignment."  # + "weight" / "bias"
CONFIG_KEY = "clm_alignment"  # in config.json: {"default_alpha": ..., "layer": ..., "mode": ...}
INDEX_NAME = "model.safetensors.index.json"


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _plan(model_dir: str, alignment_dir: str) -> tuple:
    """(config, alignment info, layer tensors) after checking the pair can be exported; clear errors
    otherwise."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--model: {model_dir} has no config.json (expected a Hugging Face model directory)")
    if not any(name.endswith(".safetensors") for name in os.listdir(model_dir)):
        raise ValueError(
            f"--model: {model_dir} holds no *.safetensors weights; save it with save_pretrained() first "
            "(safetensors is the default)"
        )
    config = _read_json(config_path)
    info, layer = storage.read_layer(alignment_dir)
    if info.get("layer") != "linear":
        raise ValueError(
            f"--alignment: {alignment_dir} holds a layer={info.get('layer')!r} alignment layer; the vLLM plugin "
            "serves only layer='linear' (the d x d layer on the token embedding)"
        )
    if info.get("mode") != "embed":
        raise ValueError(
            f"--alignment: {alignment_dir} was saved in mode={info.get('mode')!r}; the vLLM plugin serves only "
            "mode='embed' (one stream); re-save the layer from a model wrapped with mode='embed'"
        )
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(
            f"--model: architectures {archs} is not supported by the vLLM plugin; supported: {sorted(ARCHITECTURES)}"
        )
    for key in ("model_type", "hidden_size"):
        if info.get(key) != config.get(key):
            raise ValueError(
                f"--alignment: the layer was trained for {key}={info.get(key)!r}, the model has {key}={config.get(key)!r}"
            )
    return config, info, layer


def _check_out(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out: {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise FileExistsError(f"--out: {out} is not empty; pass --force to replace it")


def export_for_vllm(model_dir: str, alignment_dir: str, out: str, *, default_alpha: float = 1.0,
                    force: bool = False) -> str:
    """Write a directory `vllm serve` loads with the plugin: the base files, the layer, the new config.

    Written to a temporary directory beside `out` and moved into place; a non-empty `out` is replaced only
    with force=True. `default_alpha` is what a request without an alpha gets (stored in config.json).
    """
    from safetensors.torch import save_file

    model_dir, alignment_dir, out = (os.path.abspath(os.fspath(p)) for p in (model_dir, alignment_dir, out))
    default_alpha = alpha_number(default_alpha, "--default-alpha")
    config, info, layer = _plan(model_dir, alignment_dir)
    _check_out(out, force)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        for name in os.listdir(model_dir):
            src = os.path.join(model_dir, name)
            if os.path.isfile(src) and name not in ("config.json", LAYER_FILE) and not storage.is_layer_file(name):
                shutil.copy2(src, os.path.join(tmp, name))
        save_file({LAYER_PREFIX + k: v.contiguous() for k, v in layer.items()}, os.path.join(tmp, LAYER_FILE),
                  metadata={"format": "pt"})
        index_path = os.path.join(tmp, INDEX_NAME)
        if os.path.exists(index_path):  # vLLM loads only the files a sharded checkpoint's index names
            index = _read_json(index_path)
            index["weight_map"].update({LAYER_PREFIX + k: LAYER_FILE for k in layer})
            with open(index_path, "w") as f:
                json.dump(index, f, indent=2)
        config["architectures"] = [ARCHITECTURES[config["architectures"][0]]]
        config[CONFIG_KEY] = {"layer": info["layer"], "mode": info["mode"], "default_alpha": default_alpha,
                              "clm_ext_version": info.get("clm_ext_version")}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "d"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out
