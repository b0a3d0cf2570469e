"""`clm serve` with the block alignment layer: the block's attention in its own layer of the paged cache,
one alpha per token, each completion equal token for token to `clm_ext.generate` alone at that alpha; a
block that does not fit the model is refused at start-up in one line naming both values."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import tiny_causal_lm, tiny_tokenizer
from serve_helpers import (MAX_TOKENS, client, free_port, health, perturb, prompt, reference, reference_ids,
                           running_server, tiny_aligned_model, write_model)

import clm_ext


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-block")
    model, tok = write_model(root, layer="block")
    with running_server(root) as (base, proc, log):
        yield {"base": base, "model": model, "tok": tok, "root": root, "log": log}


def test_the_perturbed_block_is_not_the_identity(served):
    text = prompt(3, 8)
    outputs = {reference(served["model"], served["tok"], text, a) for a in (-1.0, 0.0, 1.0, 3.0)}
    assert len(outputs) == 4


def sixteen_concurrent_mixed_alphas_equal_generate_alone(served) -> None:
    """16 requests at once through the openai client, half streaming, alphas in [-1, 3], prompts of several
    pages (chunked prefill), one prompt twice: each equal token for token to clm_ext.generate alone with
    served["model"] (the reference model of the server's merge) at its alpha."""
    alphas = [-1.0, 3.0, 0.0, 1.0, 2.25, -0.5, 0.7, 1.5, 2.0, -0.25, 0.3, 2.8, 1.1, -1.0, 0.5, 3.0]
    prompts = [prompt(i, 3 + (i * 11) % 40) for i in range(16)]  # 3..42 words: several pages, chunked prefill
    prompts[15] = prompts[0]  # one prompt twice, at alphas -1 and 3
    openai = client(served["base"])

    def ask(i):
        kwargs = dict(model="tiny", prompt=prompts[i], max_tokens=MAX_TOKENS, temperature=0,
                      extra_body={"alpha": alphas[i]})
        if i % 2:
            chunks = list(openai.completions.create(stream=True, **kwargs))
            assert all(c.model_extra["alpha"] == alphas[i] for c in chunks)
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        response = openai.completions.create(**kwargs)
        assert response.model_extra["alpha"] == alphas[i] and response.usage.completion_tokens == MAX_TOKENS
        return response.choices[0].text, response.choices[0].finish_reason

    mixed_before = health(served["base"])["mixed_alpha_forwards"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert health(served["base"])["mixed_alpha_forwards"] > mixed_before  # the requests shared forwards
    for text, alpha, (got, finish) in zip(prompts, alphas, answers):
        assert finish == "length"
        assert got == reference(served["model"], served["tok"], text, alpha), (text, alpha)
    assert answers[0][0] != answers[15][0]  # the dial changed the output


def test_sixteen_concurrent_mixed_alphas_streaming_and_not_equal_generate_alone(served):
    sixteen_concurrent_mixed_alphas_equal_generate_alone(served)


def test_chat_and_the_same_long_prompt_at_three_alphas(served):
    """The prefix-sharing trap with the block: its KV at one alpha must not serve another alpha."""
    text = prompt(0, 32)  # 33 tokens: two full pages of 16 that the engine would share, one token more
    openai = client(served["base"])
    got = [openai.completions.create(model="tiny", prompt=text, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"alpha": a}).choices[0].text for a in (0.0, 2.0, -1.0)]
    assert got == [reference(served["model"], served["tok"], text, a) for a in (0.0, 2.0, -1.0)]
    messages = [{"role": "user", "content": "the cat is happy"}]
    tok = served["tok"]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    reply = openai.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"alpha": 2.5})
    assert reply.choices[0].message.content == reference_ids(served["model"], tok, ids, 2.5)
    assert health(served["base"])["prefix_sharing"] is False


def test_the_start_up_line_names_the_block_layer(served):
    served["log"].flush()
    text = (served["root"] / "server.log").read_text()
    assert "layer 'block' served in mode 'embed'" in text, text[-2000:]


def test_the_engine_gives_the_block_its_own_cache_layer():
    from clm_ext.serve.engine import Engine, EngineConfig

    model = clm_ext.add_alignment_control(tiny_aligned_model(), layer="block")
    layers = model.config.num_hidden_layers
    engine = Engine(model, tiny_tokenizer(), EngineConfig(max_queue=4, page_size=16, num_blocks=16))
    try:
        cache = engine.manager.batch_processor.cache
        assert sorted(cache.layer_to_allocator) == list(range(layers + 1))  # the model's layers, then the block's
        assert model.config.num_hidden_layers == layers  # the model's config is its own again
    finally:
        engine.stop()


def _start_up_error(tmp_path, model_dir, layer_dir) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "clm_ext.cli", "serve", "--model", str(model_dir), "--alignment",
                           str(layer_dir), "--port", str(free_port()), "--threads", "1"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("other, overrides, names", [
    ("qwen2", {}, ("model_type='qwen2'", "model_type='llama'")),
    ("llama", {"hidden_size": 64, "num_attention_heads": 4}, ("hidden_size=64", "hidden_size=32")),
    ("llama", {"num_attention_heads": 8, "num_key_value_heads": 4}, ("num_attention_heads=8", "num_attention_heads=4")),
])
def test_a_block_that_does_not_fit_the_model_is_refused_at_start_up(tmp_path, other, overrides, names):
    """The head split is checked too: 8 heads of 4 and 4 heads of 8 have the same weight shapes."""
    model = tiny_aligned_model()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    foreign = clm_ext.add_alignment_control(tiny_causal_lm(other, **overrides), layer="block")
    clm_ext.save_alignment(foreign, tmp_path / "layer")
    line = _start_up_error(tmp_path, tmp_path / "model", tmp_path / "layer")
    assert line.startswith("clm serve:") and all(name in line for name in names), line


def test_a_block_trained_in_mode_logits_is_served_in_mode_embed(tmp_path):
    """What `clm demo` trains (block/logits) serves: the served model is the embed-mode model at each alpha."""
    model = tiny_aligned_model()
    tok = tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    clm_ext.add_alignment_control(model, layer="block", mode="logits")
    perturb(model)
    clm_ext.save_alignment(model, tmp_path / "layer")
    embed = clm_ext.load_alignment(tiny_aligned_model(), tmp_path / "layer", mode="embed")
    with running_server(tmp_path) as (base, _, log):
        got = client(base).completions.create(model="tiny", prompt="the cat runs", max_tokens=MAX_TOKENS,
                                              temperature=0, extra_body={"alpha": 1.5}).choices[0].text
        log.flush()
        assert "trained in mode 'logits'" in (tmp_path / "server.log").read_text()
    assert got == reference(embed.eval(), tok, "the cat runs", 1.5)


def test_the_serve_command_clm_demo_prints_serves_its_layer(served, tmp_path):
    """`clm demo` ends with `clm serve --model M --alignment LAYER` (and the vLLM route) for each layer it wrote:
    that exact command line, given a port, serves the layer."""
    import shlex

    from clm_ext.cli.demo import serve_commands

    root = served["root"]
    text = serve_commands(str(root / "model"), [str(root / "layer")], str(tmp_path))
    serve_line = next(line.strip() for line in text.splitlines() if line.strip().startswith("clm serve "))
    assert shlex.split(serve_line) == ["clm", "serve", "--model", str(root / "model"), "--alignment", str(root / "layer")]
    assert f"clm export-vllm --model {root / 'model'} --alignment {root / 'layer'} --out {tmp_path / 'vllm-layer'}" in text
    assert f"--model {tmp_path / 'vllm-layer'} --middleware clm_ext.vllm.middleware.AlphaMiddleware" in text
    port = free_port()
    cmd = [sys.executable, "-m", "clm_ext.cli", *shlex.split(serve_line)[1:], "--port", str(port), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(tmp_path / "server.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 180
            while time.time() < deadline and proc.poll() is None:
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            got = client(base).completions.create(model="model", prompt="the cat runs", max_tokens=MAX_TOKENS,
                                                  temperature=0, extra_body={"alpha": 2.0})
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    assert got.choices[0].text == reference(served["model"], served["tok"], "the cat runs", 2.0)


# ------------------------------------------------------------------------------------------------
# --mode logits: two streams per request in every forward, logits mixed before sampling.


@pytest.fixture(scope="module")
def served_logits(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-block-logits")
    write_model(root, layer="block")
    logits = clm_ext.load_alignment(tiny_aligned_model(), root / "layer", mode="logits").eval()
    with running_server(root, ("--mode", "logits")) as (base, proc, log):
        yield {"base": base, "model": logits, "tok": tiny_tokenizer(), "root": root, "log": log}


def test_logits_mode_differs_from_embed_mode_away_from_0_and_1(served_logits):
    """The reference is worth comparing against: the two merges part at alpha outside {0, 1}."""
    embed = clm_ext.load_alignment(tiny_aligned_model(), served_logits["root"] / "layer", mode="embed").eval()
    text = prompt(5, 9)
    tok = served_logits["tok"]
    logits = served_logits["model"]
    assert any(reference(embed, tok, text, a) != reference(logits, tok, text, a) for a in (-1.0, 2.5, 3.0))


def test_logits_mode_sixteen_concurrent_mixed_alphas_equal_generate_alone(served_logits):
    sixteen_concurrent_mixed_alphas_equal_generate_alone(served_logits)
    served_logits["log"].flush()
    log = (served_logits["root"] / "server.log").read_text()
    assert "layer 'block' served in mode 'logits' (two streams per request)" in log, log[-2000:]


@pytest.mark.parametrize("layer", ["linear", "block"])
def test_logits_mode_gives_the_base_stream_its_own_cache_layers(layer):
    from clm_ext.serve.engine import Engine, EngineConfig

    model = clm_ext.add_alignment_control(tiny_aligned_model(), layer=layer)
    layers = model.config.num_hidden_layers + (layer == "block")
    engine = Engine(model, tiny_tokenizer(), EngineConfig(max_queue=4, page_size=16, num_blocks=16), merge="logits")
    try:
        assert sorted(engine.manager.batch_processor.cache.layer_to_allocator) == list(range(2 * layers))
        assert model.config.num_hidden_layers == layers - (layer == "block")
    finally:
        engine.stop()
    assert "forward" not in model.__dict__  # stop() gives the model its own forward back
