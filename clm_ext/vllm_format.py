"""The checkpoint format the vLLM plugin serves, shared by the exporter (`clm_ext.vllm_export`, which writes
it) and the plugin (`clm_ext.vllm`, which reads it inside vLLM's processes). Imports neither side, nor vLLM,
so the runtime plugin never loads the exporter.

An exported directory is the base model's files plus `LAYER_FILE` (the layer's tensors under the keys of
`LAYER_PREFIXES`) and a `CONFIG_KEY` section in config.json: {"layer", "mode", "default_alpha",
"clm_ext_version"} and, for a block layer, "block": the model fields the block was made for (`BLOCK_FIELDS`),
which the plugin checks against the model at start-up. Named dials (linear layers) add "dials": their names
in order, and their layers are stacked: weight [K, d, d], bias [K, d] under the linear layer's two keys.
"""
from __future__ import annotations

# Base architecture -> the plugin's class for it.
ARCHITECTURES = {
    "LlamaForCausalLM": "ClmLlamaForCausalLM",
    "Qwen2ForCausalLM": "ClmQwen2ForCausalLM",
}
LAYER_FILE = "clm_alignment.safetensors"
# Layer kind -> the key prefix of its tensors: the names `save_pretrained` gives a wrapped HF model.
LAYER_PREFIXES = {
    "linear": "model.embed_tokens.alignment.",  # + "weight" / "bias"
    "block": "model.alignment_block.block.",  # + the decoder layer's own keys ("self_attn.q_proj.weight", ...)
}
CONFIG_KEY = "clm_alignment"  # the section of config.json
MODE = "embed"  # the one mode the plugin serves (one stream, alpha per token)
# The config fields a block layer must share with the model it is served on.
BLOCK_FIELDS = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size")

def head_dim(config: dict) -> int:
    """The attention head size of a Llama / Qwen2 config (explicit, or hidden_size / heads)."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def block_fields(config: dict) -> dict:
    """The `BLOCK_FIELDS` of a model config (a dict, as in config.json)."""
    return {key: head_dim(config) if key == "head_dim" else config.get(key) for key in BLOCK_FIELDS}
