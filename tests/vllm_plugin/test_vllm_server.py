"""vLLM's OpenAI server with the plugin and its front door (`--middleware ...AlphaMiddleware`): a request's
alpha, as `vllm_xargs.alpha` or top-level `alpha` (what `clm serve`'s clients send), gives the HF +
clm-ext reference log-probs; a bad alpha is a 400 naming the field and the server keeps serving."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from checkpoints import exported  # noqa: F401  (the fixture; sets vLLM's environment first)

pytest.importorskip("vllm", reason="needs vLLM: ./run test-vllm")
import torch  # noqa: E402

import clm_ext  # noqa: E402

START_TIMEOUT_S = 300


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    port, path = _free_port(), exported["llama"]["exported"]
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
        yield url, path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


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
def test_alpha_per_request_gives_the_reference(server, exported, field, alpha):
    url, path = server
    body = {"model": path, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0,
            "return_token_ids": True}
    body.update({"vllm_xargs": {"alpha": alpha}} if field == "vllm_xargs" else {"alpha": alpha})
    status, answer = _post(url, body)
    assert status == 200, answer
    choice = answer["choices"][0]
    tokens, logprobs = _hf_reference(exported["llama"]["model"], alpha, PROMPT, 5)
    assert choice["token_ids"] == tokens
    assert max(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"], logprobs)) < 1e-4


@pytest.mark.parametrize("body, param", [
    ({"alpha": "strong"}, "alpha"),
    ({"alpha": 1e999}, "alpha"),  # json reads it as inf
    ({"vllm_xargs": {"alpha": "1"}}, "vllm_xargs.alpha"),
    ({"alpha": 1.0, "vllm_xargs": {"alpha": 2.0}}, "alpha"),
])
def test_bad_alpha_is_a_400_naming_the_field_and_the_server_keeps_serving(server, body, param):
    url, path = server
    status, answer = _post(url, {"model": path, "prompt": PROMPT, "max_tokens": 2, **body})
    assert status == 400
    assert answer["error"]["param"] == param and param in answer["error"]["message"]
    status, _ = _post(url, {"model": path, "prompt": PROMPT, "max_tokens": 2, "alpha": 0.5})
    assert status == 200
