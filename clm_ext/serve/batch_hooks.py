"""The dial inside transformers' continuous batching: a per-token alpha and per-request sampling.

The engine packs the tokens of every scheduled request into one row `[1, T]`; `cu_seq_lens_q` marks where
each request's tokens start, in the order of the batch processor's `requests_in_batch`. A forward pre-hook
on the causal LM reads both and hands the alignment layer one alpha per token; a forward hook samples the
rows of requests that asked for sampling with their own generator (temperature, top_p, seed) and leaves
the engine's argmax to pick that token, so greedy and sampled requests share a batch.

Internals of transformers read here (tests/test_serve.py checks them, so an upgrade fails a test, not a
request): `manager.batch_processor.inputs_and_outputs.requests_in_batch` (FutureRequestState: `.state.
request_id`, `.query_length`, `.has_new_token`), the forward kwargs `cu_seq_lens_q`, `logits_indices`,
`logits_to_keep`, and forked samples named "{id}__child#i".
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

CHILD_SEPARATOR = "__child#"


@dataclass
class RequestSpec:
    """What one request asked for: its alpha and how to pick its tokens (temperature 0 is greedy)."""

    alpha: Union[float, tuple]  # with named dials: one value per dial, in the model's order
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = field(default=None, repr=False)

    def __post_init__(self):
        if self.temperature > 0:
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            else:
                self.generator.seed()


class RequestTable:
    """request id -> RequestSpec, shared by the server (writes) and the generation thread (reads).

    A cancelled request may still sit in the batch the engine is preparing when the cancel arrives; the
    engine drops it at the start of the batch after. So a cancelled entry stays until two more forwards
    have run without it, instead of vanishing under a forward that still needs its alpha.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._specs: dict[str, RequestSpec] = {}
        self._cancelled: dict[str, int] = {}  # id -> forward count when cancelled
        self.forwards = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._specs)

    def add(self, request_id: str, spec: RequestSpec) -> None:
        with self._lock:
            self._specs[request_id] = spec

    def finish(self, request_id: str) -> None:
        """A finished request is never scheduled again: drop it now."""
        with self._lock:
            self._specs.pop(request_id, None)
            self._cancelled.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._specs:
                self._cancelled[request_id] = self.forwards

    def lookup(self, request_ids: list) -> list:
        """The specs of the requests in a batch (a forked child takes its parent's); retire old cancels."""
        with self._lock:
            self.forwards += 1
            in_batch = {_parent(r) for r in request_ids}
            for rid, when in list(self._cancelled.items()):
                if self.forwards - when >= 2 and rid not in in_batch:
                    self._specs.pop(rid, None)
                    del self._cancelled[rid]
            try:
                return [self._specs[_parent(r)] for r in request_ids]
            except KeyError as e:
                raise RuntimeError(f"clm serve: request {e.args[0]} is in the batch but has no alpha") from None


def _parent(request_id: str) -> str:
    return request_id.split(CHILD_SEPARATOR, 1)[0]


class BatchHooks:
    """Installs the two hooks on a causal LM whose alignment layer is an AlignedEmbedding in mode 'embed'."""

    def __init__(self, model, site, manager, table: RequestTable):
        self.site, self.manager, self.table = site, manager, table
        self._batch: list = []
        self.mixed_forwards = 0  # forwards whose requests carried more than one alpha (shown by /health)
        self._handles = (
            model.register_forward_pre_hook(self._set_token_alpha, with_kwargs=True),
            model.register_forward_hook(self._sample, with_kwargs=True),
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _set_token_alpha(self, model, args, kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:  # not a continuous-batching forward (a plain call of the model): leave it alone
            self._batch = []
            return None
        requests = self.manager.batch_processor.inputs_and_outputs.requests_in_batch
        bounds = cu.tolist()
        if len(bounds) < len(requests) + 1:
            raise RuntimeError(f"clm serve: {len(requests)} requests in the batch but cu_seq_lens_q has {len(bounds)} entries")
        specs = self.table.lookup([fs.state.request_id for fs in requests])
        dials = self.site.dial_names
        tokens = kwargs["input_ids"].numel()
        alpha = torch.zeros((tokens,) if dials is None else (tokens, len(dials)), dtype=torch.float32)
        for i, (fs, spec) in enumerate(zip(requests, specs)):
            start, end = bounds[i], bounds[i + 1]
            if end - start != fs.query_length:
                raise RuntimeError(
                    f"clm serve: request {fs.state.request_id} has {fs.query_length} query tokens but "
                    f"cu_seq_lens_q gives {end - start}: the engine packs batches differently than expected"
                )
            alpha[start:end] = torch.tensor(spec.alpha)
        self.site.set_token_alpha(alpha)
        self.mixed_forwards += len({spec.alpha for spec in specs}) > 1
        self._batch = [(fs, spec) for fs, spec in zip(requests, specs) if fs.has_new_token]
        return None

    def _sample(self, model, args, kwargs, output):
        sampled = [(row, spec) for row, (_, spec) in enumerate(self._batch) if spec.temperature > 0]
        self._batch = []
        if not sampled:
            return None
        logits = output.logits  # [1, rows or T, V]
        if "logits_to_keep" in kwargs:
            rows = torch.arange(logits.shape[1])
        else:
            rows = kwargs["logits_indices"]
        for row, spec in sampled:
            position = int(rows[row])
            token = _sample_token(logits[0, position].float(), spec)
            chosen = torch.full_like(logits[0, position], float("-inf"))
            chosen[token] = 0.0
            logits[0, position] = chosen  # the engine's argmax now picks the sampled token
        return output


def _sample_token(logits: Tensor, spec: RequestSpec) -> int:
    probs = torch.softmax(logits / spec.temperature, dim=-1)
    if spec.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < spec.top_p  # the smallest set reaching top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
    return int(torch.multinomial(probs, 1, generator=spec.generator))
