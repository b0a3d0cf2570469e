"""`clm serve`: the real `openai` client against a server on a loopback port, each completion compared token
for token with `clm_ext.generate` alone at that alpha; the per-token alpha entry point; bad inputs; the
transformers internals the engine adapter reads (so an upgrade fails here, not in production)."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer

import clm_ext
from clm_ext.model import alignment_site
from clm_ext.serve.batch_hooks import RequestSpec, RequestTable

from serve_helpers import MAX_TOKENS, client, health, perturb, raw, reference, reference_ids, running_server, write_model
from serve_helpers import prompt as _prompt
from serve_helpers import tiny_aligned_model as _tiny_aligned_model

pytestmark = pytest.mark.serve

_perturb = perturb


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `clm serve` subprocess on the tiny model with a trained-looking layer, and a reference copy."""
    root = tmp_path_factory.mktemp("serve")
    model, tok = write_model(root)
    with running_server(root) as (base, proc, log):
        yield {"base": base, "model": model, "tok": tok, "proc": proc, "log": log, "model_dir": root / "model"}


def _client(served):
    return client(served["base"])


def _reference(served, prompt: str, alpha: float, max_tokens: int = MAX_TOKENS) -> str:
    """What clm_ext.generate gives for this prompt alone at this alpha (greedy)."""
    return reference(served["model"], served["tok"], prompt, alpha, max_tokens)


def _reference_ids(served, ids: list, alpha: float, max_tokens: int = MAX_TOKENS) -> str:
    return reference_ids(served["model"], served["tok"], ids, alpha, max_tokens)


def _health(served) -> dict:
    return health(served["base"])


def _completion(served, prompt: str, alpha: float, **kwargs):
    return _client(served).completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"alpha": alpha}, **kwargs)


def _raw(served, body, path="/v1/completions"):
    return raw(served["base"], body, path)


# ---------------------------------------------------------------------------------------------------------
# The per-token alpha entry point of the layer (what the engine adapter sets for each packed batch).


def test_token_alpha_mixes_each_token_at_its_own_alpha():
    model = _tiny_aligned_model()
    clm_ext.add_alignment_control(model)
    _perturb(model)
    emb = alignment_site(model)
    segments = [torch.tensor([[5, 9, 12]]), torch.tensor([[7]]), torch.tensor([[30, 31]])]
    alphas = [-1.0, 2.5, 0.4]
    expected = []
    for ids, a in zip(segments, alphas):
        clm_ext.set_alpha(model, a)
        expected.append(emb(ids))
    packed = torch.cat(segments, dim=1)  # [1, 6], as the engine packs three requests
    token_alpha = torch.cat([torch.full((s.shape[1],), a) for s, a in zip(segments, alphas)])
    clm_ext.set_alpha(model, 0.0)
    emb.set_token_alpha(token_alpha)
    got = emb(packed)
    torch.testing.assert_close(got, torch.cat(expected, dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb(packed), emb.weight[packed])  # one forward only: back to alpha 0
    emb.set_token_alpha(torch.zeros(5))
    with pytest.raises(ValueError, match="5 values but the input has 6 tokens"):
        emb(packed)
    with pytest.raises(ValueError, match="finite"):
        emb.set_token_alpha(torch.tensor([1.0, float("nan")]))


def test_engine_refuses_the_logits_mode(tiny_tokenizer):
    from clm_ext.serve.engine import Engine

    for layer in ("linear", "block"):
        model = tiny_causal_lm("llama")
        clm_ext.add_alignment_control(model, mode="logits", layer=layer)
        with pytest.raises(ValueError, match="mode 'embed'"):
            Engine(model, tiny_tokenizer())


def test_request_table_keeps_a_cancelled_request_until_the_engine_dropped_it():
    table = RequestTable()
    table.add("a", RequestSpec(alpha=2.0))
    table.add("b", RequestSpec(alpha=-1.0))
    assert [s.alpha for s in table.lookup(["a", "b__child#0"])] == [2.0, -1.0]  # a forked sample: its parent's
    table.cancel("a")
    assert table.lookup(["a"])[0].alpha == 2.0  # still in the batch the engine prepared before the cancel
    table.lookup(["b"])
    table.lookup(["b"])
    assert len(table) == 1
    with pytest.raises(RuntimeError, match="has no alpha"):
        table.lookup(["a"])
    table.finish("b")
    assert len(table) == 0


def test_transformers_internals_the_adapter_reads():
    """An upgrade that renames or reorders these must fail here (requirements pin transformers 5.24)."""
    import transformers
    from transformers.generation.continuous_batching import continuous_api, input_outputs, model_runner, requests

    assert transformers.__version__.startswith("5.24."), transformers.__version__
    assert {"state", "has_new_token", "query_length"} <= set(requests.FutureRequestState.__slots__)
    prepare = inspect.getsource(input_outputs.ContinuousBatchingIOs.prepare_batch_tensors)
    # tokens packed request after request, in requests_in_batch order, each query_length long
    for needle in ("for i, future_state in enumerate(requests_in_batch)", "input_ids.extend(state.tokens_to_process)",
                   "cumulative_seqlens_q.append(cumulative_seqlens_q[-1] + query_length)",
                   "self.requests_in_batch.append(future_state)", "logits_indices.append(cumulative_seqlens_q[-1] - 1)"):
        assert needle in prepare, needle
    kwargs = inspect.getsource(input_outputs.ContinuousBatchingIOs.get_model_kwargs)
    assert "cu_seq_lens_q=" in kwargs and "logits_indices=" in kwargs
    forward = inspect.getsource(model_runner.ModelRunner._forward_process_and_sample)
    assert "logits = model(**batch_data).logits" in forward
    sample = inspect.getsource(model_runner.ModelRunner._sample)
    assert "torch.argmax(probs, dim=-1" in sample  # greedy: a sampled row holds +inf at its token
    assert 'f"{state_to_fork.request_id}__child#{i}"' in inspect.getsource(continuous_api.ContinuousBatchProcessor)
    assert "inputs_and_outputs" in inspect.getsource(continuous_api.ContinuousBatchProcessor.__init__)
    assert "result_handlers" in inspect.getsource(continuous_api.OutputRouter)


# ---------------------------------------------------------------------------------------------------------
# The server.


def test_models_and_health(served):
    models = _client(served).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = _health(served)
    assert health["status"] == "ok" and health["prefix_sharing"] is False


def test_sixteen_concurrent_mixed_alphas_equal_single_request_references(served):
    alphas = [-1.0, 3.0, 0.0, 1.0, 2.25, -0.5, 0.7, 1.5, 2.0, -0.25, 0.3, 2.8, 1.1, -1.0, 0.5, 3.0]
    prompts = [_prompt(i, 3 + (i * 11) % 40) for i in range(16)]  # 3..42 words: several pages, chunked prefill
    prompts[15] = prompts[0]  # one prompt twice, at alphas -1 and 3
    mixed_before = _health(served)["mixed_alpha_forwards"]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda pa: _completion(served, *pa), zip(prompts, alphas)))
    assert _health(served)["mixed_alpha_forwards"] > mixed_before  # the requests shared forwards
    for prompt, alpha, response in zip(prompts, alphas, responses):
        assert response.model_extra["alpha"] == alpha
        assert response.usage.completion_tokens == MAX_TOKENS
        assert response.choices[0].finish_reason == "length"
        assert response.choices[0].text == _reference(served, prompt, alpha), (prompt, alpha)
    assert responses[0].choices[0].text != responses[15].choices[0].text  # the dial changed the output
    deadline = time.time() + 10
    while _health(served)["alpha_table"] and time.time() < deadline:
        time.sleep(0.2)
    assert _health(served)["alpha_table"] == 0


def test_streaming_gives_the_same_text(served):
    client = _client(served)
    for i, alpha in enumerate([2.5, -0.75]):
        prompt = _prompt(i + 3, 9)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True, extra_body={"vllm_xargs": {"alpha": alpha}}))
        assert all(c.model_extra["alpha"] == alpha for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].text for c in chunks) == _reference(served, prompt, alpha)


def test_chat_completions_apply_the_chat_template(served):
    messages = [{"role": "user", "content": "the cat is happy"}]
    ids = served["tok"](served["tok"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]
    client = _client(served)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"alpha": 1.7})
    expected = _reference_ids(served, ids, 1.7)
    assert reply.choices[0].message.content == expected and reply.model_extra["alpha"] == 1.7
    chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, extra_body={"alpha": 1.7})
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_same_long_prompt_at_two_alphas_one_after_the_other(served):
    """The prefix-sharing trap: the second request must not reuse KV computed at the first one's alpha."""
    prompt = _prompt(0, 32)  # 33 tokens: two full pages of 16 that the engine would share, one token more
    texts = [_completion(served, prompt, alpha).choices[0].text for alpha in (0.0, 2.0, -1.0)]
    assert texts == [_reference(served, prompt, alpha) for alpha in (0.0, 2.0, -1.0)]
    assert len(set(texts)) == 3


def test_seed_stop_and_default_alpha(served):
    client = _client(served)
    prompt = _prompt(2, 6)
    sampled = [client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.9,
                                         top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same sample
    default = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert default.model_extra["alpha"] == 1.0 and default.choices[0].text == _reference(served, prompt, 1.0)
    words = default.choices[0].text.split()
    stop = words[4]
    cut = default.choices[0].text.index(stop)
    stopped = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].text == default.choices[0].text[:cut]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "tiny", "prompt": "the cat", "alpha": NaN}', 400, "alpha"),
    ({"model": "tiny", "prompt": "the cat", "alpha": "1.5"}, 400, "alpha"),
    ({"model": "tiny", "prompt": "the cat", "alpha": 4.5}, 400, "alpha"),
    ({"model": "tiny", "prompt": "the cat", "vllm_xargs": {"alpha": -3}}, 400, "vllm_xargs.alpha"),
    ({"model": "tiny", "prompt": "the cat", "alpha": 1, "vllm_xargs": {"alpha": 2}}, 400, "alpha"),
    ({"prompt": "the cat"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "the cat"}, 404, "model"),
    ('{"model": "tiny", "prompt": ', 400, None),
    ('[1, 2]', 400, None),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": " ".join(["cat"] * 300)}, 400, "prompt"),
    ({"model": "tiny", "prompt": "the cat", "max_tokens": 2000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "the cat", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "the cat", "n": 2}, 400, "n"),
])
def test_bad_requests_get_a_4xx_naming_the_field(served, body, status, param):
    response = _raw(served, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if param:
        assert param.split(".")[-1] in error["message"]
    assert _completion(served, "the cat", 0.5).choices[0].text == _reference(served, "the cat", 0.5)


def test_openai_client_sees_a_bad_alpha_as_a_bad_request(served):
    import openai

    with pytest.raises(openai.BadRequestError, match="alpha-range"):
        _completion(served, "the cat", 9.0)
    with pytest.raises(openai.BadRequestError, match="messages"):
        _raw_chat = _client(served).chat.completions.create(model="tiny", messages=[], extra_body={"alpha": 1})
        del _raw_chat


def test_client_disconnect_cancels_and_the_server_keeps_serving(served):
    body = {"model": "tiny", "prompt": _prompt(1, 5), "max_tokens": 200, "temperature": 0, "stream": True, "alpha": 2}
    with httpx.stream("POST", served["base"] + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one token received: hang up mid-stream
    deadline = time.time() + 20
    while time.time() < deadline and (_health(served)["in_flight"] or _health(served)["alpha_table"]):
        _completion(served, "the dog", 0.0)  # forwards keep running, so the cancelled entry retires
        time.sleep(0.2)
    health = _health(served)
    assert health["in_flight"] == 0 and health["alpha_table"] == 0 and health["status"] == "ok"
    assert _completion(served, "the dog", 1.0).choices[0].text == _reference(served, "the dog", 1.0)


def test_a_full_queue_answers_429_and_the_server_keeps_serving(served):
    body = {"model": "tiny", "prompt": "the sun", "max_tokens": 120, "temperature": 0, "alpha": 0.5}
    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(lambda _: _raw(served, body).status_code, range(32)))
    assert set(codes) <= {200, 429} and codes.count(200) >= 16 and 429 in codes, codes
    assert _completion(served, "the sun", 0.5).choices[0].text == _reference(served, "the sun", 0.5)


def test_cli_errors_are_one_line():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for args, needle in ((["--alpha-range", "3,1"], "--alpha-range"), (["--alpha-default", "9"], "--alpha-default"),
                         (["--model", "/nonexistent/model"], "--model")):
        proc = subprocess.run([sys.executable, "-m", "clm_ext.cli", "serve", "--port", "0", *args],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_bench_serve_smoke(served, tmp_path):
    """`clm bench serve` runs end to end (its own server; the transformers-serve provider is left out here to
    keep the suite short) and writes its rows; it checks that rows are written, never how fast anything is."""
    cmd = [sys.executable, "-m", "clm_ext.cli", "bench", "serve", "--smoke", "--model", str(served["model_dir"]),
           "--providers", "clm_mixed,clm_one", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "serve_cpu.json").read_text())
    metrics = {(r["provider"], r["metric"]) for r in rows}
    assert {("clm_mixed", "tokens_per_s"), ("clm_one", "latency_p99_s"), ("clm_mixed/clm_one", "tokens_per_s_ratio"),
            ("clm_mixed", "failures")} <= metrics
    assert all(r["median"] == 0 for r in rows if r["metric"] == "failures")


def test_default_alignment_is_the_demo_block_layer_else_its_linear_layer(tmp_path, monkeypatch):
    import argparse

    from clm_ext.cli import serve as cli

    block, linear = tmp_path / "block", tmp_path / "linear"
    monkeypatch.setattr(cli, "DEMO_LAYERS", (block, linear))
    args = argparse.Namespace(model=cli.DEFAULT_MODEL, alignment=None)
    assert cli._alignment_dir(args) is None  # no trained layer in this checkout: the identity, said at start-up
    linear.mkdir()
    assert cli._alignment_dir(args) == str(linear)
    block.mkdir()
    assert cli._alignment_dir(args) == str(block)
    assert cli._alignment_dir(argparse.Namespace(model="some/dir", alignment=None)) is None
    with pytest.raises(cli.UsageError, match="--alignment"):
        cli._alignment_dir(argparse.Namespace(model="some/dir", alignment=str(tmp_path / "nope")))
