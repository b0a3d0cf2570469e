"""The vLLM plugin's parts that need no vLLM: the front-door middleware, request alphas and salts, and
the per-token alpha buffer's refusal to serve unwritten alphas."""
import asyncio
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clm_ext.vllm.alpha import TokenAlpha, cache_salt, request_alpha
from clm_ext.alpha import AlphaError
from clm_ext.vllm.middleware import AlphaMiddleware, rewrite


def test_top_level_alpha_moves_into_vllm_xargs():
    body = json.loads(rewrite(json.dumps({"prompt": "hi", "alpha": 1.5, "vllm_xargs": {"other": 1}}).encode()))
    assert body == {"prompt": "hi", "vllm_xargs": {"other": 1, "alpha": 1.5}}
    same = json.dumps({"prompt": "hi", "vllm_xargs": {"alpha": -2}}).encode()
    assert rewrite(same) == same
    assert rewrite(b"not json") == b"not json"


@pytest.mark.parametrize("body, param", [
    ({"alpha": "1"}, "alpha"), ({"alpha": True}, "alpha"), ({"alpha": None}, "alpha"),
    ({"alpha": math.inf}, "alpha"), ({"vllm_xargs": {"alpha": math.nan}}, "vllm_xargs.alpha"),
    ({"alpha": 1e300}, "alpha"),  # finite as a Python float, inf in the float32 alpha buffer
    ({"alpha": 1, "vllm_xargs": {"alpha": 2}}, "alpha"),
])
def test_bad_alphas_name_their_field(body, param):
    with pytest.raises(AlphaError) as err:
        rewrite(json.dumps(body).encode())
    assert err.value.param == param and param in str(err.value)


def _call(middleware, path, body):
    """Run the ASGI middleware once; return (status, body the app received or the response body)."""
    seen, sent = {}, []

    async def app(scope, receive, send):
        seen["body"] = (await receive())["body"]
        seen["length"] = dict(scope["headers"])[b"content-length"]
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-length", str(len(body)).encode())]}
    asyncio.run(AlphaMiddleware(app)(scope, receive, send))
    return sent[0]["status"], seen or json.loads(sent[1]["body"])


def test_middleware_rewrites_completions_and_answers_400():
    status, seen = _call(AlphaMiddleware, "/v1/chat/completions", b'{"alpha": 0.25}')
    assert status == 200 and json.loads(seen["body"]) == {"vllm_xargs": {"alpha": 0.25}}
    assert seen["length"] == str(len(seen["body"])).encode()
    status, answer = _call(AlphaMiddleware, "/v1/completions", b'{"alpha": "high"}')
    assert status == 400 and answer["error"]["param"] == "alpha"
    status, seen = _call(AlphaMiddleware, "/v1/models", b'{"alpha": "high"}')  # other paths untouched
    assert status == 200 and seen["body"] == b'{"alpha": "high"}'


def test_request_alpha_and_salt():
    assert request_alpha(SimpleNamespace(extra_args={"alpha": 2}), 1.0) == 2.0
    assert request_alpha(SimpleNamespace(extra_args=None), 0.5) == 0.5
    with pytest.raises(ValueError, match="vllm_xargs.alpha must be finite"):
        request_alpha(SimpleNamespace(extra_args={"alpha": math.nan}), 1.0)
    assert cache_salt(0.5, None) != cache_salt(0.25, None)
    assert cache_salt(0.5, "user") not in (cache_salt(0.5, None), cache_salt(0.5, "other"))


def test_token_alpha_repeats_each_requests_alpha_and_refuses_unwritten_steps():
    state = TokenAlpha(16, default_alpha=1.0, device="cpu")
    state.write_requests([0.5, -1.0, 2.0], np.array([3, 1, 2]))
    assert state.take(8)[:6].tolist() == [0.5, 0.5, 0.5, -1.0, 2.0, 2.0]  # 8: padded tokens beyond 6
    with pytest.raises(RuntimeError, match="not written for this forward"):
        state.take(6)  # the next forward without a new write
    state.write_requests([1.0], [4])
    with pytest.raises(RuntimeError, match="written for 4 tokens, the forward has 2"):
        state.take(2)
    with state.dummy_run():
        assert torch.equal(state.take(5), torch.zeros(5))
    with pytest.raises(RuntimeError, match="not written"):
        state.take(5)  # the dummy run is over
    state.start_dummy()  # V2 graph capture: warm-up and capture forwards until the next real write
    assert torch.equal(state.take(5), state.take(5))
    state.write_requests([3.0], [2])
    assert state.take(2).tolist() == [3.0, 3.0]
    with pytest.raises(RuntimeError, match="not written"):
        state.take(2)
    with pytest.raises(RuntimeError, match="holds 16"):
        state.write(np.zeros(17))


# ------------------------------------------------------------------------------------------------
# Named dials: an alpha vector per request.

DIALS = ["positive", "concise"]


def test_request_alpha_with_dials_is_a_vector_in_the_dials_order():
    ask = lambda alpha: request_alpha(SimpleNamespace(extra_args={"alpha": alpha}), (1.0, 1.0), DIALS)  # noqa: E731
    assert ask({"concise": -0.5, "positive": 2}) == (2.0, -0.5)
    assert ask({"concise": 3}) == (0.0, 3.0)  # a dial left out is at 0
    assert ask(["concise", -1, "positive", 0.5]) == ask({"concise": -1, "positive": 0.5}) == (0.5, -1.0)
    assert ask([]) == (0.0, 0.0)
    assert request_alpha(SimpleNamespace(extra_args=None), (1.0, 1.0), DIALS) == (1.0, 1.0)
    assert request_alpha(SimpleNamespace(extra_args={"alpha": 0.5}), (1.0,), ["positive"]) == (0.5,)
    for alpha, fragments in [(1.5, ["vllm_xargs.alpha", "object of dial alphas", "['positive', 'concise']"]),
                             ({"kind": 1}, ["vllm_xargs.alpha", "'kind'", "['positive', 'concise']"]),
                             ({"positive": math.nan}, ["vllm_xargs.alpha['positive']", "finite"]),
                             (["positive", 1, "concise"], ["vllm_xargs.alpha", "[dial, value, ...]"]),
                             ([1, "positive"], ["vllm_xargs.alpha", "[dial, value, ...]"])]:
        with pytest.raises(AlphaError) as err:
            ask(alpha)
        assert all(f in str(err.value) for f in fragments), str(err.value)
        assert err.value.param.startswith("vllm_xargs.alpha")


def test_the_salt_covers_the_whole_alpha_vector():
    assert cache_salt((1.0, 0.0), None) != cache_salt((1.0, 1.0), None)
    assert cache_salt((1.0, 0.0), "user") == cache_salt((1.0, 0.0), "user")


def test_token_alpha_with_dials_repeats_each_requests_vector():
    state = TokenAlpha(16, default_alpha=1.0, device="cpu", dials=DIALS)
    assert state.default_alpha == (1.0, 1.0) and state.buffer.shape == (16, 2)
    state.write_requests([(0.5, -1.0), (2.0, 0.0)], np.array([2, 3]))
    assert state.take(5).tolist() == [[0.5, -1.0]] * 2 + [[2.0, 0.0]] * 3


def test_middleware_moves_a_dial_vector_and_names_a_bad_dial_value():
    status, seen = _call(AlphaMiddleware, "/v1/completions", b'{"alpha": {"positive": 1, "concise": -0.5}}')
    assert status == 200
    assert json.loads(seen["body"]) == {"vllm_xargs": {"alpha": ["positive", 1.0, "concise", -0.5]}}
    status, seen = _call(AlphaMiddleware, "/v1/completions", b'{"vllm_xargs": {"alpha": {}}}')  # every dial at 0
    assert status == 200 and json.loads(seen["body"]) == {"vllm_xargs": {"alpha": []}}
    status, answer = _call(AlphaMiddleware, "/v1/completions", b'{"alpha": {"positive": "high"}}')
    assert status == 400 and answer["error"]["param"] == "alpha['positive']"


def test_the_model_list_gains_the_dial_settings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"clm_alignment": {"layer": "linear", "mode": "embed", "default_alpha": 0.5, "dials": DIALS}}))
    cards = {"object": "list", "data": [{"id": "m", "root": str(tmp_path)}, {"id": "plain", "root": "/nowhere"}]}
    body = json.dumps(cards).encode()
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body[:10], "more_body": True})
        await send({"type": "http.response.body", "body": body[10:]})

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": []}
    asyncio.run(AlphaMiddleware(app)(scope, None, send))
    answer = json.loads(sent[1]["body"])
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(sent[1]["body"])).encode()
    assert answer["data"][0] == {"id": "m", "root": str(tmp_path), "alignment": "linear", "alpha_default": 0.5,
                                 "alpha_range": [-3.4028234663852886e38, 3.4028234663852886e38], "dials": DIALS}
    assert answer["data"][1] == cards["data"][1]
