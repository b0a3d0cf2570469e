"""layer="block": the paper's new first decoder block (a zero-output copy of block 0), in both merge modes."""
import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer

import clm_ext
from clm_ext.model import alignment_layer, alignment_parameters

BLOCK_ARCHS = ("llama", "qwen2", "mistral", "gemma")
MODES = ("embed", "logits")
PROMPTS = ["the cat runs here", "a dog", "sun shines very good today"]


def _ids(batch=3, length=6, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _perturb(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in alignment_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _greedy(model, tok, **kwargs):
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("arch", BLOCK_ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_block_at_alpha_zero_is_the_base_model(arch, mode):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(arch)
    ids = _ids()
    base_logits, base_tokens = _logits(model, ids), _greedy(model, tok)
    keys = set(model.state_dict())
    clm_ext.add_alignment_control(model, mode=mode, layer="block")
    assert keys <= set(model.state_dict())
    block = alignment_layer(model)
    assert type(block) is type(model.model.layers[0])
    assert block.self_attn.o_proj.weight.abs().max() == 0 and block.mlp.down_proj.weight.abs().max() == 0
    clm_ext.set_alpha(model, 1.0)
    assert torch.equal(_logits(model, ids), base_logits)  # identity at init, even at alpha 1
    _perturb(model)
    clm_ext.set_alpha(model, 0.0)
    assert torch.equal(_logits(model, ids), base_logits)
    assert torch.equal(_greedy(model, tok), base_tokens)
    clm_ext.set_alpha(model, 1.0)
    assert (_logits(model, ids) - base_logits).abs().max() > 1e-3


def test_only_the_block_trains_and_checkpointing_agrees():
    grads = []
    for checkpointing in (False, True):
        model = clm_ext.add_alignment_control(tiny_causal_lm("qwen2"), layer="block", mode="logits")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("model.alignment_block.block.") for n in trainable)
        assert sum(p.numel() for p in alignment_parameters(model)) == sum(
            p.numel() for p in model.model.layers[0].parameters())
        _perturb(model)
        clm_ext.set_alpha(model, 1.0)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(_ids(), labels=_ids()).loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        grads.append(alignment_layer(model).self_attn.q_proj.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def _cache(out):
    """The output's KV cache: `cache` from transformers 5.24, `past_key_values` before."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


@pytest.mark.parametrize("mode", MODES)
def test_block_keeps_its_own_cache_and_mixed_alphas(mode):
    tok = tiny_tokenizer()
    model = clm_ext.add_alignment_control(tiny_causal_lm("mistral"), mode=mode, layer="block")
    _perturb(model)
    with torch.no_grad():
        out = model(_ids(), use_cache=True)
    assert len(_cache(out).layers) == model.config.num_hidden_layers + 1  # the block's own slot
    clm_ext.set_alpha(model, torch.tensor([1.0, 2.0, -1.0]))
    assert torch.equal(_greedy(model, tok), _greedy(model, tok, use_cache=False))
    alphas = [0.0, 1.0, 2.0]
    kwargs = dict(max_new_tokens=6, do_sample=False)
    mixed = clm_ext.generate(model, tok, PROMPTS, alphas=alphas, **kwargs)
    assert mixed == [clm_ext.generate(model, tok, [p], alphas=[a], **kwargs)[0] for p, a in zip(PROMPTS, alphas)]


def test_block_save_load_and_cli(tmp_path, capsys):
    from clm_ext.cli import main

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    clm_ext.add_alignment_control(model, mode="logits", layer="block")
    _perturb(model)
    clm_ext.save_alignment(model, tmp_path / "layer")
    fresh = clm_ext.load_alignment(tiny_causal_lm("llama"), tmp_path / "layer")
    assert clm_ext.model.alignment_site(fresh).layer_kind == "block"
    assert clm_ext.model.alignment_site(fresh).mode == "logits"
    ids = _ids()
    for alpha in (0.5, 2.0):
        clm_ext.set_alpha(model, alpha)
        clm_ext.set_alpha(fresh, alpha)
        assert torch.equal(_logits(fresh, ids), _logits(model, ids))
    with pytest.raises(ValueError, match="hidden_size"):
        clm_ext.load_alignment(tiny_causal_lm("llama", hidden_size=64, num_attention_heads=4), tmp_path / "layer")
    rc = main(["generate", "--model", str(tmp_path / "base"), "--alignment", str(tmp_path / "layer"),
               "--alpha", "0", "2", "--prompt", "a dog", "--max-new-tokens", "3"])
    assert rc == 0 and "alpha=2" in capsys.readouterr().out


def test_block_errors():
    with pytest.raises(NotImplementedError, match="layer='block' supports model types .* got 'gpt2'"):
        clm_ext.add_alignment_control(tiny_causal_lm("gpt2"), layer="block")
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"), layer="block")
    with pytest.raises(ValueError, match="cannot be folded"):
        clm_ext.merge_alignment(model, alpha=1.0)
    tok = tiny_tokenizer()
    with pytest.raises(TypeError, match="needs a DynamicCache"):
        _greedy(model, tok, cache_implementation="static")


def test_logits_mode_unaligned_stream_skips_the_block():
    """The block's cache slot holds only the aligned stream's rows, and beam search reorders it correctly."""
    tok = tiny_tokenizer()
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"), mode="logits", layer="block")
    _perturb(model)
    ids = _ids()
    with torch.no_grad():
        out = model(ids, use_cache=True)
    layers = _cache(out).layers
    assert layers[0].keys.shape[0] == 2 * ids.shape[0] and layers[-1].keys.shape[0] == ids.shape[0]
    clm_ext.set_alpha(model, torch.tensor([0.5, 1.5, 2.0]))
    beams = dict(num_beams=2, num_return_sequences=2)
    assert torch.equal(_greedy(model, tok, **beams), _greedy(model, tok, use_cache=False, **beams))
