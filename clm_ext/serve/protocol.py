"""OpenAI request bodies -> what the engine needs, with a 4xx naming the field for anything wrong.

The dial is a top-level "alpha" (the `openai` client's `extra_body={"alpha": a}`) or "vllm_xargs":
{"alpha": a} (what clients of a vLLM deployment send); it is never silently dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..alpha import AlphaError, alpha_from_request, show

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "functions", "response_format")


class BadRequest(Exception):
    """A client error: HTTP `status`, a message, and the request field it is about."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclass
class Limits:
    """What the server accepts: its model name, the alpha range and default, the context it can hold."""

    model_name: str
    alpha_default: float = 1.0
    alpha_range: tuple = (-2.0, 4.0)
    max_context: int = 2048


@dataclass
class Parsed:
    alpha: float
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: list = field(default_factory=list)
    stream: bool = False
    prompt: Optional[str] = None  # completions
    messages: Optional[list] = None  # chat


def parse_request(body, limits: Limits, chat: bool) -> Parsed:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is None:
        raise BadRequest("'model' is required", "model")
    if model != limits.model_name:
        raise BadRequest(f"model {model!r} not found; this server serves {limits.model_name!r}", "model", 404)
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0):
            raise BadRequest(f"'{name}' is not supported by clm serve", name)
    if body.get("n", 1) != 1:
        raise BadRequest(f"'n' must be 1 (one completion per request), got {body.get('n')!r}", "n")
    parsed = Parsed(
        alpha=_alpha(body, limits),
        max_tokens=_max_tokens(body, chat),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_seed(body),
        stop=_stop(body),
        stream=_flag(body, "stream"),
    )
    if chat:
        parsed.messages = _messages(body)
    else:
        parsed.prompt = _prompt(body)
    return parsed


def check_length(prompt_tokens: int, max_tokens: int, limits: Limits, prompt_field: str) -> None:
    """Prompt too long for the model or the cache: a 400 rather than a failure inside the engine."""
    if prompt_tokens + max_tokens > limits.max_context:
        if prompt_tokens >= limits.max_context:
            raise BadRequest(f"the prompt has {prompt_tokens} tokens; this server holds at most "
                             f"{limits.max_context} tokens per request (prompt + max_tokens)", prompt_field)
        raise BadRequest(f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                         f"{limits.max_context} tokens per request this server holds", "max_tokens")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _alpha(body: dict, limits: Limits) -> float:
    try:
        value = alpha_from_request(body)
    except AlphaError as err:
        raise BadRequest(str(err), err.param) from None
    if value is None:
        return limits.alpha_default
    low, high = limits.alpha_range
    if not low <= value <= high:
        name = "alpha" if "alpha" in body else "vllm_xargs.alpha"
        raise BadRequest(f"{name} must lie in the server's --alpha-range [{low!r}, {high!r}], got {show(value)}", name)
    return value


def _max_tokens(body: dict, chat: bool) -> int:
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return 128 if chat else 16  # OpenAI's completions default is 16
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = "(" if low_open else "["
        raise BadRequest(f"'{name}' must be a number in {bound}{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _seed(body: dict) -> Optional[int]:
    value = body.get("seed")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadRequest(f"'seed' must be an integer, got {value!r}", "seed")
    return value


def _stop(body: dict) -> list:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to 4 of them, got {value!r}", "stop")
    return stops


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise BadRequest(f"'{name}' must be true or false, got {value!r}", name)
    return bool(value)


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest(f"'prompt' must be a non-empty string (one prompt per request), got {prompt!r}"[:200], "prompt")
    return prompt


def _messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise BadRequest(f"'messages[{i}]' must be an object with string 'role' and 'content'", f"messages[{i}]")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
