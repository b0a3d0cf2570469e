"""vLLM's OpenAI server with the plugin and its front door (`--middleware ...AlphaMiddleware`), serving the
linear and the block layer: a request's alpha, as `vllm_xargs.alpha` or top-level `alpha` (what `clm
serve`'s clients send), gives the HF + clm-ext reference log-probs; a bad alpha is a 400 naming the field
and the server keeps serving."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from checkpoints import LAYERS, exported  # noqa: F401  (the fixture; sets vLLM's environment first)

pytest.importorskip("vllm", reason="needs vLLM: ./run test-vllm")
import torch  # noqa: E402

import clm_ext  # noqa: E402

START_TIMEOUT_S = 300


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(path, tmp_path_factory):
    """The URL of vLLM's OpenAI server with the plugin and its middleware, serving `path`; stopped on exit."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--dtype", "float32",
           "--block-size", "32", "--max-model-len", "256", "--max-num-seqs", "8", "--enforce-eager",
           "--enable-prefix-caching", "--port", str(port),
           "--middleware", "clm_ext.vllm.middleware.AlphaMiddleware"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"the vLLM server did not start:\n{log.read()[-4000:]}")
                time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module", params=LAYERS)
def server(exported, tmp_path_factory, request):
    """(url, served path, the HF reference model) of a server for one layer kind (one server at a time)."""
    checkpoint = exported[request.param]["llama"]
    with start_server(checkpoint["exported"], tmp_path_factory) as url:
        yield url, checkpoint["exported"], checkpoint["model"]


def _post(url, body):
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _hf_reference(model, alpha, prompt, n):
    """Greedy tokens and their log-probs from the HF model wrapped with clm-ext."""
    clm_ext.set_alpha(model, alpha)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        logits = model(out).logits[0].double()
    tokens = out[0, len(prompt):].tolist()
    logprobs = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return tokens, logprobs.tolist()


# 70 tokens: two full KV blocks of 32, which the prefix cache would share across alphas without the salt
# (every request below sends this prompt, at different alphas).
PROMPT = [2] + [(37 * i) % 500 + 4 for i in range(69)]


@pytest.mark.parametrize("field", ["vllm_xargs", "top-level"])
@pytest.mark.parametrize("alpha", [1.5, -0.5])
def test_alpha_per_request_gives_the_reference(server, field, alpha):
    url, path, model = server
    body = {"model": path, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0,
            "return_token_ids": True}
    body.update({"vllm_xargs": {"alpha": alpha}} if field == "vllm_xargs" else {"alpha": alpha})
    status, answer = _post(url, body)
    assert status == 200, answer
    choice = answer["choices"][0]
    tokens, logprobs = _hf_reference(model, alpha, PROMPT, 5)
    assert choice["token_ids"] == tokens
    assert max(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"], logprobs)) < 1e-4


@pytest.mark.parametrize("body, param", [
    ({"alpha": "strong"}, "alpha"),
    ({"alpha": 1e999}, "alpha"),  # json reads it as inf
    ({"vllm_xargs": {"alpha": "1"}}, "vllm_xargs.alpha"),
    ({"alpha": 1.0, "vllm_xargs": {"alpha": 2.0}}, "alpha"),
])
def test_bad_alpha_is_a_400_naming_the_field_and_the_server_keeps_serving(server, body, param):
    url, path, _ = server
    status, answer = _post(url, {"model": path, "prompt": PROMPT, "max_tokens": 2, **body})
    assert status == 400
    assert answer["error"]["param"] == param and param in answer["error"]["message"]
    status, _ = _post(url, {"model": path, "prompt": PROMPT, "max_tokens": 2, "alpha": 0.5})
    assert status == 200


def _openai_completion(client, stream, **kwargs):
    """(token ids, their log-probs) of one completion through the `openai` client, streamed or not."""
    kwargs["extra_body"] = {**kwargs.get("extra_body", {}), "return_token_ids": True}
    if not stream:
        choice = client.completions.create(**kwargs).choices[0]
        return choice.token_ids, choice.logprobs.token_logprobs
    tokens, logprobs = [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            tokens += choice.token_ids or []
            logprobs += choice.logprobs.token_logprobs if choice.logprobs else []
    return tokens, logprobs


def test_concurrent_requests_at_mixed_alphas_streamed_or_not_equal_the_reference(server):
    """16 concurrent `openai` client requests at alphas over [-1, 3] (top-level alpha, as clients of `clm
    serve` send it), every other one streamed: each equals HF + clm-ext run alone."""
    from openai import OpenAI

    url, path, model = server
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    alphas = torch.linspace(-1, 3, 16).tolist()
    prompts = [PROMPT[: 24 + 3 * i] for i in range(16)]

    def ask(i):
        return _openai_completion(client, stream=bool(i % 2), model=path, prompt=prompts[i], max_tokens=5,
                                  temperature=0, logprobs=0, extra_body={"alpha": alphas[i]})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for prompt, alpha, (tokens, logprobs) in zip(prompts, alphas, answers):
        want_tokens, want_logprobs = _hf_reference(model, alpha, prompt, 5)
        assert tokens == want_tokens, f"alpha={alpha}"
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < 1e-4, f"alpha={alpha}"
