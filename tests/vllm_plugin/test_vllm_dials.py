"""Named dials on vLLM (V1 model runner, CPU): a vector of alphas per request, one value per dial.

Mixed alpha vectors in one batch (chunked prefill included) equal HF + clm-ext run alone, token for token
and log-prob for log-prob; the prefix cache never mixes vectors that differ in any dial; a bad vector is
refused naming the dial; and through the OpenAI server with the middleware, a top-level {dial: value} alpha
gives the reference, /v1/models lists the dials, and a bad vector is a 400 while the server keeps serving."""
import pytest
from checkpoints import DIALS, exported_dials  # noqa: F401  (the fixture; sets vLLM's environment first)

pytest.importorskip("vllm", reason="needs vLLM: ./run test-vllm")
from test_vllm_offline import LOGPROB_TOL, _engine, _error_against_hf, _hf_greedy, _prompts  # noqa: E402
from test_vllm_server import PROMPT, _hf_reference, _post, start_server  # noqa: E402
from vllm import SamplingParams  # noqa: E402

# Each dial away from {0, 1}, negative and above 1, and the two turned apart (a swapped pair of values).
VECTORS = [{"positive": 1.5, "concise": -0.5}, {"positive": -0.5, "concise": 1.5}, {"concise": 2.0},
           {"positive": 0.5, "concise": 0.5}, {}, {"positive": 3.0, "concise": 1.0}]


@pytest.fixture(scope="module")
def llm(exported_dials):
    # vLLM's default CPU compilation (Dynamo + Inductor), as a served model runs
    return _engine(exported_dials["exported"], enable_prefix_caching=True)


def test_mixed_alpha_vectors_in_one_batch_equal_hf(exported_dials, llm):
    model, prompts = exported_dials["model"], _prompts(len(VECTORS))
    params = [SamplingParams(max_tokens=8, temperature=0, logprobs=0, extra_args={"alpha": v}) for v in VECTORS]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, vector, out in zip(prompts, VECTORS, outputs):
        tokens = list(out.outputs[0].token_ids)
        assert tokens == _hf_greedy(model, vector, prompt, 8), vector
        logprobs = [lp[t].logprob for t, lp in zip(tokens, out.outputs[0].logprobs)]
        assert _error_against_hf(model, vector, prompt, tokens, logprobs) < LOGPROB_TOL, vector
    # Swapping the two dials' values changes the answer: each dial is its own layer.
    swapped = [list(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": prompts[1]}] * 2,
        [SamplingParams(max_tokens=8, temperature=0, extra_args={"alpha": v}) for v in VECTORS[:2]])]
    assert swapped[0] != swapped[1]


def test_a_request_without_alpha_gets_every_dial_at_the_default(exported_dials, llm):
    prompt = _prompts(1, seed=3)[0]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=6, temperature=0))[0]
    assert list(out.outputs[0].token_ids) == _hf_greedy(exported_dials["model"], dict.fromkeys(DIALS, 1.0), prompt, 6)


def test_the_prefix_cache_never_shares_blocks_between_vectors(exported_dials, llm):
    model, prompt = exported_dials["model"], _prompts(2, seed=5)[1]  # 90 tokens: 2 full blocks of 32

    def run(vector):
        params = SamplingParams(max_tokens=4, temperature=0, logprobs=0, extra_args={"alpha": vector})
        out = llm.generate([{"prompt_token_ids": prompt}], params)[0]
        tokens = list(out.outputs[0].token_ids)
        return tokens, [lp[t].logprob for t, lp in zip(tokens, out.outputs[0].logprobs)], out.num_cached_tokens

    run({"positive": 1.0})
    tokens, logprobs, cached = run({"positive": 1.0, "concise": 1.0})  # differs in the second dial only
    assert cached == 0
    assert _error_against_hf(model, {"positive": 1.0, "concise": 1.0}, prompt, tokens, logprobs) < LOGPROB_TOL
    _, _, cached = run({"positive": 1.0, "concise": 0.0})  # the same vector as the first, written out
    assert cached >= 64


@pytest.mark.parametrize("alpha, fragments", [
    (1.0, ["vllm_xargs.alpha", "object of dial alphas", str(DIALS)]),
    ({"kind": 1.0}, ["'kind'", str(DIALS)]),
    ({"positive": float("nan")}, ["vllm_xargs.alpha['positive']", "finite"]),
])
def test_a_bad_vector_is_refused_naming_it_and_the_engine_keeps_serving(llm, alpha, fragments):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as err:
        llm.generate([{"prompt_token_ids": [2, 5, 6]}], SamplingParams(max_tokens=2, extra_args={"alpha": alpha}))
    assert all(f in str(err.value) for f in fragments), str(err.value)
    out = llm.generate([{"prompt_token_ids": [2, 5, 6]}],
                       SamplingParams(max_tokens=2, extra_args={"alpha": {"concise": 0.5}}))
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.fixture(scope="module")
def server(exported_dials, tmp_path_factory):
    with start_server(exported_dials["exported"], tmp_path_factory) as url:
        yield url


def test_the_server_takes_a_dial_vector_and_lists_the_dials(exported_dials, server):
    import json
    import urllib.request

    path, model, vector = exported_dials["exported"], exported_dials["model"], {"positive": -0.5, "concise": 2.0}
    status, answer = _post(server, {"model": path, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                    "logprobs": 0, "return_token_ids": True, "alpha": vector})
    assert status == 200, answer
    tokens, logprobs = _hf_reference(model, vector, PROMPT, 5)
    assert answer["choices"][0]["token_ids"] == tokens
    assert max(abs(a - b) for a, b in zip(answer["choices"][0]["logprobs"]["token_logprobs"], logprobs)) < 1e-4
    card = json.loads(urllib.request.urlopen(server + "/v1/models", timeout=30).read())["data"][0]
    assert card["dials"] == DIALS and card["alpha_default"] == 1.0 and card["alignment"] == "linear"


@pytest.mark.parametrize("alpha, param", [(1.0, "vllm_xargs.alpha"), ({"kind": 1.0}, "vllm_xargs.alpha"),
                                          ({"positive": "high"}, "alpha['positive']")])
def test_a_bad_vector_is_a_400_naming_it_and_the_server_keeps_serving(exported_dials, server, alpha, param):
    path = exported_dials["exported"]
    status, answer = _post(server, {"model": path, "prompt": PROMPT, "max_tokens": 2, "alpha": alpha})
    assert status == 400 and param in answer["error"]["message"], answer
    status, _ = _post(server, {"model": path, "prompt": PROMPT, "max_tokens": 2, "alpha": {"positive": 0.5}})
    assert status == 200
