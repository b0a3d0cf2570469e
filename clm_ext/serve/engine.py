"""The serving engine: transformers' continuous batching with the dial turned per request.

One `ContinuousBatchingManager` (paged KV cache, chunked prefill, its own generation thread) runs every
request; `BatchHooks` give each token its request's alpha and sample per request. Block (prefix) sharing is
off: the KV cache depends on alpha, and the engine keys shared blocks on tokens only, so two requests with
one prompt and different alphas would otherwise share keys and values computed at the wrong alpha.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from ..layer import AlignedEmbedding
from ..model import alignment_site
from ..versions import SERVE_TRANSFORMERS, require
from .batch_hooks import BatchHooks, RequestSpec, RequestTable


class QueueFull(Exception):
    """More requests in flight than --max-queue allows."""


@dataclass
class EngineConfig:
    """Cache sizing: the engine's defaults size the paged cache for far more than a small deployment needs."""

    max_queue: int = 64  # requests admitted at once (running or waiting); more get HTTP 429
    page_size: int = 64  # tokens per cache page
    num_blocks: int = 128  # cache capacity in pages (per layer): num_blocks * page_size tokens in all
    max_batch_tokens: int = 256  # tokens per forward (chunked prefill splits longer prompts)


@dataclass
class Step:
    """One update of a request: all tokens generated so far, and whether it is done (error: it failed)."""

    tokens: list
    finished: bool
    error: Optional[str] = None


class Engine:
    """Submit token ids with a RequestSpec; iterate over Steps. Thread-safe submission from one event loop."""

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig()):
        require("transformers", SERVE_TRANSFORMERS, "clm serve")
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        site = alignment_site(model)
        if not isinstance(site, AlignedEmbedding) or site.mode != "embed":
            kind = "none" if site is None else f"layer={site.layer_kind!r}, mode={site.mode!r}"
            raise ValueError(
                f"clm serve serves the linear alignment layer in mode 'embed' (one alpha per token in the paged "
                f"engine); this model has {kind}. The block layer needs its own cache slot and mode 'logits' two "
                "streams per request, which the paged engine cannot hold: load the layer with mode='embed', or "
                "use clm_ext.generate for those."
            )
        self.model, self.tokenizer, self.config = model, tokenizer, config
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        self.eos_token_id = -1 if eos is None else eos
        generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=16, eos_token_id=self.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=config.page_size,
            num_blocks=config.num_blocks,
            max_batch_tokens=config.max_batch_tokens,
            max_requests_per_batch=config.max_queue,
            allow_block_sharing=False,  # the KV cache depends on alpha (module docstring)
            use_async_batching=False,  # the hooks read the batch being run, not the next one being prepared
            use_cuda_graph=False,  # graphs would freeze the per-token alpha of the captured batch
            auto_switch_to_flash=False,
        )
        self.table = RequestTable()
        self.manager = model.init_continuous_batching(generation_config=generation_config,
                                                      continuous_batching_config=cb_config)
        self.hooks = BatchHooks(model, site, self.manager, self.table)
        self.max_context = min(config.num_blocks * config.page_size,
                               getattr(model.config.get_text_config(), "max_position_embeddings", None) or 10**9)
        self._ids = itertools.count()
        self._in_flight = 0
        self._lock = threading.Lock()
        self.manager.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def healthy(self) -> bool:
        return self.manager.is_running() and self.manager.background_thread_status.fatal_error is None

    def use_prefix_sharing(self) -> bool:
        """What the engine's cache actually does (False: every request computes its own KV)."""
        processor = self.manager.batch_processor
        return bool(processor is not None and processor.cache.use_prefix_sharing)

    def stop(self) -> None:
        self.hooks.remove()
        self.manager.stop(block=True, timeout=10)
        self.manager.destroy()

    async def generate(self, prompt_ids: list, spec: RequestSpec, max_new_tokens: int,
                       stream: bool = False) -> AsyncIterator[Step]:
        """Yield Steps (every token when stream, else only the last); cancel the request if abandoned."""
        with self._lock:
            if self._in_flight >= self.config.max_queue:
                raise QueueFull(f"{self._in_flight} requests in flight (--max-queue {self.config.max_queue})")
            self._in_flight += 1
        request_id = f"clm_{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        finished = False
        try:
            self.table.add(request_id, spec)
            self.manager.register_result_handler(request_id, queue.put_nowait)
            submitted = self.manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=max_new_tokens,
                                                 streaming=stream, eos_token_id=self.eos_token_id)
            if submitted is None:
                raise RuntimeError("the generation engine is not accepting requests (it stopped)")
            while not finished:
                output = await queue.get()
                finished = output.is_finished()
                error = output.error if output.status.name == "FAILED" else None
                yield Step(list(output.generated_tokens), finished, error)
        finally:
            if finished:
                self.table.finish(request_id)
            else:  # the caller went away (client disconnect, stop string): free the engine's slot
                self.table.cancel(request_id)
                self.manager.cancel_request(request_id)
                with self.manager.output_router._lock:
                    self.manager.output_router.result_handlers.pop(request_id, None)
            with self._lock:
                self._in_flight -= 1
