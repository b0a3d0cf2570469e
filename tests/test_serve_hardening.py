"""`clm serve` against hostile and careless requests: no accepted value can stop the engine (tiny temperatures
are greedy, a request whose sampling fails fails alone, a dead engine exits the process), streams past
--max-queue get HTTP 429, out-of-range seeds, huge JSON integers, lone surrogates and deep nesting get a 400
naming the field, and property-based bodies from the OpenAI schema are never answered 5xx."""
from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers import tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import (MAX_TOKENS, client, free_port, health, perturb, prompt, raw, reference,
                           running_server, tiny_aligned_model, write_model)

import clm_ext
from clm_ext.serve import batch_hooks
from clm_ext.serve.batch_hooks import RequestSpec
from clm_ext.serve.sampling import sample_rows


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-hardening")
    model, tok = write_model(root)
    with running_server(root) as (base, proc, log):
        yield {"base": base, "model": model, "tok": tok, "proc": proc}


def _serves_correctly(served, alpha: float = 0.5, text: str = "the cat") -> None:
    """A good request after a bad one: answered, equal to clm_ext.generate alone, the engine healthy."""
    got = client(served["base"]).completions.create(model="tiny", prompt=text, max_tokens=MAX_TOKENS, temperature=0,
                                                    extra_body={"alpha": alpha})
    references = served.setdefault("references", {})
    if (text, alpha) not in references:
        references[text, alpha] = reference(served["model"], served["tok"], text, alpha)
    assert got.choices[0].text == references[text, alpha]
    assert health(served["base"])["status"] == "ok"


# ---------------------------------------------------------------------------------------------------------
# Sampling: one rule for every accepted temperature.


def _reference_sample(logits, temperature, top_p, u):
    """The token sample_rows must pick: float64, one row at a time, in the obvious way."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(probs, descending=True, stable=True)
    kept, mass = [], 0.0
    for i in order.tolist():
        if mass >= top_p and kept:
            break
        kept.append(i)
        mass += float(probs[i])
    if top_p >= 1.0:
        kept = list(range(len(probs)))
    kept = sorted(kept)  # the draw walks the kept tokens in vocabulary order
    total = sum(float(probs[i]) for i in kept)
    acc = 0.0
    for i in kept:
        acc += float(probs[i])
        if acc > u * total:
            return i
    return kept[-1]


def test_batched_sampling_picks_each_rows_token_with_its_own_settings():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=g) * 3
    temperature = torch.tensor([1.0, 0.3, 2.0, 0.7, 1.3, 1e-5])
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.2, 1.0])
    for trial in range(20):
        u = torch.rand(6, generator=g)
        tokens, ok = sample_rows(logits, temperature, top_p, u)
        assert ok.all()
        want = [_reference_sample(logits[i], float(temperature[i]), float(top_p[i]), float(u[i])) for i in range(6)]
        assert tokens.tolist() == want, trial
    # frequencies follow the distribution (top_p 1): 4000 draws of one row
    row = logits[:1].expand(4000, -1)
    tokens, _ = sample_rows(row, torch.ones(4000), torch.ones(4000), torch.rand(4000, generator=g))
    freq = torch.bincount(tokens, minlength=40).double() / 4000
    assert (freq - torch.softmax(logits[0].double(), -1)).abs().max() < 0.03
    bad = logits[:2].clone()
    bad[1, 5] = float("nan")
    _, ok = sample_rows(bad, torch.ones(2), torch.ones(2), torch.rand(2, generator=g))
    assert ok.tolist() == [True, False]


def test_tiny_temperatures_are_greedy_everywhere():
    """Below clm_ext.generation.GREEDY_BELOW sampling is greedy: in generate (it raised 'probability tensor
    contains inf/nan' for 1e-300) and in the server's request spec."""
    tok = tiny_tokenizer()
    model = clm_ext.add_alignment_control(tiny_aligned_model())
    perturb(model)
    greedy = clm_ext.generate(model, tok, ["the cat runs", "a dog"], alphas=[0.5, 2.0], max_new_tokens=6, do_sample=False)
    for t in (1e-300, 1e-40, 5e-324, 1e-6):
        got = clm_ext.generate(model, tok, ["the cat runs", "a dog"], alphas=[0.5, 2.0], max_new_tokens=6,
                               do_sample=True, temperature=t, top_p=0.9)
        assert got == greedy, t
        assert not RequestSpec(alpha=1.0, temperature=t).samples
    assert RequestSpec(alpha=1.0, temperature=0.5).samples


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 5e-324, 1e-30])
def test_a_tiny_temperature_is_served_greedy_and_the_server_keeps_serving(served, temperature):
    text = prompt(4, 7)
    got = client(served["base"]).completions.create(model="tiny", prompt=text, max_tokens=MAX_TOKENS,
                                                    temperature=temperature, seed=1, extra_body={"alpha": 1.5})
    assert got.choices[0].text == reference(served["model"], served["tok"], text, 1.5)
    _serves_correctly(served)


# ---------------------------------------------------------------------------------------------------------
# One failing request fails alone; a dead engine ends the process.


@pytest.fixture
def engine():
    from clm_ext.serve.engine import Engine, EngineConfig

    model = clm_ext.add_alignment_control(tiny_aligned_model())
    perturb(model)
    tok = tiny_tokenizer()
    reference_model = copy.deepcopy(model)  # the engine switches the model it serves to paged attention
    engine = Engine(model, tok, EngineConfig(max_queue=8, page_size=16, num_blocks=64, max_batch_tokens=48))
    engine.reference_model = reference_model
    try:
        yield engine
    finally:
        engine.stop()


async def _collect(engine, text: str, spec: RequestSpec, max_tokens: int = 6):
    last = None
    async for step in engine.generate(engine.tokenizer(text)["input_ids"], spec, max_tokens):
        last = step
    return last


def test_a_request_whose_sampling_fails_fails_alone(engine, monkeypatch):
    real = batch_hooks.sample_rows

    def fails_at_0_77(logits, temperature, top_p, uniform):
        if bool((temperature == 0.77).any()):
            raise RuntimeError("injected sampling failure")
        return real(logits, temperature, top_p, uniform)

    monkeypatch.setattr(batch_hooks, "sample_rows", fails_at_0_77)

    async def main():
        specs = [RequestSpec(alpha=1.0, temperature=0.77, seed=1), RequestSpec(alpha=2.0, temperature=0.9, seed=2),
                 RequestSpec(alpha=-1.0)]
        return await asyncio.gather(*(_collect(engine, "the cat runs here", s) for s in specs))

    failed, sampled, greedy = asyncio.run(main())
    assert failed.error and "injected sampling failure" in failed.error
    assert sampled.error is None and sampled.finished and len(sampled.tokens) == 6
    want = reference(engine.reference_model, engine.tokenizer, "the cat runs here", -1.0, 6)
    assert greedy.error is None and engine.tokenizer.decode(greedy.tokens, skip_special_tokens=True) == want
    assert engine.healthy()
    time.sleep(0.3)
    assert engine.in_flight == 0
    again = asyncio.run(_collect(engine, "a dog", RequestSpec(alpha=0.5)))
    assert engine.tokenizer.decode(again.tokens, skip_special_tokens=True) == reference(
        engine.reference_model, engine.tokenizer, "a dog", 0.5, 6)


def test_the_server_exits_non_zero_when_the_engine_dies(engine):
    """A fault outside any one request (here: the model's forward raises) stops the generation thread: the
    server must exit 1, not answer 500 "engine stopped" forever."""
    from clm_ext.cli.serve import serve_until_stopped
    from clm_ext.serve.app import create_app
    from clm_ext.serve.protocol import Limits

    broken = threading.Event()

    def maybe_break(module, args, kwargs):
        if broken.is_set():
            raise RuntimeError("injected engine failure")

    handle = engine.model.register_forward_pre_hook(maybe_break, with_kwargs=True)
    port = free_port()
    app = create_app(engine, Limits(model_name="tiny", max_context=engine.max_context))
    result = []
    thread = threading.Thread(target=lambda: result.append(serve_until_stopped(engine, app, "127.0.0.1", port)))
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert raw(base, {"model": "tiny", "prompt": "the cat", "max_tokens": 3}).status_code == 200
        broken.set()
        assert raw(base, {"model": "tiny", "prompt": "the cat", "max_tokens": 3}).status_code == 500
        thread.join(timeout=30)
        assert not thread.is_alive() and result == [1]
    finally:
        handle.remove()
        if thread.is_alive():
            engine.stop()
            thread.join(timeout=30)


# ---------------------------------------------------------------------------------------------------------
# Requests that got a 5xx or a 200 with an error inside.


def test_streams_past_max_queue_get_http_429(served):
    body = {"model": "tiny", "prompt": "the sun", "max_tokens": 120, "temperature": 0, "alpha": 0.5, "stream": True}

    def stream(_):
        with httpx.stream("POST", served["base"] + "/v1/completions", json=body, timeout=120) as response:
            text = "".join(response.iter_text())
            return response.status_code, text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(stream, range(32)))
    codes = [code for code, _ in answers]
    assert set(codes) <= {200, 429} and codes.count(200) >= 16 and 429 in codes, codes
    assert not any('"error"' in text for code, text in answers if code == 200)
    assert all(json.loads(text)["error"]["code"] == 429 for code, text in answers if code == 429)
    deadline = time.time() + 10
    while health(served["base"])["in_flight"] and time.time() < deadline:
        time.sleep(0.2)
    assert health(served["base"])["in_flight"] == 0
    _serves_correctly(served)


BIG = "1" + "0" * 400  # a JSON integer no float holds


@pytest.mark.parametrize("text, param", [
    ('{"model": "tiny", "prompt": "the cat", "seed": %d}' % 2**64, "seed"),
    ('{"model": "tiny", "prompt": "the cat", "seed": %d}' % 10**30, "seed"),
    ('{"model": "tiny", "prompt": "the cat", "seed": %d}' % -2**64, "seed"),
    ('{"model": "tiny", "prompt": "the cat", "alpha": %s}' % BIG, "alpha"),
    ('{"model": "tiny", "prompt": "the cat", "alpha": -%s}' % BIG, "alpha"),
    ('{"model": "tiny", "prompt": "the cat", "vllm_xargs": {"alpha": %s}}' % BIG, "vllm_xargs.alpha"),
    ('{"model": "tiny", "prompt": "the cat", "temperature": %s}' % BIG, "temperature"),
    ('{"model": "tiny", "prompt": "the cat", "top_p": %s}' % BIG, "top_p"),
    ('{"model": "tiny", "prompt": "the cat", "max_tokens": %s}' % BIG, "max_tokens"),
    ('{"model": "tiny", "prompt": "the cat", "seed": %s}' % BIG, "seed"),
    ('{"model": "tiny", "prompt": "the cat", "n": %s}' % BIG, "n"),
    ('{"model": "tiny", "prompt": "\\ud800 x"}', "prompt"),
    ('{"model": "tiny", "prompt": "the cat", "stop": ["\\udfff"]}', "stop"),
])
def test_out_of_range_numbers_and_broken_text_get_a_400_naming_the_field(served, text, param):
    response = raw(served["base"], text)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param.split(".")[-1] in error["message"]
    _serves_correctly(served)


def test_lone_surrogates_in_chat_messages_get_a_400(served):
    for field, text in (("messages[0].content", '[{"role": "user", "content": "hi \\ud800"}]'),
                        ("messages[0].role", '[{"role": "\\udc00", "content": "hi"}]')):
        response = raw(served["base"], '{"model": "tiny", "messages": %s}' % text, "/v1/chat/completions")
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    _serves_correctly(served)


def test_a_seed_at_the_int64_limits_is_served(served):
    for seed in (2**63 - 1, -2**63):
        response = raw(served["base"], {"model": "tiny", "prompt": "the cat", "max_tokens": 3, "temperature": 0.8,
                                         "seed": seed})
        assert response.status_code == 200, response.text


def test_a_deeply_nested_body_is_malformed_json(served):
    for depth in (100_000, 40):
        response = raw(served["base"], '{"model": "tiny", "prompt": ' + "[" * depth + "]" * depth + "}")
        assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    _serves_correctly(served)


# ---------------------------------------------------------------------------------------------------------
# Property-based bodies: every field of the OpenAI completion / chat schema, hostile values included.

_HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-300, 5e-324, -0.0, 1e308, 2**63, -2**63 - 1]),
    st.text(max_size=20), st.sampled_from(["\ud800", "x\udfffy", "", " ", "\x00"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_OK_TEXT = st.lists(st.sampled_from(["the", " cat", " dog", " runs", " é", " 😀", "\n"]), min_size=1, max_size=8).map("".join)
_FIELDS = {
    "model": st.one_of(st.just("tiny"), _HOSTILE),
    "alpha": st.one_of(st.floats(-2, 4), _HOSTILE),
    "vllm_xargs": st.one_of(st.fixed_dictionaries({"alpha": st.one_of(st.floats(-2, 4), _HOSTILE)}), _HOSTILE),
    "max_tokens": st.one_of(st.integers(1, 3), _HOSTILE),
    "max_completion_tokens": st.one_of(st.integers(1, 3), _HOSTILE),
    "temperature": st.one_of(st.floats(0, 2), _HOSTILE),
    "top_p": st.one_of(st.floats(0, 1), _HOSTILE),
    "seed": st.one_of(st.integers(-2**63, 2**63 - 1), _HOSTILE),
    "stop": st.one_of(_OK_TEXT, st.lists(_OK_TEXT, max_size=5), _HOSTILE),
    "stream": st.one_of(st.booleans(), _HOSTILE),
    "n": st.one_of(st.just(1), _HOSTILE),
    "logprobs": _HOSTILE, "echo": _HOSTILE, "user": _HOSTILE, "presence_penalty": _HOSTILE,
}
_COMPLETION = st.fixed_dictionaries({}, optional={**_FIELDS, "prompt": st.one_of(_OK_TEXT, st.lists(_OK_TEXT, max_size=2),
                                                                                 _HOSTILE)})
_MESSAGE = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                            "content": st.one_of(_OK_TEXT, _HOSTILE)}), _HOSTILE)
_CHAT = st.fixed_dictionaries({}, optional={**_FIELDS, "messages": st.one_of(st.lists(_MESSAGE, max_size=3), _HOSTILE)})


def _send(base: str, path: str, body: dict) -> int:
    """POST the body (NaN and infinities as Python's json writes them, lone surrogates as escapes);
    a streamed answer is read to its end."""
    text = json.dumps(body, allow_nan=True)
    with httpx.stream("POST", base + path, content=text, headers={"content-type": "application/json"},
                      timeout=60) as response:
        body_text = "".join(response.iter_text())
    if response.status_code == 200 and body.get("stream") is True:
        assert '"error"' not in body_text, body_text[:300]
    return response.status_code


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(completion=_COMPLETION, chat=_CHAT)
def test_fuzzed_openai_bodies_never_get_a_5xx(served, completion, chat):
    for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
        body = dict(body)
        for name in ("max_tokens", "max_completion_tokens"):  # keep accepted requests short (longer: a 400)
            if isinstance(body.get(name), int) and 3 < body[name] < 1000:
                body[name] = 3
        status = _send(served["base"], path, body)
        assert status < 500, (path, body, status)
    _serves_correctly(served, alpha=2.0, text=prompt(1, 9))
