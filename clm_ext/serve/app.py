"""The OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions (SSE streaming or not),
/v1/models, /health. Every request carries its own alpha; a bad request gets a 4xx naming the field and
never reaches the engine."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from contextlib import aclosing
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .batch_hooks import RequestSpec
from .engine import Admission, Engine, QueueFull
from .protocol import BadRequest, Limits, Parsed, check_length, parse_body, parse_request


def error_response(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def create_app(engine: Engine, limits: Limits, alignment: str = "identity") -> FastAPI:
    """`alignment` describes the layer served (shown by /health and /v1/models)."""
    app = FastAPI(title="clm serve")
    tokenizer = engine.tokenizer
    started = int(time.time())

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        ok = engine.healthy()
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": limits.model_name,
                             "alignment": alignment, "in_flight": engine.in_flight, "alpha_table": len(engine.table),
                             "mixed_alpha_forwards": engine.hooks.mixed_forwards,
                             "prefix_sharing": engine.use_prefix_sharing()}, 200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": limits.model_name, "object": "model", "created": started, "owned_by": "clm-ext",
            "alignment": alignment, "alpha_default": limits.alpha_default, "alpha_range": list(limits.alpha_range),
            "max_model_len": limits.max_context, **({"dials": list(limits.dials)} if limits.dials else {}),
        }]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, chat=True)

    async def _serve(request: Request, chat: bool):
        try:
            body = parse_body(await request.body())
            parsed = parse_request(body, limits, chat)
            prompt_ids = _prompt_ids(tokenizer, parsed)
            check_length(len(prompt_ids), parsed.max_tokens, limits, "messages" if chat else "prompt")
        except BadRequest as e:
            return error_response(e.status, e.message, e.param)
        try:  # count the request in flight first, then decide: a stream holds its place before it starts
            admission = engine.admit()
        except QueueFull as e:
            return error_response(429, f"server busy: {e}; retry later")
        spec = RequestSpec(parsed.alpha, parsed.temperature, parsed.top_p, parsed.seed)
        run = _Run(engine, tokenizer, prompt_ids, parsed, spec, chat, limits.model_name, admission)
        if parsed.stream:
            events = run.sse()
            weakref.finalize(events, admission.release)  # a stream dropped before its first event
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            return await run.respond(request)
        finally:
            admission.release()

    return app


def _prompt_ids(tokenizer, parsed: Parsed) -> list:
    if parsed.prompt is not None:
        return tokenizer(parsed.prompt)["input_ids"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRequest("this model's tokenizer has no chat template: use /v1/completions", "messages")
    text = tokenizer.apply_chat_template(parsed.messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _Run:
    """One request through the engine: text so far, stop strings, finish reason, OpenAI-shaped output."""

    def __init__(self, engine, tokenizer, prompt_ids, parsed: Parsed, spec, chat: bool, model_name: str,
                 admission: Admission):
        self.engine, self.tokenizer, self.prompt_ids, self.parsed, self.spec = engine, tokenizer, prompt_ids, parsed, spec
        self.admission = admission
        self.chat, self.model_name = chat, model_name
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text, self.tokens, self.finish_reason = "", [], None

    def _alpha(self):
        """The request's alpha as the client sent it: a number, or {dial: value} for named dials."""
        dials = self.engine.hooks.site.dial_names
        return self.spec.alpha if dials is None else dict(zip(dials, self.spec.alpha))

    async def _steps(self):
        """Yield the text added by each engine step; sets finish_reason when done."""
        stream = self.parsed.stream or bool(self.parsed.stop)
        steps = self.engine.generate(self.prompt_ids, self.spec, self.parsed.max_tokens, stream, self.admission)
        async with aclosing(steps) as steps:
            async for step in steps:
                if step.error:
                    raise RuntimeError(f"generation failed: {step.error}")
                self.tokens = step.tokens
                text = self.tokenizer.decode(step.tokens, skip_special_tokens=True)
                cut = _first_stop(text, self.parsed.stop)
                if cut is not None:
                    text, self.finish_reason = text[:cut], "stop"
                elif step.finished:
                    hit_eos = bool(step.tokens) and step.tokens[-1] == self.engine.eos_token_id
                    self.finish_reason = "length" if len(step.tokens) >= self.parsed.max_tokens and not hit_eos else "stop"
                else:
                    # Hold back an incomplete UTF-8 character and any tail that may begin a stop string.
                    text = text[:len(text) - _held_back(text, self.parsed.stop)]
                    if len(text) <= len(self.text):
                        continue
                delta, self.text = text[len(self.text):], text
                yield delta
                if self.finish_reason is not None:
                    return  # leaving the engine's generator early cancels the request (stop string)

    def _usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt_ids) + len(self.tokens)}

    async def respond(self, request: Request):
        """Non-streaming: the whole completion, or a cancel when the client disconnects first."""
        async def consume():
            async with aclosing(self._steps()) as deltas:
                async for _ in deltas:
                    pass

        work = asyncio.ensure_future(consume())
        while not work.done():
            await asyncio.wait([work], timeout=0.25)
            if not work.done() and await request.is_disconnected():
                work.cancel()  # closes the engine generator: the request is cancelled there
                return error_response(499, "client disconnected")
        work.result()
        choice = {"index": 0, "finish_reason": self.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": self.text}
        else:
            choice["text"] = self.text
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model_name, "choices": [choice], "usage": self._usage(), "alpha": self._alpha()}

    def _chunk(self, delta: Optional[str], finish_reason=None, role: bool = False) -> str:
        if self.chat:
            content = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": content, "finish_reason": finish_reason, "logprobs": None}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
            kind = "text_completion"
        payload = {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                   "choices": [choice], "alpha": self._alpha()}
        return f"data: {json.dumps(payload)}\n\n"

    async def sse(self):
        """Streaming: one SSE event per step, a last one with the finish reason, then [DONE]. A client that
        disconnects closes this generator, which cancels the request in the engine."""
        try:
            if self.chat:
                yield self._chunk(None, role=True)
            async with aclosing(self._steps()) as deltas:
                async for delta in deltas:
                    if delta:
                        yield self._chunk(delta)
            yield self._chunk(None if self.chat else "", self.finish_reason)
        except RuntimeError as e:
            yield f"data: {json.dumps({'error': {'message': str(e), 'code': 500}})}\n\n"
        finally:
            self.admission.release()
        yield "data: [DONE]\n\n"


def _held_back(text: str, stops: list) -> int:
    if text.endswith("\ufffd"):
        return 1
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _first_stop(text: str, stops: list) -> Optional[int]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None
