"""The front door of a vLLM OpenAI server that serves the plugin: `--middleware
clm_ext.vllm.middleware.AlphaMiddleware`.

vLLM's OpenAI server forwards `vllm_xargs` to `SamplingParams.extra_args` but silently drops unknown
top-level fields, so a client written for `clm serve` (`extra_body={"alpha": a}`) would get the default
alpha without a word. This ASGI middleware moves a top-level `"alpha"` into `vllm_xargs.alpha` and answers
a bad alpha (not a finite number, or two different alphas) with a 400 that names the field. The prefix
cache salt is set from alpha further in, for every entry point (clm_ext/vllm/hooks.py).
"""
from __future__ import annotations

import json

from ..alpha import AlphaError, alpha_from_request

PATHS = ("/v1/completions", "/v1/chat/completions")


def rewrite(body: bytes) -> bytes:
    """The request body with a top-level alpha moved into vllm_xargs; AlphaError (naming the field) if
    an alpha is bad. A body that is not a JSON object passes unchanged (vLLM answers it)."""
    try:
        request = json.loads(body)
    except ValueError:
        return body
    if not isinstance(request, dict):
        return body
    alpha = alpha_from_request(request)
    if "alpha" not in request:
        return body
    del request["alpha"]
    request["vllm_xargs"] = {**(request.get("vllm_xargs") or {}), "alpha": alpha}
    return json.dumps(request).encode()


class AlphaMiddleware:
    """Pure ASGI middleware (no framework needed): buffers the body of completion requests, rewrites it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        try:
            body = rewrite(b"".join(chunks))
        except AlphaError as err:
            return await _bad_request(send, str(err), err.param)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _bad_request(send, message: str, param: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
