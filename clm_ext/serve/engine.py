"""The serving engine: transformers' continuous batching with the dial turned per request.

One `ContinuousBatchingManager` (paged KV cache, chunked prefill, its own generation thread) runs every
request; `BatchHooks` give each token its request's alpha and sample per request. The alignment site is the
linear layer or the block; the block's attention gets its own layer in the paged cache (one more than the
model has), as it gets its own slot in `generate`'s cache. Merge 'embed' (one stream, alpha per token at the
layer) or 'logits' (two streams per request in every forward, logits mixed: clm_ext.serve.two_streams).
Block (prefix) sharing is off: the KV cache depends on alpha, and the engine keys shared blocks on tokens
only, so two requests with one prompt and different alphas would otherwise share keys and values computed
at the wrong alpha.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from ..layer import AlignedEmbedding, AlignmentBlock
from ..model import alignment_site
from ..versions import SERVE_TRANSFORMERS, require
from .batch_hooks import BatchHooks, RequestSpec, RequestTable
from .two_streams import TwoStreams

MERGES = ("embed", "logits")


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

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), merge: str = "embed"):
        require("transformers", SERVE_TRANSFORMERS, "clm serve")
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        site = alignment_site(model)
        if not isinstance(site, (AlignedEmbedding, AlignmentBlock)) or site.mode != "embed":
            kind = "none" if site is None else f"layer={site.layer_kind!r}, mode={site.mode!r}"
            raise ValueError(
                f"clm serve serves an alignment layer (linear or block) loaded in mode 'embed' (one alpha per "
                f"token in the paged engine); this model has {kind}. For two streams per request load the layer "
                "with mode='embed' and pass merge='logits'."
            )
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if merge == "logits" and site.dial_names is not None:
            raise ValueError("merge 'logits' mixes two streams of one dial; named dials are served in merge 'embed'")
        self.merge = merge
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
        layers = _cache_layers(model, site)
        self.two_streams = TwoStreams(model, site, layers) if merge == "logits" else None
        _size_cache(self.manager, model, layers, streams=2 if self.two_streams else 1)
        self.hooks = BatchHooks(model, site, self.manager, self.table, alpha_to=self.two_streams)
        self.max_context = min(config.num_blocks * config.page_size,
                               getattr(model.config.get_text_config(), "max_position_embeddings", None) or 10**9)
        self._ids = itertools.count()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.manager.start()
        while self.manager.batch_processor is None and self.manager.is_running():
            time.sleep(0.01)  # the cache exists (and the config is the model's again) when __init__ returns
        if not self.healthy():
            raise RuntimeError(f"clm serve: the generation engine failed to start: {self.fatal_error()}")

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def healthy(self) -> bool:
        return self.manager.is_running() and self.manager.background_thread_status.fatal_error is None

    def use_prefix_sharing(self) -> bool:
        """What the engine's cache actually does (False: every request computes its own KV)."""
        processor = self.manager.batch_processor
        return bool(processor is not None and processor.cache.use_prefix_sharing)

    def fatal_error(self) -> Optional[BaseException]:
        """What stopped the generation thread (None while it runs or after a requested stop)."""
        return self.manager.background_thread_status.fatal_error

    def watch(self, on_death: Callable[[str], None], interval: float = 0.5) -> threading.Thread:
        """Call on_death(reason) from a daemon thread if the generation thread dies before stop(): requests
        can then never finish, so the server should exit (non-zero) for a supervisor to restart it."""

        def run():
            while not self._stopping.wait(interval):
                if not self.healthy():
                    error = self.fatal_error()
                    on_death("the generation thread stopped" + (f": {type(error).__name__}: {error}" if error else ""))
                    return

        thread = threading.Thread(target=run, name="clm-serve-engine-watch", daemon=True)
        thread.start()
        return thread

    def admit(self) -> "Admission":
        """A place among the --max-queue requests in flight, taken before the request is answered (streams
        included); QueueFull when there is none. The place is given back by generate() or release()."""
        with self._lock:
            if self._in_flight >= self.config.max_queue:
                raise QueueFull(f"{self._in_flight} requests in flight (--max-queue {self.config.max_queue})")
            self._in_flight += 1
        return Admission(self)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.hooks.remove()
        if self.two_streams is not None:
            self.two_streams.remove()
        self.manager.stop(block=True, timeout=10)
        self.manager.destroy()

    async def generate(self, prompt_ids: list, spec: RequestSpec, max_new_tokens: int,
                       stream: bool = False, admission: Optional["Admission"] = None) -> AsyncIterator[Step]:
        """Yield Steps (every token when stream, else only the last); cancel the request if abandoned. Takes a
        place in the queue (QueueFull) unless given the `admission` of one taken before; gives it back."""
        admission = admission or self.admit()
        request_id = f"clm_{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        spec.fail = lambda message: loop.call_soon_threadsafe(queue.put_nowait, _Failed(message))
        finished = False
        try:
            self.table.add(request_id, spec)
            self.manager.register_result_handler(request_id, queue.put_nowait)
            submitted = self.manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=max_new_tokens,
                                                 streaming=stream, eos_token_id=self.eos_token_id)
            if submitted is None:
                raise RuntimeError("the generation engine is not accepting requests (it stopped)")
            tokens: list = []
            while not finished:
                output = await queue.get()
                if isinstance(output, _Failed):  # this request alone failed: leave it (cancelled below)
                    yield Step(tokens, True, output.message)
                    return
                finished = output.is_finished()
                error = output.error if output.status.name == "FAILED" else None
                tokens = list(output.generated_tokens)
                yield Step(tokens, finished, error)
        finally:
            if finished:
                self.table.finish(request_id)
            else:  # the caller went away (client disconnect, stop string) or the request failed: free its slot
                self.table.cancel(request_id)
                self.manager.cancel_request(request_id)
                with self.manager.output_router._lock:
                    self.manager.output_router.result_handlers.pop(request_id, None)
            admission.release()


class Admission:
    """One place among the requests in flight; release() gives it back (once, whoever calls it first)."""

    def __init__(self, engine: Engine):
        self._engine, self._held, self._lock = engine, True, threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._engine._leave()


@dataclass
class _Failed:
    message: str


def _cache_layers(model, site) -> int:
    """Cache layers of one stream: the model's, and the block's own after them (index site.cache_index)."""
    layers = model.config.get_text_config().num_hidden_layers
    if isinstance(site, AlignmentBlock):
        if site.cache_index != layers:
            raise ValueError(f"the alignment block's cache slot is {site.cache_index}, expected the model's layer "
                             f"count {layers}")
        return layers + 1
    return layers


def _size_cache(manager, model, layers: int, streams: int) -> None:
    """Make the paged cache hold `streams` x `layers` layers: the manager sizes it from the text config, which
    counts the model's layers only. The config says so while the generation thread builds the cache, and is
    restored right after."""
    config = model.config.get_text_config()
    if streams * layers == config.num_hidden_layers:
        return
    create = manager._create_batch_processor

    def create_with_more_layers():
        with _layer_count(config, layers, streams):
            return create()

    manager._create_batch_processor = create_with_more_layers


@contextlib.contextmanager
def _layer_count(config, layers: int, streams: int):
    """Each stream's layers: the model's, then the block's (a copy of block 0: its attention type too)."""
    model_layers, types = config.num_hidden_layers, getattr(config, "layer_types", None)
    config.num_hidden_layers = streams * layers
    if types is not None:
        config.layer_types = [*types, *types[:layers - model_layers]] * streams
    try:
        yield
    finally:
        config.num_hidden_layers = model_layers
        if types is not None:
            config.layer_types = types
