"""The alignment layers: where the dial acts inside a wrapped model.

Two kinds, both "sites" that mix an aligned path into the residual stream with a per-row alpha,
`h = x + alpha * (f(x) - x)`:

- `AlignedEmbedding` (layer="linear"): the model's own token-embedding module, turned in place into a
  subclass that also holds the identity-initialised d x d layer `f(x) = x W^T + b` and calls the fused op.
  `.weight` stays the same Parameter at the same path, so tied output embeddings and checkpoint keys keep
  working. It acts on the raw table lookup `E[id]`: before Gemma's sqrt(d) scaling (which is applied to the
  mixed result, as Gemma applies it to E[id]) and before GPT-2 adds position embeddings.
  With named dials (`dials=[...]`) it holds one such layer per dial in `.dials` and mixes all of them,
  `h = x + sum_k alpha_k (f_k(x) - x)`, with an alpha vector per sequence or token (clm_ext.dial_ops).
- `AlignmentBlock` (layer="block", the paper's released variant): a copy of decoder block 0 with its
  attention output and MLP down projections zeroed (identity at init), run on the embeddings just before
  the first original block (a forward pre-hook on it), with its own KV-cache slot after the model's last.

In mode "logits" the wrapped model's forward runs 2B rows (unaligned rows first, aligned rows second): a
site leaves the first half as the base model computes it (a plain lookup; the block skipped) and runs its
layer in full on the second half (alpha 1); the user's alpha then mixes the two streams' logits
(`AlignmentSite.attach_two_stream`: hooks on the causal LM).
"""
from __future__ import annotations

import copy
import inspect
import re
from typing import Optional

import torch
from torch import Tensor, nn

from . import dial_ops, ops
from .alpha import alpha_tensor, dial_alpha_tensor, expand_alpha

MODES = ("embed", "logits")


class AlignmentSite(nn.Module):
    """What both layer kinds share: the user's alpha, the merge mode, and the alpha of each row."""

    layer_kind: str = ""

    def _init_site(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the dial.
        self._alpha = torch.tensor(0.0)
        self._stream_rows: Optional[int] = None  # set by the two-stream forward in mode "logits"

    @property
    def alpha(self) -> Tensor:
        return self._alpha

    @property
    def dial_names(self) -> Optional[list]:
        """The names of the site's dials, or None for the single, unnamed dial."""
        return None

    def dial(self, name: str) -> nn.Module:
        raise ValueError(f"dial={name!r}: the model has a single unnamed alignment layer, no named dials")

    def set_alpha(self, alpha) -> None:
        names = self.dial_names
        if names is None:
            if isinstance(alpha, dict) or (isinstance(alpha, (list, tuple)) and any(isinstance(a, dict) for a in alpha)):
                raise ValueError("alpha: the model has one unnamed dial (no named dials); give a number or one "
                                 "number per sequence, not a dict")
            self._alpha = alpha_tensor(alpha).to(self._device())
        else:
            self._alpha = dial_alpha_tensor(alpha, names).to(self._device())

    def set_token_alpha(self, alpha: Optional[Tensor]) -> None:
        """One alpha per token for the next forward only (None clears it): a continuous-batching engine packs
        many requests into one row [1, T], so each token takes its own request's alpha (clm_ext.serve)."""
        if alpha is None:
            self._token_alpha = None
            return
        if self.mode != "embed":
            raise RuntimeError("a per-token alpha needs mode 'embed' (mode 'logits' runs two streams per sequence)")
        if self.dial_names is not None:
            alpha = dial_alpha_tensor(alpha, self.dial_names, "token alpha")
            if alpha.dim() != 2:
                raise ValueError(f"token alpha must be [tokens, {len(self.dial_names)}], one dial vector per "
                                 f"token, got shape {tuple(alpha.shape)}")
        else:
            alpha = alpha_tensor(alpha, "token alpha")
            if alpha.dim() != 1:
                raise ValueError(f"token alpha must be 1-D, one value per token, got shape {tuple(alpha.shape)}")
        self._token_alpha = alpha.to(self._device())

    def _take_token_alpha(self, tokens: int) -> Optional[Tensor]:
        """The per-token alpha set for this forward (cleared: it holds for one forward), checked against the
        number of tokens; None when none was set."""
        alpha, self._token_alpha = getattr(self, "_token_alpha", None), None
        if alpha is not None and alpha.shape[0] != tokens:
            raise ValueError(
                f"the token alpha set for this forward has {alpha.shape[0]} values but the input has {tokens} tokens"
            )
        return alpha

    def _device(self) -> torch.device:
        return next(self.trainable().parameters()).device

    def trainable(self) -> nn.Module:
        raise NotImplementedError

    def user_alpha(self, device: torch.device) -> Tensor:
        if self._alpha.device != device:
            self._alpha = self._alpha.to(device)
        return self._alpha

    def row_alpha(self, rows: int, device: torch.device) -> Tensor:
        """The user's alpha for each of `rows` rows (mode "embed"; mode "logits" runs its two streams apart)."""
        return expand_alpha(self.user_alpha(device), rows, dials=self.dial_names is not None)

    def _check_two_stream(self, rows: int) -> None:
        if self._stream_rows != rows:
            raise RuntimeError(
                "alignment mode 'logits' runs two streams through the whole model: call the wrapped causal LM "
                "itself (model(...) or model.generate), not its inner modules"
            )

    # mode="logits": hooks on the causal LM run one forward of 2B rows and mix the logits. They are bound
    # methods of the site, so a deepcopy of the model gets hooks that drive its own copy of the site.

    def attach_two_stream(self, model: nn.Module) -> None:
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self._labels = None
        self._two_stream_hook_ids = (
            model.register_forward_pre_hook(self._two_stream_inputs, with_kwargs=True).id,
            model.register_forward_hook(self._two_stream_logits, with_kwargs=True).id,
        )

    def _two_stream_inputs(self, model: nn.Module, args: tuple, kwargs: dict):
        """Duplicate the batch (unaligned rows first); keep the labels for the loss of the mixed logits."""
        kwargs = {**dict(zip(self._forward_params, args)), **kwargs}
        batch = kwargs.get("input_ids")
        batch = kwargs.get("inputs_embeds") if batch is None else batch
        if batch is None:
            raise ValueError("alignment mode 'logits' needs input_ids or inputs_embeds")
        rows = batch.shape[0]
        for name in _STREAM_INPUTS:
            value = kwargs.get(name)
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows:
                kwargs[name] = torch.cat([value, value])
        _two_stream_cache(kwargs.get("cache", kwargs.get("past_key_values")))
        self._stream_rows = 2 * rows
        self._labels = kwargs.pop("labels", None)
        return (), kwargs

    def _two_stream_logits(self, model: nn.Module, args: tuple, kwargs: dict, output):
        """logits = (1 - alpha) * unaligned + alpha * aligned, per sequence; the loss from the mixed logits."""
        self._stream_rows = None
        labels, self._labels = self._labels, None
        as_tuple = isinstance(output, tuple)
        logits = output[0] if as_tuple else output.logits
        unaligned, aligned = logits.chunk(2)
        alpha = expand_alpha(self.user_alpha(logits.device), unaligned.shape[0])
        if alpha.dim():
            alpha = alpha.view(-1, *([1] * (logits.dim() - 1)))
        mixed = unaligned + (alpha * (aligned - unaligned).to(alpha.dtype)).to(logits.dtype)
        loss = None
        if labels is not None:
            config = model.config.get_text_config(decoder=True)
            loss = model.loss_function(logits=mixed, labels=labels, vocab_size=config.vocab_size)
        if as_tuple:
            return ((loss,) if loss is not None else ()) + (mixed,) + tuple(output[1:])
        output.logits = mixed
        if loss is not None:
            output.loss = loss
        return output


# Batch-dimension inputs the two-stream forward duplicates (mode "logits").
_STREAM_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")


def _two_stream_cache(cache) -> None:
    """Make beam search's cache reordering move both streams' rows (the cache holds 2B rows)."""
    if cache is None or getattr(cache, "_clm_two_stream", False) or not hasattr(cache, "reorder_cache"):
        return
    reorder = cache.reorder_cache

    def reorder_both(beam_idx: Tensor):
        return reorder(torch.cat([beam_idx, beam_idx + beam_idx.shape[0]]))

    cache.reorder_cache = reorder_both
    cache._clm_two_stream = True


# ------------------------------------------------------------------------------------------------
# layer="linear": the aligned embedding.


_ALIGNED_CLASSES: dict = {}


def _is_supported_embedding(module: nn.Module) -> bool:
    cls = type(module)
    if cls is nn.Embedding:
        return True
    # Gemma-style: nn.Embedding whose forward is `super().forward(ids) * embed_scale`.
    return isinstance(module, nn.Embedding) and cls.__name__.endswith("ScaledWordEmbedding") and hasattr(
        module, "embed_scale"
    )


class AlignedEmbedding(AlignmentSite, nn.Embedding):
    """An nn.Embedding that mixes in the aligned layer: h = E[id] + alpha * (E[id] W^T + b - E[id]).

    Made by `AlignedEmbedding.wrap(embedding)`, which turns the model's module into this class in place
    (the same object, the same `.weight`), so nothing else in the model changes.
    """

    layer_kind = "linear"
    _base_class = nn.Embedding

    @classmethod
    def wrap(cls, embedding: nn.Module, mode: str = "embed", cache_aligned_table: bool = False,
             dials: Optional[list] = None) -> "AlignedEmbedding":
        if dials is not None and mode != "embed":
            raise ValueError(f"named dials need mode 'embed' (one pass, an alpha vector per row), got mode {mode!r}")
        if isinstance(embedding, AlignedEmbedding):
            raise RuntimeError("this embedding already has an alignment layer")
        if not _is_supported_embedding(embedding):
            raise TypeError(
                f"cannot add an alignment layer to an input embedding of type {type(embedding).__name__}: "
                "expected torch.nn.Embedding (or a Gemma-style scaled word embedding)"
            )
        if embedding.max_norm is not None:
            raise ValueError("cannot add an alignment layer to an embedding with max_norm (it rewrites the table)")
        if dials is not None:
            _check_dial_names(dials, ())
        embedding.__class__ = _aligned_class(type(embedding))
        embedding._init_site(mode)
        embedding.cache_aligned_table = cache_aligned_table
        embedding._table, embedding._table_key = None, None
        embedding._token_alpha = None
        if dials is None:
            embedding.alignment = embedding._new_layer()
            embedding.reset_alignment()
        else:
            embedding.dials = nn.ModuleDict()
            embedding.add_dials(dials)
        return embedding

    def _new_layer(self) -> nn.Linear:
        """An identity d x d layer. A 16-bit table gets a float32 layer (master weights, cast per forward): W
        starts at I, and in bfloat16 an update below ~0.004 to a diagonal entry near 1 would round away."""
        d, w = self.embedding_dim, self.weight
        dtype = torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype
        layer = nn.Linear(d, d, bias=True, device=w.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(d))
            layer.bias.zero_()
        return layer

    @property
    def dial_names(self) -> Optional[list]:
        return list(self.dials) if "dials" in self._modules else None

    def add_dials(self, names) -> None:
        """New identity dials (alpha 0 in the current alpha, so the model's output does not change)."""
        if self.dial_names is None:
            raise ValueError("add_dials: the model has a single unnamed alignment layer; named dials can only be "
                             "added to a model made with add_alignment_control(model, dials=[...])")
        names = list(names)
        _check_dial_names(names, self.dial_names)
        for name in names:
            self.dials[name] = self._new_layer()
        alpha = self._alpha
        new = len(names)
        if alpha.dim() == 0:  # a site just made: every dial at 0
            self._alpha = torch.zeros(len(self.dials), device=self.weight.device)
        else:
            self._alpha = torch.cat([alpha, alpha.new_zeros(alpha.shape[:-1] + (new,))], dim=-1)
        self._table, self._table_key = None, None

    def dial(self, name: str) -> nn.Linear:
        """The layer of dial `name` (a clear error naming the model's dials if there is none)."""
        names = self.dial_names
        if names is None:
            raise ValueError(f"dial={name!r}: the model has a single unnamed alignment layer, no named dials")
        if name not in names:
            raise ValueError(f"dial={name!r}: the model has no such dial (its dials: {names})")
        return self.dials[name]

    def unwrap(self) -> nn.Embedding:
        """Turn the module back into its original class (the layer is dropped)."""
        if self.dial_names is None:
            del self.alignment
        else:
            del self.dials
        for name in ("mode", "_alpha", "_stream_rows", "_forward_params", "_labels", "_two_stream_hook_ids",
                     "cache_aligned_table", "_table", "_table_key", "_token_alpha"):
            self.__dict__.pop(name, None)
        self.__class__ = self._base_class
        return self

    def trainable(self) -> nn.Module:
        return self.alignment if self.dial_names is None else self.dials

    @torch.no_grad()
    def reset_alignment(self) -> None:
        """Back to the identity (W = I, b = 0; every dial's)."""
        if self.dial_names is not None:
            for layer in self.dials.values():
                layer.weight.copy_(torch.eye(self.embedding_dim))
                layer.bias.zero_()
            return
        self.alignment.weight.copy_(torch.eye(self.embedding_dim))
        self.alignment.bias.zero_()

    def _scale(self, h: Tensor) -> Tensor:
        scale = getattr(self, "embed_scale", None)
        return h if scale is None else h * scale.to(self.weight.dtype)

    def forward(self, input_ids: Tensor) -> Tensor:
        token_alpha = self._take_token_alpha(input_ids.numel())
        if token_alpha is not None:
            return self._forward_per_token(input_ids, token_alpha)
        if input_ids.dim() > 1 and self.mode == "logits":
            return self._scale(self._two_stream_rows(input_ids))
        alpha = self.row_alpha(input_ids.shape[0], self.weight.device) if input_ids.dim() > 1 else self.user_alpha(
            self.weight.device
        )
        return self._scale(self._mix(input_ids, alpha))

    def _two_stream_rows(self, input_ids: Tensor) -> Tensor:
        """Mode "logits": the unaligned half (alpha 0) is a plain lookup; only the aligned half runs the layer."""
        self._check_two_stream(input_ids.shape[0])
        half = input_ids.shape[0] // 2
        return torch.cat([self._lookup(input_ids[:half]), self._mix(input_ids[half:], 1.0)])

    def _mix(self, input_ids: Tensor, alpha) -> Tensor:
        if self.dial_names is not None:
            return self._mix_dials(input_ids, alpha)
        if self.cache_aligned_table and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return ops.embedding_lerp(input_ids, self.weight, self._aligned_table(), alpha)
        w, b = self._layer_in_table_dtype()
        if self._table_grad_has_options():
            return ops.alignment_mix(self._lookup(input_ids), w, b, alpha)
        return ops.embed_alignment_mix(input_ids, self.weight, w, b, alpha)

    def _mix_dials(self, input_ids: Tensor, alpha: Tensor) -> Tensor:
        """Every dial in one fused op; alpha is one vector [K] or one per sequence / token [rows, K]."""
        if self.cache_aligned_table and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return dial_ops.dial_embedding_lerp(input_ids, self.weight, self._aligned_table(), alpha)
        return dial_ops.dial_mix(self._lookup(input_ids), *self._layer_in_table_dtype(), alpha)

    def _lookup(self, input_ids: Tensor) -> Tensor:
        """E[id] as nn.Embedding computes it, its gradient honouring padding_idx, scale_grad_by_freq, sparse."""
        return nn.functional.embedding(
            input_ids, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse
        )

    def _table_grad_has_options(self) -> bool:
        """Whether the table trains with gradient options the fused op does not implement (it then gathers
        with nn.Embedding's own lookup and mixes with alignment_mix)."""
        return (
            self.weight.requires_grad
            and torch.is_grad_enabled()
            and (self.padding_idx is not None or self.scale_grad_by_freq or self.sparse)
        )

    def _apply(self, fn, recurse=True):
        """Casts reach the table; a cast to a 16-bit type leaves the layer in float32 (its master weights,
        as `wrap` made them), so `model.to(torch.bfloat16)` keeps the promise of a float32 layer."""

        def keep_float32(t: Tensor) -> Tensor:
            out = fn(t)
            if t.is_floating_point() and t.itemsize >= 4 and out.dtype in (torch.bfloat16, torch.float16):
                return t.to(device=out.device, dtype=torch.float32)
            return out

        super()._apply(fn, recurse=False)
        if recurse:
            for child in self.children():
                child._apply(keep_float32)
        return self

    def _forward_per_token(self, input_ids: Tensor, alpha: Tensor) -> Tensor:
        h = self._mix(input_ids.reshape(-1, 1), alpha)  # one row per token: the per-row alpha is per token
        return self._scale(h.reshape(*input_ids.shape, -1))

    def _layer_in_table_dtype(self) -> tuple:
        """(W, b) in the table's dtype: the fused op computes in one dtype; the cast is differentiable. With
        dials: the stacked (W [K, d, d], b [K, d]), differentiable too (a dial that trains gets its grad)."""
        if self.dial_names is None:
            return tuple(t.to(self.weight.dtype) for t in (self.alignment.weight, self.alignment.bias))
        layers = list(self.dials.values())
        return tuple(torch.stack([getattr(layer, name) for layer in layers]).to(self.weight.dtype)
                     for name in ("weight", "bias"))

    def _layer_tensors(self) -> tuple:
        layers = [self.alignment] if self.dial_names is None else list(self.dials.values())
        return tuple(t for layer in layers for t in (layer.weight, layer.bias))

    def refresh_aligned_table(self) -> None:
        """Rebuild the cached aligned table on the next call. Needed only after a write through `.data`
        (`weight.data.copy_(...)`), which bypasses the version counters the cache watches."""
        self._table, self._table_key = None, None

    def _aligned_table(self) -> Tensor:
        """E_a = E W^T + b (with dials: one such table per dial, [K, V, d]), rebuilt whenever the table or a
        layer changed (in place or replaced) in a way PyTorch tracks: a new tensor, or an in-place write that
        bumps its version counter."""
        tensors = (self.weight,) + self._layer_tensors()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._table_key != key:
            w, b = self._layer_in_table_dtype()
            if self.dial_names is None:
                self._table = ops.alignment_mix(self.weight.detach(), w, b, 1.0)
            else:
                self._table = torch.stack([ops.alignment_mix(self.weight.detach(), w[k], b[k], 1.0)
                                           for k in range(w.shape[0])])
            self._table_key = key
        return self._table

    @torch.no_grad()
    def folded_table(self, alpha) -> Tensor:
        """The embedding table with the layer folded in at `alpha` (what merge_alignment writes); with dials,
        `alpha` is one vector (a dict of dial alphas, or a [K] tensor)."""
        if self.dial_names is not None:
            vector = dial_alpha_tensor(alpha, self.dial_names, "merge_alignment: alpha").to(self.weight.device)
            if vector.dim() != 1:
                raise ValueError("merge_alignment: alpha must be one dict of dial alphas (a merged model has one "
                                 "setting)")
            return dial_ops.dial_mix(self.weight.detach(), *self._layer_in_table_dtype(), vector)
        return ops.alignment_mix(self.weight.detach(), *self._layer_in_table_dtype(), float(alpha))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alignment={self.layer_kind}, mode={self.mode}"


_DIAL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _check_dial_names(names, existing) -> None:
    """Dial names are identifiers (they are module names, file keys and JSON keys), unique in the model."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"dials must be a non-empty list of dial names, got {names!r}")
    seen = set(existing)
    for name in names:
        if not isinstance(name, str) or not _DIAL_NAME.fullmatch(name):
            raise ValueError(f"dials: {name!r} is not a usable dial name (a letter, then letters, digits, _ or -)")
        if name in _RESERVED_DIAL_NAMES:
            raise ValueError(f"dials: {name!r} is not a usable dial name (it is the name of a torch Module attribute)")
        if name in seen:
            raise ValueError(f"dials: the dial {name!r} " + ("exists already" if name in existing else "is given twice"))
        seen.add(name)


# Names nn.ModuleDict uses itself (a dial of that name could not be a module of it).
_RESERVED_DIAL_NAMES = frozenset(n for n in dir(nn.ModuleDict) if not n.startswith("_"))


def _aligned_class(base: type) -> type:
    """AlignedEmbedding for nn.Embedding; for a subclass (Gemma's scaled embedding) a subclass of both."""
    if base is nn.Embedding:
        return AlignedEmbedding
    if base not in _ALIGNED_CLASSES:
        name = f"Aligned{base.__name__}"
        cls = type(name, (AlignedEmbedding, base), {"_base_class": base, "__module__": __name__})
        globals()[name] = cls  # so pickle finds it by name
        _ALIGNED_CLASSES[base] = cls
    return _ALIGNED_CLASSES[base]


# ------------------------------------------------------------------------------------------------
# layer="block": the paper's decoder-block identity layer.


def _second_half(kwargs: dict, rows: int) -> dict:
    """The aligned stream's share of a decoder block's inputs: batch-dim tensors (also inside tuples, such
    as the rotary cos/sin) cut to their second half; broadcast or batch-free inputs unchanged."""

    def cut(value):
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return value[rows // 2:]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value

    return {name: cut(value) for name, value in kwargs.items()}


def _aligned_rows_only(layer) -> None:
    """The block's cache layer holds only the aligned stream's rows: beam search reorders the 2n rows of
    both streams at once (unaligned first), so this layer takes the second half of the index, shifted."""
    reorder = layer.reorder_cache

    def reorder_aligned(beam_idx: Tensor) -> None:
        n = beam_idx.shape[0] // 2
        reorder(beam_idx[n:] - n)

    layer.reorder_cache = reorder_aligned


def _zero_(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()


class AlignmentBlock(AlignmentSite):
    """A copy of decoder block 0 with o_proj and down_proj zeroed, mixed in before the first block.

    `hook` is registered as a forward pre-hook (with kwargs) on the first original block: it runs the new
    block with the same mask, rotary embeddings and cache, and replaces that block's input by
    x + alpha * (block(x) - x) per row (mode "embed"), or, in mode "logits", by block(x) for the aligned
    stream's rows while the unaligned stream skips the block. Its attention writes KV-cache slot
    `cache_index` (in mode "logits" only the aligned rows).
    """

    layer_kind = "block"

    def __init__(self, first_block: nn.Module, cache_index: int, mode: str = "embed"):
        super().__init__()
        self._init_site(mode)
        attn, mlp = getattr(first_block, "self_attn", None), getattr(first_block, "mlp", None)
        if not (isinstance(getattr(attn, "o_proj", None), nn.Linear) and isinstance(getattr(mlp, "down_proj", None), nn.Linear)):
            raise TypeError(
                f"layer='block' needs a decoder block with self_attn.o_proj and mlp.down_proj, "
                f"got {type(first_block).__name__}"
            )
        # The copy shares the model's config, as block 0 does: an attention implementation set on the model
        # later (a continuous-batching engine switches to paged attention) then reaches the new block too.
        configs = {id(m.config): m.config for m in first_block.modules() if hasattr(m, "config")}
        self.block = copy.deepcopy(first_block, configs)
        self.block.self_attn.layer_idx = cache_index
        self.cache_index = cache_index
        self.reset_alignment()

    def trainable(self) -> nn.Module:
        return self.block

    def reset_alignment(self) -> None:
        """Zero the output projections: the block adds nothing to the residual stream."""
        _zero_(self.block.self_attn.o_proj)
        _zero_(self.block.mlp.down_proj)

    def _cache_slot(self, cache) -> None:
        """Give the new block its own cache layer after the model's last one (a DynamicCache grows)."""
        layers = getattr(cache, "layers", None)
        if layers is None or getattr(cache, "layer_class_to_replicate", None) is not None:
            return  # no cache, or one that appends layers by itself
        if len(layers) > self.cache_index:
            return
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        first = layers[0]
        if len(layers) != self.cache_index or not isinstance(first, DynamicLayer):
            raise TypeError(
                f"layer='block' needs a DynamicCache (the new block adds a cache layer), got "
                f"{type(cache).__name__} with {type(first).__name__} layers"
            )
        if isinstance(first, DynamicSlidingWindowLayer):
            layer = DynamicSlidingWindowLayer(sliding_window=first.sliding_window)
        else:
            layer = DynamicLayer()
        if self.mode == "logits":
            _aligned_rows_only(layer)
        layers.append(layer)

    def _run_block(self, x: Tensor, kwargs: dict) -> Tensor:
        y = self.block(x, **kwargs)
        return y[0] if isinstance(y, tuple) else y

    def hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            x, args = args[0], args[1:]
        else:
            x = kwargs.pop("hidden_states")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            self._cache_slot(cache)
        if self.mode == "logits":
            # The unaligned stream (first half) skips the new block; the aligned half runs it.
            self._check_two_stream(x.shape[0])
            half = x.shape[0] // 2
            h = torch.cat([x[:half], self._run_block(x[half:], _second_half(kwargs, x.shape[0]))])
            return (h, *args), kwargs
        token_alpha = self._take_token_alpha(x.shape[:-1].numel())
        y = self._run_block(x, kwargs)
        if token_alpha is not None:  # one alpha per token of the packed row (clm_ext.serve)
            alpha = token_alpha.view(*x.shape[:-1], 1)
        else:
            alpha = self.row_alpha(x.shape[0], x.device)
            if alpha.dim():
                alpha = alpha.view(-1, *([1] * (x.dim() - 1)))
        h = x + (alpha * (y - x).to(alpha.dtype)).to(x.dtype)
        return (h, *args), kwargs

    def extra_repr(self) -> str:
        return f"alignment=block, mode={self.mode}, cache_index={self.cache_index}"
