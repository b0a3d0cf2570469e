"""Generation with the dial: KV cache, left padding, per-sequence alphas, beams, the `clm generate` CLI."""
import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer

import clm_ext
from clm_ext.model import alignment_parameters

PROMPTS = ["the cat runs here", "a dog", "sun shines very good today"]
MODES = ("embed", "logits")


def _perturb(model, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in alignment_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _greedy(model, tok, prompts=PROMPTS, **kwargs):
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("mode", MODES)
def test_alpha_zero_generates_what_the_base_model_generates(arch, mode):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(arch)
    base = _greedy(model, tok)
    clm_ext.add_alignment_control(model, mode=mode)
    _perturb(model)
    assert torch.equal(_greedy(model, tok), base)
    clm_ext.set_alpha(model, 1.0)
    assert not torch.equal(_greedy(model, tok), base)


@pytest.mark.parametrize("mode", MODES)
def test_the_dial_applies_to_every_generated_token(mode):
    """With the KV cache only the new token passes the embedding each step: it must be aligned too."""
    tok = tiny_tokenizer()
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"), mode=mode)
    _perturb(model)
    clm_ext.set_alpha(model, torch.tensor([1.0, 2.0, -1.0]))
    assert torch.equal(_greedy(model, tok), _greedy(model, tok, use_cache=False))


@pytest.mark.parametrize("mode", MODES)
def test_mixed_alphas_generate_what_each_prompt_generates_alone(mode):
    tok = tiny_tokenizer(padding_side="right")
    model = clm_ext.add_alignment_control(tiny_causal_lm("gemma"), mode=mode)
    _perturb(model)
    alphas = [0.0, 1.0, 2.5]
    mixed = clm_ext.generate(model, tok, PROMPTS, alphas=alphas, max_new_tokens=6, do_sample=False)
    alone = [clm_ext.generate(model, tok, [p], alphas=[a], max_new_tokens=6, do_sample=False)[0]
             for p, a in zip(PROMPTS, alphas)]
    assert mixed == alone
    assert tok.padding_side == "right"  # restored
    assert clm_ext.model.get_alpha(model).item() == 0.0  # restored
    sweep = clm_ext.generate(model, tok, PROMPTS[0], alphas=[0.0, 2.5], max_new_tokens=6, do_sample=False)
    assert sweep[0] == mixed[0] and sweep[0] != sweep[1]


@pytest.mark.parametrize("mode", MODES)
def test_beams_and_several_returns_per_prompt_keep_each_prompts_alpha(mode):
    tok = tiny_tokenizer()
    model = clm_ext.add_alignment_control(tiny_causal_lm("qwen2"), mode=mode)
    _perturb(model)
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2)
    mixed = clm_ext.generate(model, tok, PROMPTS[:2], alphas=[0.0, 2.0], **kwargs)
    alone = clm_ext.generate(model, tok, PROMPTS[:1], alphas=[0.0], **kwargs) + clm_ext.generate(
        model, tok, PROMPTS[1:2], alphas=[2.0], **kwargs)
    assert len(mixed) == 4 and mixed == alone


def test_generate_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="no alignment layer"):
        clm_ext.generate(tiny_causal_lm("llama"), tok, PROMPTS)
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match="alphas has 2 values but there are 3 prompts"):
        clm_ext.generate(model, tok, PROMPTS, alphas=[0.0, 1.0])
    with pytest.raises(TypeError, match="prompts must be"):
        clm_ext.generate(model, tok, [])
    with pytest.raises(ValueError, match="finite"):
        clm_ext.generate(model, tok, PROMPTS, alphas=float("nan"))


def test_numpy_and_tensor_scalar_alphas_are_one_alpha():
    """np.float32 is no Python float: it must still count as one alpha (it failed with "has no len()")."""
    np = pytest.importorskip("numpy")
    tok = tiny_tokenizer()
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    _perturb(model)
    want = clm_ext.generate(model, tok, PROMPTS, alphas=1.5, max_new_tokens=4, do_sample=False)
    for alpha in (np.float32(1.5), np.float64(1.5), torch.tensor(1.5)):
        assert clm_ext.generate(model, tok, PROMPTS, alphas=alpha, max_new_tokens=4, do_sample=False) == want
    sweep = clm_ext.generate(model, tok, PROMPTS[0], alphas=np.array([0.0, 1.5], dtype=np.float32), max_new_tokens=4, do_sample=False)
    assert sweep == clm_ext.generate(model, tok, PROMPTS[0], alphas=[0.0, 1.5], max_new_tokens=4, do_sample=False)


def _saved_base_and_layer(tmp_path):
    """A tiny base model under tmp_path/base and a perturbed layer under tmp_path/layer, for `clm generate`;
    returns the model with that layer and its tokenizer."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    clm_ext.add_alignment_control(model)
    _perturb(model)
    clm_ext.save_alignment(model, tmp_path / "layer")
    return model, tok


def test_cli_generate_prints_each_alpha_side_by_side(tmp_path, capsys):
    from clm_ext.cli import main

    model, tok = _saved_base_and_layer(tmp_path)
    rc = main(["generate", "--model", str(tmp_path / "base"), "--alignment", str(tmp_path / "layer"),
               "--alpha", "0", "1.5", "--prompt", "the cat runs", "a dog", "--max-new-tokens", "4", "--width", "80"])
    assert rc == 0
    out = capsys.readouterr().out
    out = out[out.index("prompt:"):]  # after any import-time notice of an optional package
    want = clm_ext.generate(model, tok, ["the cat runs"] * 2, alphas=[0.0, 1.5], max_new_tokens=4, do_sample=False)
    header = next(line for line in out.splitlines() if line.startswith("alpha=0"))
    assert "alpha=1.5" in header and "prompt: the cat runs" in out and "prompt: a dog" in out
    first_row = out.splitlines()[3]  # prompt, titles, rules, then the first wrapped line of each column
    assert first_row.split()[:2] == [want[0].split()[0], want[0].split()[1]]
    assert want[1].split()[0] in first_row


def test_cached_aligned_table_generates_the_same_tokens():
    tok = tiny_tokenizer()
    plain = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    cached = clm_ext.add_alignment_control(tiny_causal_lm("llama"), cache_aligned_table=True)
    _perturb(plain)
    _perturb(cached)
    for model in (plain, cached):
        clm_ext.set_alpha(model, torch.tensor([0.0, 1.0, 2.0]))
    with torch.inference_mode():
        assert torch.equal(_greedy(cached, tok), _greedy(plain, tok))
    assert clm_ext.model.alignment_site(cached)._table is not None


def test_cli_generate_a_tiny_temperature_is_greedy(tmp_path, capsys):
    """`clm generate --sample --temperature 1e-300` raised 'probability tensor contains inf/nan'; below
    GREEDY_BELOW sampling is greedy, as in clm serve."""
    from clm_ext.cli import main

    model, tok = _saved_base_and_layer(tmp_path)
    common = ["generate", "--model", str(tmp_path / "base"), "--alignment", str(tmp_path / "layer"), "--alpha", "0",
              "1.5", "--prompt", "the cat runs", "--max-new-tokens", "5", "--width", "80"]
    def printed(argv):
        assert main(argv) == 0
        out = capsys.readouterr().out
        return out[out.index("prompt:"):]  # after any import-time notice of an optional package

    greedy = printed(common)
    for temperature in ("1e-300", "5e-324", "1e-40"):
        assert printed([*common, "--sample", "--temperature", temperature, "--top-p", "0.5"]) == greedy, temperature


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine or torch build without CUDA")
def test_cli_generate_device_cuda_without_cuda_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    tok = tiny_tokenizer()
    tiny_causal_lm("llama").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for device in ("cuda", "cuda:1", "tpu9"):
        proc = subprocess.run([sys.executable, "-m", "clm_ext.cli", "generate", "--model", str(tmp_path / "base"),
                               "--prompt", "the cat", "--device", device], capture_output=True, text=True, timeout=120,
                              env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and "--device" in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
