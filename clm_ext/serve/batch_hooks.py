"""The dial inside transformers' continuous batching: a per-token alpha and per-request sampling.

The engine packs the tokens of every scheduled request into one row `[1, T]`; `cu_seq_lens_q` marks where
each request's tokens start, in the order of the batch processor's `requests_in_batch`. A forward pre-hook
on the causal LM reads both and hands the alignment site (the linear layer or the block) one alpha per
token; a forward hook samples the rows of requests that asked for sampling, all in one batched step with
each request's own temperature, top_p and generator (clm_ext.serve.sampling), and leaves the engine's argmax
to pick that token, so greedy and sampled requests share a batch. A request whose sampling fails is failed
alone (its `RequestSpec.fail`); the engine keeps running.

Internals of transformers read here (tests/test_serve.py checks them, so an upgrade fails a test, not a
request): `manager.batch_processor.inputs_and_outputs.requests_in_batch` (FutureRequestState: `.state.
request_id`, `.query_length`, `.has_new_token`), the forward kwargs `cu_seq_lens_q`, `logits_indices`,
`logits_to_keep`, and forked samples named "{id}__child#i".
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from ..generation import is_greedy
from .sampling import draw_uniform, sample_rows

CHILD_SEPARATOR = "__child#"


@dataclass
class RequestSpec:
    """What one request asked for: its alpha and how to pick its tokens (below GREEDY_BELOW: greedy).

    `fail(message)`, set by the engine, ends this request with an error; `failed` then skips its sampling.
    """

    alpha: Union[float, tuple]  # with named dials: one value per dial, in the model's order
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = field(default=None, repr=False)
    fail: Optional[Callable[[str], None]] = field(default=None, repr=False)
    failed: bool = False

    def __post_init__(self):
        if self.samples:
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            else:
                self.generator.seed()

    @property
    def samples(self) -> bool:
        return not is_greedy(self.temperature)

    def fail_request(self, message: str) -> None:
        if not self.failed:
            self.failed = True
            if self.fail is not None:
                self.fail(message)


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
    """Installs the two hooks on a causal LM whose alignment layer (linear or block) runs in mode 'embed'."""

    def __init__(self, model, site, manager, table: RequestTable, alpha_to=None):
        self.site, self.manager, self.table = site, manager, table
        self.alpha_to = site if alpha_to is None else alpha_to  # TwoStreams for merge 'logits'; else the layer
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
        lengths = [fs.query_length for fs in requests]
        if bounds[len(requests)] != sum(lengths) or any(b - a != n for a, b, n in zip(bounds, bounds[1:], lengths)):
            raise RuntimeError(
                f"clm serve: query lengths {lengths} do not match cu_seq_lens_q {bounds}: the engine packs "
                "batches differently than expected"
            )
        alpha = torch.repeat_interleave(torch.tensor([spec.alpha for spec in specs], dtype=torch.float32),
                                        torch.tensor(lengths), dim=0)
        padding = kwargs["input_ids"].numel() - alpha.shape[0]
        if padding > 0:  # tokens after the last request: alpha 0
            alpha = torch.cat([alpha, alpha.new_zeros((padding, *alpha.shape[1:]))])
        self.alpha_to.set_token_alpha(alpha)
        self.mixed_forwards += len({spec.alpha for spec in specs}) > 1
        self._batch = [(fs, spec) for fs, spec in zip(requests, specs) if fs.has_new_token]
        return None

    def _sample(self, model, args, kwargs, output):
        sampled = [(row, spec) for row, (_, spec) in enumerate(self._batch) if spec.samples and not spec.failed]
        self._batch = []
        if not sampled:
            return None
        logits = output.logits  # [1, rows or T, V]
        if "logits_to_keep" in kwargs:
            positions = torch.tensor([row for row, _ in sampled], device=logits.device)
        else:
            positions = kwargs["logits_indices"][[row for row, _ in sampled]].to(logits.device)
        specs = [spec for _, spec in sampled]
        try:
            tokens, ok = _sample_specs(logits[0, positions], specs)
        except Exception:  # find the request(s) at fault, sample the others, fail those alone
            tokens, ok = [], []
            for position, spec in zip(positions.tolist(), specs):
                try:
                    token, good = _sample_specs(logits[0, position:position + 1], [spec])
                except Exception as e:
                    token, good = torch.zeros(1, dtype=torch.long, device=logits.device), torch.tensor([False])
                    spec.fail_request(f"sampling failed: {type(e).__name__}: {e}")
                tokens.append(token)
                ok.append(good.to(logits.device))
            tokens, ok = torch.cat(tokens), torch.cat(ok)
        if not bool(ok.all()):
            for spec, good in zip(specs, ok.tolist()):
                if not good:
                    spec.fail_request("the model's logits for this request are not finite: cannot sample")
        # The engine's argmax now picks each sampled token (an infinite logit: one write per row, not a row).
        logits[0, positions, tokens.to(logits.device)] = float("inf")
        return output


def _sample_specs(logits, specs: list) -> tuple:
    """sample_rows for these requests' rows, with their temperatures, top_ps and generators."""
    temperature = torch.tensor([spec.temperature for spec in specs], dtype=torch.float32)
    top_p = torch.tensor([spec.top_p for spec in specs], dtype=torch.float32)
    return sample_rows(logits, temperature, top_p, draw_uniform([spec.generator for spec in specs]))
