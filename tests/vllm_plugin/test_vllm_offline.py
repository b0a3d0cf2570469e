"""The plugin inside vLLM's offline engine (V1 model runner, CPU), for the linear and the block layer:
mixed per-request alphas equal HF + clm-ext token for token and log-prob for log-prob, chunked prefill
included; the prefix cache never mixes alphas; a bad alpha is refused; a forward whose alphas were not
written raises; a block layer made for another model is refused at start-up."""
import json
import math
import shutil
import subprocess
import sys

import pytest
from checkpoints import LAYERS, exported  # noqa: F401  (the fixture; sets vLLM's environment first)

vllm = pytest.importorskip("vllm", reason="needs vLLM: ./run test-vllm")
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import clm_ext  # noqa: E402

ALPHAS = [0.0, 1.0, 0.5, 2.0, -1.0, 1.5]
MAX_BATCHED = 64  # a prompt longer than this is prefilled in chunks, mixed with other requests' decodes
LOGPROB_TOL = 1e-4


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 90, 17, 130, 3, 40][:n]  # 90 and 130 > MAX_BATCHED: chunked prefill
    return [[2] + torch.randint(4, 512, (k - 1,), generator=g).tolist() for k in lengths]


def _engine(path, **kwargs):
    return LLM(path, dtype="float32", block_size=32, max_model_len=256, max_num_batched_tokens=MAX_BATCHED,
               max_num_seqs=8, seed=0, **kwargs)


@pytest.fixture(scope="module", params=LAYERS)
def layer(request):
    """The layer kind the engines serve; pytest runs every test of one kind before starting the next
    kind's engines (module scope), so two engines live at a time."""
    return request.param


@pytest.fixture(scope="module")
def llama(exported, layer):
    # vLLM's default compilation (torch.compile of the model) on the Llama engine, eager on the Qwen2 one.
    return _engine(exported[layer]["llama"]["exported"], enable_prefix_caching=True)


@pytest.fixture(scope="module")
def qwen2(exported, layer):
    return _engine(exported[layer]["qwen2"]["exported"], enforce_eager=True)


def _hf_logprobs(model, alpha, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from the HF model wrapped with clm-ext, at `alpha`."""
    clm_ext.set_alpha(model, alpha)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def _hf_greedy(model, alpha, prompt, n):
    clm_ext.set_alpha(model, alpha)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_alphas_in_one_batch_equal_hf(arch, exported, layer, request):
    llm, model = request.getfixturevalue(arch), exported[layer][arch]["model"]
    prompts = _prompts(len(ALPHAS))
    params = [SamplingParams(max_tokens=8, temperature=0, logprobs=0, extra_args={"alpha": a}) for a in ALPHAS]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, alpha, out in zip(prompts, ALPHAS, outputs):
        tokens = list(out.outputs[0].token_ids)
        assert tokens == _hf_greedy(model, alpha, prompt, 8), f"alpha={alpha}"
        got = [lp[t].logprob for t, lp in zip(tokens, out.outputs[0].logprobs)]
        want = _hf_logprobs(model, alpha, prompt + tokens)[len(prompt) - 1:]
        assert max(abs(a - b) for a, b in zip(got, want)) < LOGPROB_TOL, f"alpha={alpha}"
    # The alphas matter at this tolerance: the same prompt scores differently at 0 and 1.
    a0, a1 = (_hf_logprobs(model, a, prompts[1]) for a in (0.0, 1.0))
    assert max(abs(x - y) for x, y in zip(a0, a1)) > 100 * LOGPROB_TOL


def test_request_without_alpha_gets_the_checkpoints_default(exported, layer, qwen2):
    prompt = _prompts(1, seed=3)[0]
    out = qwen2.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=6, temperature=0))[0]
    assert list(out.outputs[0].token_ids) == _hf_greedy(exported[layer]["qwen2"]["model"], 1.0, prompt, 6)  # export default


def test_the_kv_cache_has_one_layer_more_with_the_block(exported, layer, qwen2):
    """vLLM counts the block's attention in its KV-cache config, as layer L after the model's L layers, and
    gives it a cache of its own."""
    runner = qwen2.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    names = [name for group in runner.kv_cache_config.kv_cache_groups for name in group.layer_names]
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
    assert sorted(names) == layers + (["model.layers.2.self_attn.attn"] if layer == "block" else [])
    context = runner.compilation_config.static_forward_context
    assert len({context[name].kv_cache[0].data_ptr() for name in names}) == len(names)


def _continuation(llm, prompt, alpha):
    """(greedy tokens, their log-probs, prompt tokens served from the prefix cache). Generated-token
    log-probs, because vLLM never serves prompt_logprobs requests from the prefix cache."""
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=0, extra_args={"alpha": alpha})
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    tokens = list(out.outputs[0].token_ids)
    return tokens, [lp[t].logprob for t, lp in zip(tokens, out.outputs[0].logprobs)], out.num_cached_tokens


def _error_against_hf(model, alpha, prompt, tokens, logprobs):
    want = _hf_logprobs(model, alpha, prompt + tokens)[len(prompt) - 1:]
    return max(abs(a - b) for a, b in zip(logprobs, want))


def test_prefix_cache_never_serves_one_alphas_kv_to_another(exported, layer, llama):
    model, prompt = exported[layer]["llama"]["model"], _prompts(2, seed=5)[1]  # 90 tokens: 2 full blocks of 32
    _continuation(llama, prompt, 0.0)  # fills the cache at alpha 0
    tokens, logprobs, cached = _continuation(llama, prompt, 1.0)
    assert cached == 0
    assert tokens == _hf_greedy(model, 1.0, prompt, 4)
    assert _error_against_hf(model, 1.0, prompt, tokens, logprobs) < LOGPROB_TOL
    tokens, logprobs, cached = _continuation(llama, prompt, 0.0)  # the same alpha still shares its blocks
    assert cached >= 64
    assert _error_against_hf(model, 0.0, prompt, tokens, logprobs) < LOGPROB_TOL


def test_without_the_salt_the_prefix_cache_would_mix_alphas(exported, layer, llama, monkeypatch):
    """The trap the salt closes is real: with a salt that ignores alpha, a cached alpha-0 prefix is served
    to an alpha-1 request and its log-probs go wrong."""
    from clm_ext.vllm import hooks

    monkeypatch.setattr(hooks, "cache_salt", lambda alpha, salt: salt)
    model, prompt = exported[layer]["llama"]["model"], _prompts(2, seed=7)[1]
    _continuation(llama, prompt, 0.0)
    tokens, logprobs, cached = _continuation(llama, prompt, 1.0)
    assert cached >= 64
    assert _error_against_hf(model, 1.0, prompt, tokens, logprobs) > 100 * LOGPROB_TOL


@pytest.mark.parametrize("alpha", ["1", float("nan"), math.inf, None, True])
def test_bad_alpha_is_refused_and_the_engine_keeps_serving(qwen2, alpha):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="vllm_xargs.alpha"):
        qwen2.generate([{"prompt_token_ids": [2, 5, 6]}], SamplingParams(max_tokens=2, extra_args={"alpha": alpha}))
    out = qwen2.generate([{"prompt_token_ids": [2, 5, 6]}], SamplingParams(max_tokens=2, extra_args={"alpha": 0.5}))
    assert len(out[0].outputs[0].token_ids) == 2


def test_a_forward_without_written_alphas_raises(qwen2, monkeypatch):
    """If the runner hook does not run (another vLLM version), the forward refuses instead of serving
    stale or default alphas. Runs last on this engine: the failed step may leave it unusable."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    monkeypatch.setattr(GPUModelRunner, "_prepare_inputs", GPUModelRunner._prepare_inputs.__wrapped__)
    with pytest.raises(Exception) as err:
        qwen2.generate([{"prompt_token_ids": [2, 5, 6]}], SamplingParams(max_tokens=2, extra_args={"alpha": 1.0}))
    assert "alpha buffer was not written" in "".join(map(str, _chain(err.value)))


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


@pytest.mark.parametrize("key, value", [("num_key_value_heads", 2), ("model_type", "qwen2"), ("hidden_size", 64)])
def test_a_block_layer_made_for_another_model_is_refused_at_start_up(exported, tmp_path, key, value):
    """The exporter checks the pair; a directory edited (or assembled) by hand is checked again when vLLM
    builds the model: one line naming both values."""
    path = shutil.copytree(exported["block"]["llama"]["exported"], tmp_path / "edited")
    config = json.loads((path / "config.json").read_text())
    have = config["clm_alignment"]["block"][key]
    config["clm_alignment"]["block"][key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as err:
        _engine(str(path), enforce_eager=True)
    message = f"the block layer was made for {key}={value!r}, the model has {key}={have!r}"
    assert any(message in str(e) for e in _chain(err.value)), [str(e) for e in _chain(err.value)]


def test_the_runtime_plugin_does_not_import_the_exporter():
    """vLLM's processes load the plugin and the format it reads (clm_ext.vllm_format), not the exporter."""
    code = ("import sys, clm_ext.vllm, clm_ext.vllm.models; clm_ext.vllm.register(); "
            "print(sorted(m for m in sys.modules if m.startswith('clm_ext.vllm')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "clm_ext.vllm_format" in loaded and "clm_ext.vllm_export" not in loaded, loaded
