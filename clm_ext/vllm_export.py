"""The checkpoint the vLLM plugin serves: a base model directory plus the alignment layer.

`export_for_vllm` copies the base model's files, adds the layer (linear or block, mode embed) as
`clm_alignment.safetensors` under the key names the plugin loads (the same names `save_pretrained` gives a
wrapped HF model), and rewrites `architectures` to the plugin's class, so `vllm serve DIR` (with clm-ext
installed beside vLLM) picks the plugin. The format itself is `clm_ext.vllm_format`, which the plugin reads.
"""
from __future__ import annotations

import json
import os
import shutil

from . import storage
from .alpha import alpha_number
from .output_dirs import check_output_dir, nonempty_path, staged_into
from .vllm_format import ARCHITECTURES, CONFIG_KEY, LAYER_FILE, LAYER_PREFIXES, MODE, block_fields

INDEX_NAME = "model.safetensors.index.json"
FIRST_LAYER = "model.layers.0."  # a block layer is a copy of the base's first decoder layer


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
    storage.check_finite_in(layer, _served_dtypes(config), f"--alignment: the layer in {alignment_dir}")
    dials = _dial_names(info)
    if dials is not None:
        layer = _stacked_dials(alignment_dir, dials, layer)
    if info.get("layer") not in LAYER_PREFIXES:
        raise ValueError(
            f"--alignment: {alignment_dir} holds a layer={info.get('layer')!r} alignment layer; the vLLM plugin "
            f"serves layer {' or '.join(map(repr, LAYER_PREFIXES))}"
        )
    if info.get("mode") != MODE:
        raise ValueError(
            f"--alignment: {alignment_dir} was saved in mode={info.get('mode')!r}; the vLLM plugin serves only "
            f"mode={MODE!r} (one stream); re-save the layer from a model wrapped with mode={MODE!r}"
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
    if info["layer"] == "block":
        _check_block(model_dir, config, info, layer)
    return config, info, layer


def _dial_names(info: dict):
    """The named dials of a save (all of them, or the one dial saved alone), or None for an unnamed layer."""
    return list(info["dials"]) if "dials" in info else [info["dial"]] if "dial" in info else None


def _stacked_dials(alignment_dir: str, dials: list, layer: dict) -> dict:
    """A save of named dials ("<dial>.weight" / "<dial>.bias", or one dial's "weight" / "bias") as the stacked
    {"weight": [K, d, d], "bias": [K, d]} the plugin's dial mix reads, in the order of `dials`."""
    import torch

    prefixes = [""] if "weight" in layer else [f"{name}." for name in dials]
    try:
        return {key: torch.stack([layer[prefix + key] for prefix in prefixes]) for key in ("weight", "bias")}
    except KeyError as missing:
        raise ValueError(f"--alignment: {alignment_dir} lists the dials {dials} but holds no {missing.args[0]} "
                         "tensor") from None


def _served_dtypes(config: dict) -> set:
    """The dtypes vLLM may run the layer in: float32 (the plugin's layer) and the checkpoint's own dtype."""
    import torch

    named = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "float32"), None)
    return {torch.float32} | ({named} if isinstance(named, torch.dtype) and named.is_floating_point else set())


def _widths(fields: dict) -> dict:
    """What a decoder layer's tensor shapes fix of `BLOCK_FIELDS` (the head count and head size only as
    their product)."""
    return {"model_type": fields["model_type"], "hidden_size": fields["hidden_size"],
            "num_attention_heads x head_dim": fields["num_attention_heads"] * fields["head_dim"],
            "num_key_value_heads x head_dim": fields["num_key_value_heads"] * fields["head_dim"],
            "intermediate_size": fields["intermediate_size"]}


def _layer_widths(info: dict, layer: dict) -> dict:
    """`_widths` of a block layer, read from its tensors."""
    try:
        return {"model_type": info["model_type"], "hidden_size": layer["input_layernorm.weight"].shape[0],
                "num_attention_heads x head_dim": layer["self_attn.q_proj.weight"].shape[0],
                "num_key_value_heads x head_dim": layer["self_attn.k_proj.weight"].shape[0],
                "intermediate_size": layer["mlp.gate_proj.weight"].shape[0]}
    except KeyError as missing:
        raise ValueError(f"--alignment: the block layer has no {missing.args[0]} tensor (not a Llama / Qwen2 "
                         "decoder layer)") from None


def _first_layer_shapes(model_dir: str) -> dict:
    """The tensor shapes of the base's first decoder layer (from the safetensors headers), keyed as in a
    block layer."""
    from safetensors import safe_open

    shapes = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors") and name != LAYER_FILE:
            with safe_open(os.path.join(model_dir, name), framework="pt") as f:
                shapes.update({key[len(FIRST_LAYER):]: tuple(f.get_slice(key).get_shape())
                               for key in f.keys() if key.startswith(FIRST_LAYER)})
    return shapes


def _check_block(model_dir: str, config: dict, info: dict, layer: dict) -> None:
    """A block layer fits the model: the same widths, then the same tensors as the model's first layer."""
    fields = block_fields(config)
    ours, model = _layer_widths(info, layer), _widths(fields)
    for key, have in ours.items():
        if have != model[key]:
            value = (f"{fields[key.split()[0]]} x {fields['head_dim']} = {model[key]}" if " x " in key
                     else repr(model[key]))
            raise ValueError(f"--alignment: the block layer was made for {key}={have!r}, the model has {key}={value}")
    shapes = _first_layer_shapes(model_dir)
    got = {key: tuple(value.shape) for key, value in layer.items()}
    if got != shapes:
        key = sorted(set(got) ^ set(shapes) or {k for k in got if got[k] != shapes[k]})[0]
        raise ValueError(
            f"--alignment: the block layer's {key} is {got.get(key, 'missing')}, the model's first layer has "
            f"{shapes.get(key, 'none')}: the block must be a copy of this model's decoder layer"
        )


def export_for_vllm(model_dir: str, alignment_dir: str, out: str, *, default_alpha: float = 1.0,
                    force: bool = False) -> str:
    """Write a directory `vllm serve` loads with the plugin: the base files, the layer, the new config.

    Written to a new directory beside `out`, whose files then move into `out` (clm_ext.output_dirs): `out` may
    not be, contain or lie inside the model or the layer; a non-empty `out` is written into only with
    force=True, which replaces files of the same names and deletes nothing. `default_alpha` is what a request
    without an alpha gets (stored in config.json).
    """
    from safetensors.torch import save_file

    model_dir, alignment_dir, out = (os.path.abspath(nonempty_path(p, flag)) for p, flag in
                                     ((model_dir, "--model"), (alignment_dir, "--alignment"), (out, "--out")))
    default_alpha = alpha_number(default_alpha, "--default-alpha")
    check_output_dir(out, {"--model": model_dir, "--alignment": alignment_dir}, force)
    config, info, layer = _plan(model_dir, alignment_dir)
    with staged_into(out) as tmp:
        for name in os.listdir(model_dir):
            src = os.path.join(model_dir, name)
            if os.path.isfile(src) and name not in ("config.json", LAYER_FILE) and not storage.is_layer_file(name):
                shutil.copy2(src, os.path.join(tmp, name))
        prefix = LAYER_PREFIXES[info["layer"]]
        save_file({prefix + k: v.contiguous() for k, v in layer.items()}, os.path.join(tmp, LAYER_FILE),
                  metadata={"format": "pt"})
        index_path = os.path.join(tmp, INDEX_NAME)
        if os.path.exists(index_path):  # vLLM loads only the files a sharded checkpoint's index names
            index = _read_json(index_path)
            index["weight_map"].update({prefix + k: LAYER_FILE for k in layer})
            with open(index_path, "w") as f:
                json.dump(index, f, indent=2)
        config["architectures"] = [ARCHITECTURES[config["architectures"][0]]]
        config[CONFIG_KEY] = {"layer": info["layer"], "mode": info["mode"], "default_alpha": default_alpha,
                              "clm_ext_version": info.get("clm_ext_version")}
        dials = _dial_names(info)
        if dials is not None:
            config[CONFIG_KEY]["dials"] = dials
        if info["layer"] == "block":
            config[CONFIG_KEY]["block"] = block_fields(config)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return out
