"""OpenAI request bodies -> what the engine needs, with a 4xx naming the field for anything wrong.

The dial is a top-level "alpha" (the `openai` client's `extra_body={"alpha": a}`) or "vllm_xargs":
{"alpha": a} (what clients of a vLLM deployment send); it is never silently dropped.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Optional, Union

from ..alpha import AlphaError, alpha_from_request, request_dial_vector, show

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
    dials: Optional[tuple] = None  # the model's named dials: a request's alpha is then {dial: value}


@dataclass
class Parsed:
    alpha: Union[float, tuple]  # a tuple in the order of Limits.dials for a model with named dials
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: list = field(default_factory=list)
    stream: bool = False
    prompt: Optional[str] = None  # completions
    messages: Optional[list] = None  # chat


MAX_DEPTH = 32  # nesting of arrays/objects in a body: an OpenAI request needs 4 (messages[i].content parts)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def parse_body(raw: bytes):
    """The JSON body, or a 400 "malformed JSON": too deeply nested bodies are refused before parsing (the
    parser recurses once per level)."""
    outside_strings = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = max(accumulate(1 if c in b"[{" else -1 for c in outside_strings), default=0)
    if depth > MAX_DEPTH:
        raise BadRequest(f"malformed JSON body: nested {depth} deep, at most {MAX_DEPTH} levels are accepted")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"malformed JSON body: {e}") from None


def parse_request(body, limits: Limits, chat: bool) -> Parsed:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is None:
        raise BadRequest("'model' is required", "model")
    if model != limits.model_name:
        raise BadRequest(f"model {_show(model)} not found; this server serves {limits.model_name!r}", "model", 404)
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0):
            raise BadRequest(f"'{name}' is not supported by clm serve", name)
    if body.get("n", 1) != 1:
        raise BadRequest(f"'n' must be 1 (one completion per request), got {_show(body.get('n'))}", "n")
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


def _finite(value) -> bool:
    """A JSON number that is finite as a float (an integer of 400 digits is a Python int, too large for one)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _alpha(body: dict, limits: Limits) -> Union[float, tuple]:
    if limits.dials:
        return _dial_alpha(body, limits)
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


def _dial_alpha(body: dict, limits: Limits) -> tuple:
    """{dial: value} as a tuple in the order of the dials (a dial left out is 0; no alpha at all: every dial at
    the server's default). A plain number means the only dial of a one-dial model."""
    dials, (low, high) = list(limits.dials), limits.alpha_range

    def check(value, name):
        vector = request_dial_vector(value, dials, name)
        for dial, v in zip(dials, vector):
            if not low <= v <= high:
                raise AlphaError(f"{name}[{dial!r}] must lie in the server's --alpha-range [{low!r}, {high!r}], "
                                 f"got {show(value[dial] if isinstance(value, dict) else value)}", f"{name}[{dial!r}]")
        return tuple(vector)

    try:
        value = alpha_from_request(body, check)
    except AlphaError as err:
        raise BadRequest(str(err), err.param) from None
    return (limits.alpha_default,) * len(dials) if value is None else value


def _max_tokens(body: dict, chat: bool) -> int:
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return 128 if chat else 16  # OpenAI's completions default is 16
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer, got {_show(value)}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _finite(value) or value > high or value < low or (low_open and value == low):
        bound = "(" if low_open else "["
        raise BadRequest(f"'{name}' must be a number in {bound}{low:g}, {high:g}], got {_show(value)}", name)
    return float(value)


SEED_RANGE = (-2**63, 2**63 - 1)  # a 64-bit signed integer, as OpenAI's API and torch's generators take


def _seed(body: dict) -> Optional[int]:
    value = body.get("seed")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not SEED_RANGE[0] <= value <= SEED_RANGE[1]):
        raise BadRequest(f"'seed' must be an integer in [-2**63, 2**63 - 1], got {_show(value)}", "seed")
    return value


def _show(value) -> str:
    """A value for an error message, cut short (a 400-digit integer is shown by its length)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: str, name: str) -> str:
    """`value`, if it is valid Unicode text (JSON's \\ud800 escapes give lone surrogates, which no tokenizer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"'{name}' is not valid Unicode text: {e.reason} at position {e.start}", name) from None
    return value


def _stop(body: dict) -> list:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to 4 of them, got {_show(value)}", "stop")
    return [_text(s, "stop") for s in stops]


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise BadRequest(f"'{name}' must be true or false, got {_show(value)}", name)
    return bool(value)


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest(f"'prompt' must be a non-empty string (one prompt per request), got {_show(prompt)}", "prompt")
    return _text(prompt, "prompt")


def _messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise BadRequest(f"'messages[{i}]' must be an object with string 'role' and 'content'", f"messages[{i}]")
    return [{"role": _text(m["role"], f"messages[{i}].role"), "content": _text(m["content"], f"messages[{i}].content")}
            for i, m in enumerate(messages)]
