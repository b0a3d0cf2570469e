"""The front door of a vLLM OpenAI server that serves the plugin: `--middleware
clm_ext.vllm.middleware.AlphaMiddleware`.

vLLM's OpenAI server forwards `vllm_xargs` to `SamplingParams.extra_args` but silently drops unknown
top-level fields, so a client written for `clm serve` (`extra_body={"alpha": a}`) would get the default
alpha without a word. This ASGI middleware moves a top-level `"alpha"` (a number, or {dial: number} for a
model with named dials) into `vllm_xargs.alpha` (a dial vector as the flat list [dial, value, ...], since
vLLM's schema for vllm_xargs holds no objects; `vllm_xargs.alpha` sent as an object is flattened too) and answers a bad alpha (not a finite number, or two
different alphas) with a 400 that names the field; which dials exist is checked further in, where the model's
config is known, as is the prefix cache salt, for every entry point (clm_ext/vllm/hooks.py). It also adds the
dial's settings to `/v1/models`, as `clm serve` lists them: `alpha_default`, `alpha_range` and `dials`.
"""
from __future__ import annotations

import json
import os

from ..alpha import FLOAT32_MAX, AlphaError, alpha_from_request, alpha_number
from ..vllm_format import CONFIG_KEY

PATHS = ("/v1/completions", "/v1/chat/completions")
MODELS_PATH = "/v1/models"


def _alpha_value(value, name: str):
    """A number, or {dial name: number} (the dial names are the engine's to check)."""
    if isinstance(value, dict):
        return {key: alpha_number(v, f"{name}[{key!r}]") for key, v in value.items()}
    return alpha_number(value, name, expected="a number or an object of dial alphas")


def rewrite(body: bytes) -> bytes:
    """The request body with a top-level alpha moved into vllm_xargs; AlphaError (naming the field) if
    an alpha is bad. A body that is not a JSON object passes unchanged (vLLM answers it)."""
    try:
        request = json.loads(body)
    except ValueError:
        return body
    if not isinstance(request, dict):
        return body
    alpha = alpha_from_request(request, _alpha_value)
    if "alpha" not in request and not isinstance(alpha, dict):
        return body
    request.pop("alpha", None)
    flat = [item for pair in alpha.items() for item in pair] if isinstance(alpha, dict) else alpha
    request["vllm_xargs"] = {**(request.get("vllm_xargs") or {}), "alpha": flat}
    return json.dumps(request).encode()


def with_dial_settings(body: bytes) -> bytes:
    """A /v1/models answer with each plugin model's dial settings, read from its checkpoint's config.json
    (the model card's `root`); other models and unreadable answers pass unchanged."""
    try:
        answer = json.loads(body)
        cards = answer["data"]
    except (ValueError, KeyError, TypeError):
        return body
    for card in cards if isinstance(cards, list) else ():
        try:
            with open(os.path.join(card["root"], "config.json")) as f:
                info = json.load(f)[CONFIG_KEY]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        card.update(alignment=info.get("layer"), alpha_default=info.get("default_alpha"),
                    alpha_range=[-FLOAT32_MAX, FLOAT32_MAX], **({"dials": info["dials"]} if "dials" in info else {}))
    return json.dumps(answer).encode()


class AlphaMiddleware:
    """Pure ASGI middleware (no framework needed): buffers the body of completion requests, rewrites it;
    adds the dial settings to the model list."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path") == MODELS_PATH:
            return await self.app(scope, receive, _rewritten_answer(send, with_dial_settings))
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


def _rewritten_answer(send, edit):
    """A `send` that holds the response back until its body is complete, then sends `edit(body)` with the
    matching content-length."""
    start, chunks = None, []

    async def send_edited(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return None
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        body = edit(b"".join(chunks)) if start["status"] == 200 else b"".join(chunks)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        return await send({"type": "http.response.body", "body": body})

    return send_edited


async def _bad_request(send, message: str, param: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
