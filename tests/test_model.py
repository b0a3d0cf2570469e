"""add_alignment_control on tiny random models of every architecture: the dial, save/load, merge."""
import json
import os

import pytest
import torch
from helpers import ARCHS, tiny_causal_lm, tiny_tokenizer
from transformers import AutoModelForCausalLM

import clm_ext
from clm_ext.layer import AlignedEmbedding
from clm_ext.model import alignment_layer, alignment_parameters, get_alpha

MODES = ("embed", "logits")


def _ids(batch=3, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _perturb(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in alignment_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _left_padded():
    tok = tiny_tokenizer()
    batch = tok(["the cat runs here", "a dog", "sun shines very good today"], return_tensors="pt", padding=True)
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch, position_ids


@pytest.mark.parametrize("mode", MODES)
def test_alpha_zero_is_the_base_model_bit_for_bit(arch, mode):
    model = tiny_causal_lm(arch)
    ids = _ids()
    base = _logits(model, ids)
    keys = set(model.state_dict())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert clm_ext.add_alignment_control(model, mode=mode) is model
    assert keys <= set(model.state_dict())  # base keys unchanged, the layer's added
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert torch.equal(_logits(model, ids), base)
    _perturb(model)
    assert torch.equal(_logits(model, ids), base)  # alpha is still 0
    clm_ext.set_alpha(model, 1.0)
    assert (_logits(model, ids) - base).abs().max() > 1e-3


def test_only_the_layer_trains():
    model = tiny_causal_lm("llama")
    clm_ext.add_alignment_control(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.embed_tokens.alignment.weight", "model.embed_tokens.alignment.bias"]
    assert alignment_layer(model) is model.model.embed_tokens.alignment
    clm_ext.set_alpha(model, 1.0)
    model(_ids(), labels=_ids()).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad.abs().sum() > 0 for p in alignment_parameters(model))


@pytest.mark.parametrize("mode", MODES)
def test_mixed_alphas_equal_each_sequence_alone_with_padding(mode):
    model = tiny_causal_lm("qwen2")
    clm_ext.add_alignment_control(model, mode=mode)
    _perturb(model)
    batch, pos = _left_padded()
    alphas = [0.0, 1.0, 2.5]
    clm_ext.set_alpha(model, torch.tensor(alphas))
    mixed = _logits(model, batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos)
    for row, alpha in enumerate(alphas):
        clm_ext.set_alpha(model, alpha)
        alone = _logits(model, batch["input_ids"][row:row + 1], attention_mask=batch["attention_mask"][row:row + 1],
                        position_ids=pos[row:row + 1])
        keep = batch["attention_mask"][row].bool()
        torch.testing.assert_close(mixed[row][keep], alone[0][keep], rtol=1e-5, atol=1e-5)


def test_logits_mode_mixes_the_two_streams_linearly():
    model = tiny_causal_lm("llama")
    clm_ext.add_alignment_control(model, mode="logits")
    _perturb(model)
    ids = _ids()
    z = {}
    for alpha in (0.0, 1.0, 1.5):
        clm_ext.set_alpha(model, alpha)
        z[alpha] = _logits(model, ids)
    torch.testing.assert_close(z[1.5], z[0.0] + 1.5 * (z[1.0] - z[0.0]))
    labels = _ids()
    out = model(ids, labels=labels)
    shifted = torch.nn.functional.cross_entropy(z[1.5][:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, shifted)
    assert model(ids, return_dict=False)[0].shape == (3, 6, 128)


def test_alignment_strength_restores_the_previous_alpha():
    model = tiny_causal_lm("llama")
    clm_ext.add_alignment_control(model)
    clm_ext.set_alpha(model, 0.5)
    with clm_ext.alignment_strength(model, torch.tensor([0.0, 2.0])):
        assert get_alpha(model).tolist() == [0.0, 2.0]
    assert get_alpha(model).item() == 0.5
    with pytest.raises(KeyError):
        with clm_ext.alignment_strength(model, 0.0):
            raise KeyError("boom")
    assert get_alpha(model).item() == 0.5


def test_dpo_reference_pattern_keeps_the_graph_across_alpha_changes():
    """The trainer computes reference log-probs at alpha 0 and the policy at 1, then backpropagates."""
    model = tiny_causal_lm("gpt2")
    clm_ext.add_alignment_control(model)
    _perturb(model)
    ids = _ids()
    with torch.no_grad(), clm_ext.alignment_strength(model, 0.0):
        ref = model(ids).logits
    with clm_ext.alignment_strength(model, 1.0):
        policy = model(ids).logits
    (policy - ref).pow(2).mean().backward()  # after the alpha changed back
    assert alignment_layer(model).weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_causal_lm("mistral")
        clm_ext.add_alignment_control(model)
        _perturb(model)
        clm_ext.set_alpha(model, 1.0)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(_ids(), labels=_ids()).loss.backward()
        grads.append(alignment_layer(model).weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_alpha_zero_is_the_base_model():
    model = tiny_causal_lm("gemma").to(torch.bfloat16)
    ids = _ids()
    base = _logits(model, ids)
    clm_ext.add_alignment_control(model)
    assert torch.equal(_logits(model, ids), base)
    clm_ext.set_alpha(model, torch.tensor([0.0, 1.0, 0.3]))
    assert _logits(model, ids).dtype == torch.bfloat16


def test_casting_a_wrapped_model_to_bf16_keeps_the_layer_float32():
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    clm_ext.set_alpha(model, 1e300 / 1e270)  # 1e30: large but finite in float32
    with pytest.raises(ValueError, match="finite in float32"):
        clm_ext.set_alpha(model, 1e300)
    model.to(torch.bfloat16)
    assert alignment_layer(model).weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_bf16_model_trains_a_float32_layer():
    """Updates far below bfloat16's spacing near 1 (~0.004) must reach the layer's diagonal."""
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama").to(torch.bfloat16))
    layer = alignment_layer(model)
    assert layer.weight.dtype == torch.float32
    clm_ext.set_alpha(model, 1.0)
    model(_ids(), labels=_ids()).loss.backward()
    before = layer.weight.detach().diagonal().clone()
    with torch.no_grad():
        layer.weight.sub_(1e-4 * layer.weight.grad.sign())
    assert not torch.equal(layer.weight.diagonal(), before)


@pytest.mark.slow
def test_torch_compile_follows_the_dial():
    model = tiny_causal_lm("llama")
    clm_ext.add_alignment_control(model)
    _perturb(model)
    ids = _ids()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    for alpha in (1.0, torch.tensor([0.0, 1.0, 2.0])):  # a new alpha value must not be baked in
        clm_ext.set_alpha(model, alpha)
        torch.testing.assert_close(_logits(compiled, ids), _logits(model, ids))
    clm_ext.set_alpha(model, 0.5)
    torch.testing.assert_close(_logits(compiled, ids), _logits(model, ids))
    compiled(ids, labels=ids).loss.backward()
    assert alignment_layer(model).weight.grad is not None


def test_bad_models_and_arguments_raise_clear_errors():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="no alignment layer"):
        clm_ext.set_alpha(model, 1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        clm_ext.add_alignment_control(model, mode="middle")
    with pytest.raises(ValueError, match="layer must be one of"):
        clm_ext.add_alignment_control(model, layer="lora")
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        clm_ext.add_alignment_control(torch.nn.Linear(3, 3))
    clm_ext.add_alignment_control(model)
    with pytest.raises(RuntimeError, match="already has alignment control"):
        clm_ext.add_alignment_control(model, mode="logits")
    assert sum(p.requires_grad for p in model.parameters()) == 2
    for bad in (float("nan"), float("inf"), torch.zeros(2, 2), "x"):
        with pytest.raises((ValueError, TypeError), match="alpha"):
            clm_ext.set_alpha(model, bad)
    clm_ext.set_alpha(model, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="2 values .* 3 rows"):
        model(_ids(batch=3))


def test_unwrappable_embedding_is_refused():
    model = tiny_causal_lm("llama")
    model.model.embed_tokens = torch.nn.EmbeddingBag(128, 32)
    with pytest.raises(TypeError, match="EmbeddingBag"):
        clm_ext.add_alignment_control(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed


# ------------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(arch, mode, tmp_path):
    model = tiny_causal_lm(arch)
    clm_ext.add_alignment_control(model, mode=mode)
    _perturb(model)
    clm_ext.set_alpha(model, 1.5)
    out = clm_ext.save_alignment(model, tmp_path / "layer")
    info = json.load(open(os.path.join(out, "alignment_config.json")))
    assert info["model_type"] == model.config.model_type and info["mode"] == mode and info["layer"] == "linear"
    assert info["hidden_size"] == 32 and info["dtype"] == "float32" and info["clm_ext_version"] == clm_ext.__version__
    fresh = tiny_causal_lm(arch)
    clm_ext.load_alignment(fresh, tmp_path / "layer")  # wraps it with the saved mode
    clm_ext.set_alpha(fresh, 1.5)
    ids = _ids()
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def test_save_is_atomic_and_never_clobbers_other_directories(tmp_path):
    model = tiny_causal_lm("llama")
    clm_ext.add_alignment_control(model)
    target = tmp_path / "layer"
    clm_ext.save_alignment(model, target)
    _perturb(model)
    clm_ext.save_alignment(model, target)  # replaces a previous save
    assert sorted(os.listdir(tmp_path)) == ["layer"]  # no temporary directory left behind
    names = sorted(os.listdir(target))  # the lock, one weights file (the old one deleted), the config
    assert len(names) == 3 and names[0] == ".alignment.lock" and names[2] == "alignment_config.json"
    assert names[1].startswith("alignment-") and names[1].endswith(".safetensors")
    other = tmp_path / "checkpoint"
    other.mkdir()
    (other / "model.safetensors").write_text("precious")
    with pytest.raises(FileExistsError, match="holds no alignment layer"):
        clm_ext.save_alignment(model, other)
    assert (other / "model.safetensors").read_text() == "precious"
    fresh = tiny_causal_lm("llama")
    clm_ext.load_alignment(fresh, target)
    torch.testing.assert_close(alignment_layer(fresh).weight, alignment_layer(model).weight, rtol=0, atol=0)


def test_load_refuses_what_does_not_fit(tmp_path):
    model = tiny_causal_lm("llama")
    clm_ext.add_alignment_control(model)
    clm_ext.save_alignment(model, tmp_path / "layer")
    with pytest.raises(ValueError, match="hidden_size=32.*hidden_size=64"):
        clm_ext.load_alignment(tiny_causal_lm("llama", hidden_size=64), tmp_path / "layer")
    with pytest.raises(ValueError, match="model_type='llama'.*model_type='qwen2'"):
        clm_ext.load_alignment(tiny_causal_lm("qwen2"), tmp_path / "layer")
    blocked = clm_ext.add_alignment_control(tiny_causal_lm("llama"), layer="block")
    with pytest.raises(ValueError, match="layer='linear'.*layer='block'"):
        clm_ext.load_alignment(blocked, tmp_path / "layer")
    with pytest.raises(ValueError, match="already wrapped in mode 'embed'"):
        clm_ext.load_alignment(model, tmp_path / "layer", mode="logits")
    with pytest.raises(FileNotFoundError, match="not a saved alignment layer"):
        clm_ext.load_alignment(model, tmp_path)
    with pytest.raises(ValueError, match="no alignment layer"):
        clm_ext.save_alignment(tiny_causal_lm("llama"), tmp_path / "x")


# ------------------------------------------------------------------------------------------------
# merge


def test_merge_equals_the_controlled_model_and_round_trips(arch, tmp_path):
    model = tiny_causal_lm(arch)
    tied = model.config.tie_word_embeddings
    base_head = model.get_output_embeddings().weight.detach().clone()
    clm_ext.add_alignment_control(model)
    _perturb(model)
    clm_ext.set_alpha(model, 1.5)
    ids = _ids()
    want = _logits(model, ids)
    plain = clm_ext.merge_alignment(model, alpha=1.5)
    assert type(plain) is type(model) and clm_ext.model.alignment_site(plain) is None
    assert not isinstance(plain.get_input_embeddings(), AlignedEmbedding)
    assert set(plain.state_dict()) == {k for k in model.state_dict() if ".alignment." not in k}
    torch.testing.assert_close(_logits(plain, ids), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.get_output_embeddings().weight, base_head)  # the head keeps the base table
    if tied:
        assert plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight
    torch.testing.assert_close(_logits(model, ids), want, rtol=0, atol=0)  # the controlled model is untouched
    plain.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-5, atol=1e-5)


def test_merge_refuses_what_cannot_be_folded():
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"), mode="logits")
    with pytest.raises(ValueError, match="two streams"):
        clm_ext.merge_alignment(model, alpha=0.5)
    _perturb(model)
    clm_ext.set_alpha(model, 1.0)
    plain = clm_ext.merge_alignment(model, alpha=1.0)  # alpha 1 is the aligned stream alone
    ids = _ids()
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert not plain._forward_hooks and not plain._forward_pre_hooks
    with pytest.raises(ValueError, match="single number"):
        clm_ext.merge_alignment(model, alpha=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no alignment layer"):
        clm_ext.merge_alignment(tiny_causal_lm("llama"))


def test_cli_merge(tmp_path):
    from clm_ext.cli import main

    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    clm_ext.add_alignment_control(model)
    _perturb(model)
    clm_ext.save_alignment(model, tmp_path / "layer")
    rc = main(["merge", "--model", str(tmp_path / "base"), "--alignment", str(tmp_path / "layer"),
               "--alpha", "2", "--out", str(tmp_path / "merged")])
    assert rc == 0
    clm_ext.set_alpha(model, 2.0)
    ids = _ids()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert os.path.exists(tmp_path / "merged" / "tokenizer.json")


def test_a_deepcopy_of_a_logits_mode_model_has_its_own_dial():
    import copy

    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"), mode="logits")
    _perturb(model)
    ids = _ids()
    clm_ext.set_alpha(model, 1.0)
    aligned = _logits(model, ids)
    twin = copy.deepcopy(model)
    clm_ext.set_alpha(model, 0.0)
    assert torch.equal(_logits(twin, ids), aligned)
    assert not torch.equal(_logits(model, ids), aligned)
