"""`Clm<Arch>ForCausalLM`: vLLM's own model classes with the alignment layer, mixed per token in mode embed.

- layer "linear": the token embedding looks the ids up as vLLM does (with tensor parallelism: the
  vocabulary-sharded lookup and its all-reduce), then mixes in the d x d layer with one alpha per token
  through clm-ext's fused op, `h = x + alpha_t (x W^T + b - x)`. The layer is replicated on every rank (it
  is d x d; the lookup's output is already whole on each rank), so one code path serves any tensor-parallel
  size. Named dials: the K layers stacked ([K, d, d], [K, d]) and one fused dial mix with a per-token alpha
  vector, `h = x + sum_k alpha_tk (x W_k^T + b_k - x)`.
- layer "block": one more decoder layer of the model's own vLLM class (`model.alignment_block.block`, the
  key names of a wrapped HF model), run on the embeddings before the first layer (a forward pre-hook on it,
  as in clm_ext.layer), `h = x + alpha_t (B(x) - x)`. Its attention is vLLM's own `Attention`, named as
  layer L = num_hidden_layers (`model.layers.L.self_attn.attn`, one after the model's last, the HF block's
  cache_index), so vLLM counts it in the KV-cache spec and allocates its cache; it is sharded under tensor
  parallelism like any decoder layer.

Both read the same per-token alpha buffer, written by the runner hook before each forward (hooks.py).
"""
from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM
from vllm.model_executor.models.utils import maybe_prefix

from .. import dial_ops, ops
from ..alpha import alpha_number
from ..layer import _check_dial_names
from ..vllm_format import CONFIG_KEY, LAYER_PREFIXES, MODE, block_fields
from .alpha import TokenAlpha


class StackedDials(nn.Module):
    """K named dials' linear layers as two stacked tensors, `weight` [K, d, d] and `bias` [K, d] (the
    exporter's layout, loaded under the linear layer's keys)."""

    def __init__(self, dials: int, d: int, dtype, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dials, d, d, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dials, d, dtype=dtype, device=device), requires_grad=False)


class AlignedVocabEmbedding(VocabParallelEmbedding):
    """vLLM's VocabParallelEmbedding plus the alignment layer (`alignment.weight`, `alignment.bias`, the
    checkpoint keys `model.embed_tokens.alignment.*`; stacked for named dials) and the per-token alpha buffer
    `token_alpha`."""

    @classmethod
    def wrap(cls, embedding: VocabParallelEmbedding, max_tokens: int, default_alpha: float,
             dials: list = None) -> TokenAlpha:
        """Turn `embedding` into this class in place (same `.weight`, so tied heads and keys still fit)."""
        if type(embedding) is not VocabParallelEmbedding:
            raise TypeError(f"clm-ext: expected vLLM's VocabParallelEmbedding, got {type(embedding).__name__}")
        d = embedding.embedding_dim
        dtype, device = embedding.weight.dtype, embedding.weight.device
        embedding.__class__ = cls
        embedding.alignment = (nn.Linear(d, d, bias=True, dtype=dtype, device=device) if dials is None
                               else StackedDials(len(dials), d, dtype, device))
        state = TokenAlpha(max_tokens, default_alpha, device, dials)
        embedding.register_buffer("token_alpha", state.buffer, persistent=False)
        return state

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)
        flat = x.reshape(-1, x.shape[-1])
        alpha = self.token_alpha[: flat.shape[0]]
        mix = ops.alignment_mix if alpha.dim() == 1 else dial_ops.dial_mix
        h = mix(flat, self.alignment.weight, self.alignment.bias, alpha)
        return h.reshape(x.shape)


class AlignmentBlock(nn.Module):
    """The block layer: `block`, a decoder layer of the model's class, and the per-token alpha buffer
    `token_alpha`. `hook` is a forward pre-hook on the model's first decoder layer: it replaces that layer's
    input x (the embeddings) by x + alpha_t (B(x) - x)."""

    def __init__(self, block: nn.Module, max_tokens: int, default_alpha: float) -> None:
        super().__init__()
        self.block = block
        self.state = TokenAlpha(max_tokens, default_alpha, next(block.parameters()).device)
        self.register_buffer("token_alpha", self.state.buffer, persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y, residual = self.block(positions, x, None)  # vLLM's decoder layers return the residual apart
        alpha = self.token_alpha[: x.shape[0]].unsqueeze(-1)
        return x + (alpha * (y + residual - x).to(alpha.dtype)).to(x.dtype)

    def hook(self, layer: nn.Module, args: tuple, kwargs: dict):
        positions, x, residual, *rest = args
        if residual is not None:
            raise RuntimeError("clm-ext: the block layer runs before the first decoder layer (no residual yet)")
        return (positions, self(positions, x), residual, *rest), kwargs


def _dial_names(info: dict, model: str):
    """The checkpoint's named dials (linear layers only), or None."""
    dials = info.get("dials")
    if dials is None:
        return None
    if info["layer"] != "linear":
        raise ValueError(f"clm-ext: {model}/config.json lists dials for a {info['layer']!r} layer; named dials are "
                         "linear layers")
    try:
        _check_dial_names(dials, ())
    except ValueError as err:
        raise ValueError(f"clm-ext: '{CONFIG_KEY}.dials' in {model}/config.json: {err}") from None
    return dials


class ClmModelMixin:
    """What the plugin adds to a vLLM causal LM: the alignment layer (linear on the embedding, or block
    before the first decoder layer), its alpha state, the check that the alphas were written before each
    forward, and the V2 model runner's per-request state. Subclasses say how to build one decoder layer."""

    def _add_alignment(self, vllm_config, prefix: str) -> None:
        model_config = vllm_config.model_config
        info = getattr(model_config.hf_config, CONFIG_KEY, None)
        if not isinstance(info, dict) or info.get("layer") not in LAYER_PREFIXES or info.get("mode") != MODE:
            kinds = " or ".join(map(repr, LAYER_PREFIXES))
            raise ValueError(
                f"clm-ext: {model_config.model} has no '{CONFIG_KEY}' section for layer {kinds}, mode {MODE!r} in "
                "its config.json; write the checkpoint with `clm export-vllm`"
            )
        if model_config.enable_prompt_embeds:
            raise ValueError("clm-ext: --enable-prompt-embeds bypasses the token embedding and so the alignment dial")
        default_alpha = alpha_number(info.get("default_alpha", 1.0), f"{CONFIG_KEY}.default_alpha")
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        dials = _dial_names(info, model_config.model)
        if info["layer"] == "block":
            self.clm_alpha = self._add_block(vllm_config, prefix, info, max_tokens, default_alpha)
            return
        embedding = getattr(self.model, "embed_tokens", None)
        # Under pipeline parallelism only the first stage embeds; the others have no dial to turn.
        self.clm_alpha = (AlignedVocabEmbedding.wrap(embedding, max_tokens, default_alpha, dials)
                          if isinstance(embedding, VocabParallelEmbedding) else None)

    def _add_block(self, vllm_config, prefix: str, info: dict, max_tokens: int, default_alpha: float):
        """The block before the first decoder layer, after checking it was made for this model."""
        config = vllm_config.model_config.hf_config.get_text_config()
        made_for, model = info.get("block"), block_fields(config.to_dict())
        if not isinstance(made_for, dict):
            raise ValueError(f"clm-ext: the '{CONFIG_KEY}' section of {vllm_config.model_config.model}/config.json has "
                             "no 'block' fields; write the checkpoint with `clm export-vllm`")
        for key, have in model.items():
            if made_for.get(key) != have:
                raise ValueError(f"clm-ext: the block layer was made for {key}={made_for.get(key)!r}, the model has "
                                 f"{key}={have!r}")
        if self.model.start_layer != 0:  # pipeline parallelism: the block runs on the first stage only
            return None
        model_prefix = maybe_prefix(prefix, "model")
        block = self._decoder_layer(vllm_config, config, f"{model_prefix}.layers.{config.num_hidden_layers}")
        self.model.alignment_block = AlignmentBlock(block, max_tokens, default_alpha)
        self.model.layers[0].register_forward_pre_hook(self.model.alignment_block.hook, with_kwargs=True)
        return self.model.alignment_block.state

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is not None:
            raise RuntimeError("clm-ext: inputs_embeds bypass the token embedding and so the alignment dial")
        if self.clm_alpha is not None:
            self.clm_alpha.take(input_ids.shape[0])
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    @staticmethod
    def get_model_state_cls():
        """vLLM's V2 model runner (the GPU default): per-request alphas through the model state."""
        from .model_state import ClmModelState

        return ClmModelState


class ClmLlamaForCausalLM(ClmModelMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._add_alignment(vllm_config, prefix)

    @staticmethod
    def _decoder_layer(vllm_config, config, prefix: str) -> nn.Module:
        return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)


class ClmQwen2ForCausalLM(ClmModelMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._add_alignment(vllm_config, prefix)

    @staticmethod
    def _decoder_layer(vllm_config, config, prefix: str) -> nn.Module:
        return Qwen2DecoderLayer(config=config, cache_config=vllm_config.cache_config,
                                 quant_config=vllm_config.quant_config, prefix=prefix)
