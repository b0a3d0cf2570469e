"""Wrap a Hugging Face causal LM with the alignment dial, turn the dial, save/load the layer, merge it.

The base model keeps its class, its modules and its state_dict keys; the alignment layer adds keys under
the input embedding (`...embed_tokens.alignment.*`, layer="linear") or under the decoder
(`...model.alignment_block.block.*`, layer="block"). Only those parameters train.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from . import storage
from .alpha import alpha_tensor
from .layer import MODES, AlignedEmbedding, AlignmentBlock, AlignmentSite
from .version import __version__

LAYERS = ("linear", "block")
BLOCK_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma")


def text_config(model: nn.Module):
    """The decoder's config of a Hugging Face causal LM (the text part of a multimodal one)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"expected a Hugging Face causal LM (a PreTrainedModel), got {type(model).__name__}")
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


# ------------------------------------------------------------------------------------------------
# Finding the layer.


def alignment_site(model: nn.Module) -> Optional[AlignmentSite]:
    """The AlignedEmbedding / AlignmentBlock of a wrapped model, or None if it has none."""
    for module in model.modules():
        if isinstance(module, AlignmentSite):
            return module
    return None


def require_site(model: nn.Module, what: str) -> AlignmentSite:
    """The model's alignment site, or an error telling the caller (`what`) to add one first."""
    site = alignment_site(model)
    if site is None:
        raise ValueError(f"{what}: the model has no alignment layer; call clm_ext.add_alignment_control(model) first")
    return site


def alignment_layer(model: nn.Module) -> nn.Module:
    """The trainable module: the d x d nn.Linear (layer="linear") or the new decoder block (layer="block")."""
    return require_site(model, "alignment_layer").trainable()


def alignment_parameters(model: nn.Module) -> list:
    """The parameters that train (everything else is frozen)."""
    return list(alignment_layer(model).parameters())


# ------------------------------------------------------------------------------------------------
# Wrapping.


def add_alignment_control(
    model: nn.Module, mode: str = "embed", layer: str = "linear", *, cache_aligned_table: bool = False,
    dials: Optional[list] = None,
) -> nn.Module:
    """Add the identity-initialised alignment layer to `model` in place, freeze the base, return `model`.

    mode: "embed" (mix before the first block, one pass) or "logits" (two streams, logits mixed).
    layer: "linear" (d x d layer on the token embedding) or "block" (a new first decoder block; Llama,
    Qwen2, Mistral, Gemma). cache_aligned_table: at inference without grad (layer="linear", mode "embed"),
    gather from a cached aligned table (one more vocab x hidden table) instead of a GEMM per step.
    At alpha = 0 the model is exactly the base model.
    dials: names of independent dials, h = x + sum_k alpha_k (A_k(x) - x) (layer "linear", mode "embed"),
    each turned by its own alpha (set_alpha(model, {"name": value, ...})). On a model that has named dials
    already, the new ones are added (at alpha 0, so the model's output does not change).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    if dials is not None and layer != "linear":
        raise NotImplementedError("named dials are d x d linear layers (layer='linear'); block dials are not "
                                  "implemented")
    config = text_config(model)
    existing = alignment_site(model)
    if existing is not None and dials is not None and existing.dial_names is not None:
        if existing.mode != mode:
            raise ValueError(f"mode={mode!r}: the model's dials are in mode {existing.mode!r}")
        existing.add_dials(dials)
        for name in dials:
            existing.dial(name).requires_grad_(True)
        return model
    if existing is not None:
        raise RuntimeError(
            f"the model already has alignment control (layer={existing.layer_kind!r}, mode={existing.mode!r}); "
            "add_alignment_control adds one layer per model"
        )
    if not callable(getattr(model, "get_input_embeddings", None)) or not hasattr(model, "generate"):
        raise TypeError(f"expected a Hugging Face causal LM (with get_input_embeddings and generate), got {type(model).__name__}")
    if layer == "linear":
        embedding = model.get_input_embeddings()
        AlignedEmbedding.wrap(embedding, mode, cache_aligned_table, dials)  # checks the embedding first
        site = embedding
    else:
        site = _add_block(model, config, mode)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in site.trainable().parameters():
        p.requires_grad_(True)
    if mode == "logits":
        site.attach_two_stream(model)
    return model


def _decoder_blocks(model: nn.Module, config) -> tuple:
    """The decoder and its nn.ModuleList of blocks, for the model types layer="block" supports."""
    model_type = getattr(config, "model_type", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    if model_type not in BLOCK_MODEL_TYPES or not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise NotImplementedError(
            f"layer='block' supports model types {BLOCK_MODEL_TYPES}, got {model_type!r}; "
            "use layer='linear', which works for any model with an nn.Embedding input embedding"
        )
    return decoder, blocks


def _add_block(model: nn.Module, config, mode: str) -> AlignmentBlock:
    decoder, blocks = _decoder_blocks(model, config)
    site = AlignmentBlock(blocks[0], cache_index=config.num_hidden_layers, mode=mode)
    decoder.alignment_block = site
    blocks[0].register_forward_pre_hook(site.hook, with_kwargs=True)
    return site


# ------------------------------------------------------------------------------------------------
# The dial.


def set_alpha(model: nn.Module, alpha) -> None:
    """Set the alignment strength: a float, or a 1-D tensor/list with one alpha per sequence of the batch.
    With named dials: a dict {dial: alpha} for the whole batch, or a list of such dicts, one per sequence (a
    dial a dict leaves out is at 0); an unknown dial name or a non-finite value is refused, naming it.

    0 is the base model, 1 the aligned one, >1 extrapolates, <0 goes the other way. A per-sequence alpha
    of length B also serves batches of k*B rows (generate's num_return_sequences / beams), repeated per
    sequence.
    """
    require_site(model, "set_alpha").set_alpha(alpha)


def get_alpha(model: nn.Module) -> Tensor:
    """The current alpha (a float32 tensor, 0-d or one value per sequence)."""
    return require_site(model, "get_alpha").alpha


@contextlib.contextmanager
def alignment_strength(model: nn.Module, alpha) -> Iterator[nn.Module]:
    """Temporarily set alpha; the previous alpha comes back on exit (also on an exception)."""
    site = require_site(model, "alignment_strength")
    previous = site.alpha
    site.set_alpha(alpha)
    try:
        yield model
    finally:
        site._alpha = previous


# ------------------------------------------------------------------------------------------------
# Save / load: safetensors + JSON, never pickle (the files and their atomic swap: clm_ext.storage).


# What a block layer's weights assume of the model beyond their shapes (a head split the shapes may not show).
BLOCK_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads")


def _describe(model: nn.Module, site: AlignmentSite, module: Optional[nn.Module] = None) -> dict:
    config = text_config(model)
    params = list((module or site.trainable()).parameters())
    heads = {key: getattr(config, key, None) for key in BLOCK_CONFIG_KEYS} if site.layer_kind == "block" else {}
    return {
        **heads,
        "clm_ext_version": __version__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": config.hidden_size,
        "mode": site.mode,
        "layer": site.layer_kind,
        "dtype": str(params[0].dtype).replace("torch.", ""),
        "num_parameters": sum(p.numel() for p in params),
    }


def _gathered(module: nn.Module, modifier_rank=None):
    """DeepSpeed ZeRO-3 keeps only a slice of each parameter per process: gather them while the context is open
    (a collective: every process enters it). Changes made on `modifier_rank` are kept and re-partitioned."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _full_state(module: nn.Module) -> dict:
    """The module's state as whole CPU tensors. FSDP2 shards (DTensors) are gathered, which is a collective:
    under FSDP or ZeRO-3 every process must call this, as every process calls `save_alignment`."""
    from torch.distributed.tensor import DTensor

    state = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[key] = value.detach().to("cpu").contiguous()
    return state


def save_alignment(model: nn.Module, directory: str, *, dial: Optional[str] = None,
                   is_main_process: bool = True) -> str:
    """Write the alignment layer (safetensors) and alignment_config.json to `directory`; returns its path.

    A reader, or a kill at any moment, sees the previous layer or the new one, never a mix or none
    (clm_ext.storage). A previous layer there is replaced; other files beside it are left alone; a
    non-empty directory that holds no layer is refused. A symlink to a directory is followed. Under FSDP or
    DeepSpeed ZeRO-3 call it on every process (the sharded layer is gathered collectively) with
    `is_main_process` true on one only.

    With named dials: `dial="name"` writes that dial alone, as a one-layer save whose config also says
    "dial": "name" (load it into any model with load_alignment(model, dir, dial=...)); without `dial`, every
    dial goes into one file, keys "<dial>.weight" / "<dial>.bias", the config listing "dials" in order.
    """
    site = require_site(model, "save_alignment")
    module = site.trainable() if dial is None else site.dial(dial)
    with _gathered(module):
        state = _full_state(module)
        info = _describe(model, site, module)
    if dial is not None:
        info["dial"] = dial
    elif site.dial_names is not None:
        info["dials"] = site.dial_names
    if not is_main_process:
        return os.path.abspath(os.fspath(directory))
    return storage.write_layer(directory, state, info)


def read_alignment_config(directory: str) -> dict:
    """The JSON config of a saved alignment layer (clear error, naming the file, if `directory` is not one)."""
    return storage.read_config(directory)


def load_alignment(model: nn.Module, directory: str, mode: Optional[str] = None, *,
                   dial: Optional[str] = None) -> nn.Module:
    """Load a saved alignment layer into `model` (wrapping it first, with the saved layer kind and mode, if
    it has no layer yet; `mode` overrides the saved mode then). Returns `model`.

    Raises ValueError when the files are malformed (naming the file) or the layer does not fit: another
    model type, hidden size, layer kind or tensor shape, NaN/inf or integer weights. Everything is checked
    before the model is touched, so a failed load leaves it as it was.

    Named dials: `dial="name"` loads a one-layer save (of any model: a dial trained on its own) as the dial
    "name", or that dial out of a save of several; a dial the model lacks is added, other dials are left
    as they are. A save of several dials (or one saved with save_alignment(..., dial=...)) loads by the
    names it holds.
    """
    info, state = storage.read_layer(directory)
    config_path = os.path.join(os.fspath(directory), storage.CONFIG_NAME)
    for key, allowed in (("layer", LAYERS), ("mode", MODES)):
        if info[key] not in allowed:
            raise ValueError(f"load_alignment: {config_path} has {key}={info[key]!r}, expected one of {allowed}")
    config = text_config(model)
    checked = [("model_type", getattr(config, "model_type", None)), ("hidden_size", config.hidden_size)]
    if info["layer"] == "block":  # layers saved before these keys were recorded are checked by shape only
        checked += [(key, getattr(config, key, None)) for key in BLOCK_CONFIG_KEYS if key in info]
    for key, have in checked:
        if info.get(key) != have:
            raise ValueError(
                f"load_alignment: the layer in {directory} was trained for {key}={info.get(key)!r}, "
                f"the model has {key}={have!r}"
            )
    site = alignment_site(model)
    if dial is not None or "dials" in info or "dial" in info or (site is not None and site.dial_names is not None):
        return _load_dials(model, directory, info, state, dial, mode)
    if site is not None and mode is not None and mode != site.mode:
        raise ValueError(
            f"load_alignment: mode={mode!r} was asked for but the model is already wrapped in mode {site.mode!r}"
        )
    if site is not None and site.layer_kind != info["layer"]:
        raise ValueError(
            f"load_alignment: {directory} holds a layer={info['layer']!r} alignment layer, the model has "
            f"layer={site.layer_kind!r}"
        )
    with _gathered(site.trainable()) if site is not None else contextlib.nullcontext():
        expected = _layer_shapes(model, site, info["layer"])
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise ValueError(
            f"load_alignment: the tensors in {directory} do not fit the model's alignment layer "
            f"(saved {sorted((k, tuple(v.shape)) for k, v in state.items())[:4]}..., expected "
            f"{sorted(expected.items())[:4]}...)"
        )
    # The dtypes the weights are used in: the embedding table's (a new layer takes it, or float32 for a half table,
    # and the linear layer is mixed into the table in its dtype) and those of a layer the model already has.
    used_in = {model.get_input_embeddings().weight.dtype}
    if site is not None:
        used_in |= {p.dtype for p in site.trainable().parameters()}
    storage.check_finite_in(state, used_in, f"load_alignment: the layer in {directory}")
    if site is None:
        add_alignment_control(model, mode=mode or info["mode"], layer=info["layer"])
        site = alignment_site(model)
    with _gathered(site.trainable(), modifier_rank=0), torch.no_grad():
        for key, value in site.trainable().state_dict().items():
            value.copy_(_like(state[key], value))
    return model


def _dial_states(directory: str, info: dict, state: dict, dial: Optional[str]) -> dict:
    """{dial name: {"weight", "bias"}} from a one-layer save (named by `dial` or its config) or a save of several."""
    saved = info.get("dials")
    if saved is None:
        name = dial or info.get("dial")
        if name is None:
            raise ValueError(f"load_alignment: {directory} holds one unnamed layer and the model has named dials; "
                             "say which dial it is: load_alignment(model, dir, dial='name')")
        return {name: state}
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
        raise ValueError(f"load_alignment: {directory}: 'dials' must be a list of names, got {saved!r}")
    names = saved if dial is None else [dial]
    if dial is not None and dial not in saved:
        raise ValueError(f"load_alignment: dial={dial!r} is not in {directory} (it holds the dials {saved})")
    return {n: {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == n} for n in names}


def _load_dials(model: nn.Module, directory: str, info: dict, state: dict, dial: Optional[str],
                mode: Optional[str]) -> nn.Module:
    """load_alignment of named dials: everything is checked before the model changes."""
    site = alignment_site(model)
    if info["layer"] != "linear":
        raise ValueError(f"load_alignment: {directory} holds a layer={info['layer']!r} layer; named dials are "
                         "linear layers")
    if site is not None and site.dial_names is None:
        raise ValueError("load_alignment: the model has a single unnamed alignment layer; named dials load into a "
                         "model made with add_alignment_control(model, dials=[...]) or into a plain model")
    if mode not in (None, "embed"):
        raise ValueError(f"load_alignment: mode={mode!r}: named dials run in mode 'embed'")
    states = _dial_states(directory, info, state, dial)
    d = model.get_input_embeddings().embedding_dim
    for name, tensors in states.items():
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if shapes != {"weight": (d, d), "bias": (d,)}:
            raise ValueError(f"load_alignment: the dial {name!r} in {directory} does not fit the model (saved "
                             f"{sorted(shapes.items())}, expected weight ({d}, {d}) and bias ({d},))")
    from .layer import _check_dial_names

    missing = [n for n in states if site is None or n not in site.dial_names]
    if missing:
        _check_dial_names(missing, [] if site is None else site.dial_names)
        add_alignment_control(model, dials=missing)
        site = alignment_site(model)
    with torch.no_grad():
        for name, tensors in states.items():
            layer = site.dial(name)
            layer.weight.copy_(tensors["weight"])
            layer.bias.copy_(tensors["bias"])
    return model


def _like(full: Tensor, target: Tensor) -> Tensor:
    """`full` laid out as `target`: sharded the same way when `target` is an FSDP2 DTensor shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
    return full


def _layer_shapes(model: nn.Module, site: Optional[AlignmentSite], layer: str) -> dict:
    """The tensor shapes of the alignment layer the model has, or would get from add_alignment_control."""
    if site is not None:
        module = site.trainable()
    elif layer == "linear":
        d = model.get_input_embeddings().embedding_dim
        return {"weight": (d, d), "bias": (d,)}
    else:
        module = _decoder_blocks(model, text_config(model))[1][0]  # the new block is a copy of block 0
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Merge.


def merge_alignment(model: nn.Module, alpha: float = 1.0) -> nn.Module:
    """A plain transformers model with the layer folded into the input embedding table at `alpha`.

    Its logits equal the controlled model's at that alpha; save it with save_pretrained and load it with
    AutoModelForCausalLM.from_pretrained. A tied output embedding is untied (it keeps the base table). The
    base weights share storage with `model` (no copy); the new table is the only new memory.
    Only layer="linear" folds: a block is a nonlinear layer, and mode "logits" at alpha other than 0 or 1
    mixes two networks' outputs, which no single table can reproduce.
    """
    site = require_site(model, "merge_alignment")
    if site.dial_names is not None:
        return _merged(model, site, site.folded_table(alpha))
    alpha = alpha_tensor(alpha, "merge_alignment: alpha")
    if alpha.dim() != 0:
        raise ValueError("merge_alignment: alpha must be a single number (a merged model has one alignment strength)")
    alpha = float(alpha)
    if site.layer_kind == "block":
        raise ValueError(
            "merge_alignment: a layer='block' alignment layer cannot be folded into a plain model: it is a "
            "whole decoder block (attention + MLP, nonlinear), not a linear map of the embedding table, and "
            "the plain architecture has no slot for an extra block. Keep the wrapped model (save_alignment / "
            "load_alignment) to serve it"
        )
    if site.mode == "logits" and alpha not in (0.0, 1.0):
        raise ValueError(
            f"merge_alignment: mode 'logits' mixes the logits of two streams; at alpha={alpha} that is not one "
            "network, so it cannot be folded. Use alpha 0 or 1, or wrap the model with mode='embed'"
        )
    return _merged(model, site, site.folded_table(alpha))


def _merged(model: nn.Module, site: AlignmentSite, table: Tensor) -> nn.Module:
    """A copy of `model` sharing its base weights, with `table` as a plain input embedding."""
    memo = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in memo and module is not site.trainable():
                memo[id(p)] = nn.Parameter(p.data, requires_grad=True)
    plain = copy.deepcopy(model, memo)
    # Drop the two-stream hooks from the copy.
    for hook_id in getattr(site, "_two_stream_hook_ids", ()):
        plain._forward_pre_hooks.pop(hook_id, None)
        plain._forward_hooks.pop(hook_id, None)
        plain._forward_hooks_with_kwargs.pop(hook_id, None)
        plain._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    embedding = plain.get_input_embeddings()
    output = plain.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    embedding.unwrap()
    embedding.weight = nn.Parameter(table, requires_grad=True)
    if tied:
        config = plain.config
        config.tie_word_embeddings = False
        text = text_config(plain)
        if text is not config:
            text.tie_word_embeddings = False
    return plain
