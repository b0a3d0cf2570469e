"""`Clm<Arch>ForCausalLM`: vLLM's own model classes whose token embedding carries the alignment layer.

The embedding looks the ids up as vLLM does (with tensor parallelism: the vocabulary-sharded lookup and
its all-reduce), then mixes in the d x d layer with one alpha per token through clm-ext's fused op,
`h = x + alpha_t (x W^T + b - x)`. The layer is replicated on every rank (it is d x d; the lookup's
output is already whole on each rank), so one code path serves any tensor-parallel size.
"""
from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .. import ops
from ..alpha import alpha_number
from ..vllm_export import CONFIG_KEY
from .alpha import TokenAlpha


class AlignedVocabEmbedding(VocabParallelEmbedding):
    """vLLM's VocabParallelEmbedding plus the alignment layer (`alignment.weight`, `alignment.bias`, the
    checkpoint keys `model.embed_tokens.alignment.*`) and the per-token alpha buffer `token_alpha`."""

    @classmethod
    def wrap(cls, embedding: VocabParallelEmbedding, max_tokens: int, default_alpha: float) -> TokenAlpha:
        """Turn `embedding` into this class in place (same `.weight`, so tied heads and keys still fit)."""
        if type(embedding) is not VocabParallelEmbedding:
            raise TypeError(f"clm-ext: expected vLLM's VocabParallelEmbedding, got {type(embedding).__name__}")
        d = embedding.embedding_dim
        dtype, device = embedding.weight.dtype, embedding.weight.device
        embedding.__class__ = cls
        embedding.alignment = nn.Linear(d, d, bias=True, dtype=dtype, device=device)
        state = TokenAlpha(max_tokens, default_alpha, device)
        embedding.register_buffer("token_alpha", state.buffer, persistent=False)
        return state

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)
        flat = x.reshape(-1, x.shape[-1])
        alpha = self.token_alpha[: flat.shape[0]]
        h = ops.alignment_mix(flat, self.alignment.weight, self.alignment.bias, alpha)
        return h.reshape(x.shape)


class ClmModelMixin:
    """What the plugin adds to a vLLM causal LM: the aligned embedding, its alpha state, the check that
    the alphas were written before each forward, and the V2 model runner's per-request state."""

    def _add_alignment(self, vllm_config) -> None:
        model_config = vllm_config.model_config
        info = getattr(model_config.hf_config, CONFIG_KEY, None)
        if not isinstance(info, dict) or info.get("layer") != "linear" or info.get("mode") != "embed":
            raise ValueError(
                f"clm-ext: {model_config.model} has no '{CONFIG_KEY}' section for layer 'linear', mode 'embed' in "
                "its config.json; write the checkpoint with `clm export-vllm`"
            )
        if model_config.enable_prompt_embeds:
            raise ValueError("clm-ext: --enable-prompt-embeds bypasses the token embedding and so the alignment dial")
        default_alpha = alpha_number(info.get("default_alpha", 1.0), f"{CONFIG_KEY}.default_alpha")
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        embedding = getattr(self.model, "embed_tokens", None)
        # Under pipeline parallelism only the first stage embeds; the others have no dial to turn.
        self.clm_alpha = (AlignedVocabEmbedding.wrap(embedding, max_tokens, default_alpha)
                          if isinstance(embedding, VocabParallelEmbedding) else None)

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
        self._add_alignment(vllm_config)


class ClmQwen2ForCausalLM(ClmModelMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._add_alignment(vllm_config)
