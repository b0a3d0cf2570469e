"""What the `clm serve` tests share: the tiny test model with a layer far from the identity, a server
subprocess on a loopback port, the `openai` client, and `clm_ext.generate` references."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from helpers import WORDS, tiny_causal_lm, tiny_tokenizer

import clm_ext
from clm_ext.model import alignment_site

MAX_TOKENS = 12
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")
# Small pages, cache and batches: prompts span several pages and long prompts are prefilled in chunks.
SERVER_ARGS = ("--max-queue", "16", "--page-size", "16", "--cache-blocks", "96", "--max-batch-tokens", "48",
               "--threads", "1", "--served-model-name", "tiny")


def prompt(i: int, length: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(length))


def tiny_aligned_model():
    """The test model: a tiny Llama whose lm_head never prefers </s> (every greedy completion runs to
    max_tokens, so lengths are deterministic)."""
    model = tiny_causal_lm("llama", max_position_embeddings=256)
    with torch.no_grad():
        model.lm_head.weight[1].zero_()
    return model


def perturb(model):
    """A layer that moves the output at every alpha without swamping the embeddings. Linear: row norm ~0.11
    (a larger bias drives every token to the same input and every alpha >= 1 to the same repeated word).
    Block: the zeroed output projections get small random weights, so the block is no longer the identity."""
    site = alignment_site(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if site.layer_kind == "linear":
            layer = site.alignment
            d = layer.weight.shape[0]
            layer.weight.add_(0.4 / d**0.5 * torch.randn(d, d, generator=g))
            layer.bias.add_(0.005 * torch.randn(d, generator=g))
        else:
            for linear in (site.block.self_attn.o_proj, site.block.mlp.down_proj):
                fan_in = linear.weight.shape[1]
                linear.weight.add_(0.6 / fan_in**0.5 * torch.randn(linear.weight.shape, generator=g))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model(root, layer: str = "linear"):
    """The tiny model and tokenizer saved under root/model, a perturbed layer under root/layer; returns the
    reference model (with that layer, eval mode) and the tokenizer."""
    model = tiny_aligned_model()
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    clm_ext.add_alignment_control(model, layer=layer)
    perturb(model)
    clm_ext.save_alignment(model, root / "layer")
    return model.eval(), tok


@contextlib.contextmanager
def running_server(root, extra_args=(), timeout: float = 180):
    """A `clm serve` subprocess on root/model with root/layer; yields its base URL and process."""
    port = free_port()
    cmd = [sys.executable, "-m", "clm_ext.cli", "serve", "--model", str(root / "model"), "--alignment",
           str(root / "layer"), "--port", str(port), *SERVER_ARGS, *extra_args]
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"clm serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"clm serve did not answer /health within {timeout} s")
            time.sleep(0.5)
        yield base, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def client(base: str):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120, max_retries=0)


def reference(model, tok, text: str, alpha: float, max_tokens: int = MAX_TOKENS) -> str:
    """What clm_ext.generate gives for this prompt alone at this alpha (greedy)."""
    return clm_ext.generate(model, tok, [text], alphas=[alpha], max_new_tokens=max_tokens, do_sample=False)[0]


def reference_ids(model, tok, ids: list, alpha: float, max_tokens: int = MAX_TOKENS) -> str:
    with clm_ext.alignment_strength(model, alpha), torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def health(base: str) -> dict:
    return httpx.get(base + "/health", timeout=10).json()


def raw(base: str, body, path="/v1/completions"):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(base + path, content=content, headers={"content-type": "application/json"}, timeout=60)
