"""The alignment layers on their own: identity at init, the mix they compute, alpha checks, the cache."""
import pickle

import pytest
import torch
from torch import nn

from clm_ext import ops
from clm_ext.layer import AlignedEmbedding, as_alpha, expand_alpha


def _embedding(vocab=20, d=8, seed=0):
    torch.manual_seed(seed)
    return nn.Embedding(vocab, d)


def _perturb(emb, scale=0.1):
    with torch.no_grad():
        emb.alignment.weight.add_(scale * torch.randn_like(emb.alignment.weight))
        emb.alignment.bias.add_(scale * torch.randn_like(emb.alignment.bias))


def test_wrap_keeps_the_module_and_its_weight():
    emb = _embedding()
    weight = emb.weight
    wrapped = AlignedEmbedding.wrap(emb)
    assert wrapped is emb and isinstance(emb, nn.Embedding) and emb.weight is weight
    assert set(emb.state_dict()) == {"weight", "alignment.weight", "alignment.bias"}
    torch.testing.assert_close(emb.alignment.weight, torch.eye(8), rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -1.5, 3.0])
def test_identity_at_init_for_any_alpha(alpha):
    emb = AlignedEmbedding.wrap(_embedding())
    emb.set_alpha(alpha)
    ids = torch.randint(0, 20, (3, 5))
    assert torch.equal(emb(ids), nn.functional.embedding(ids, emb.weight))


def test_perturbed_layer_matches_the_reference_per_sequence():
    emb = AlignedEmbedding.wrap(_embedding())
    _perturb(emb)
    ids = torch.randint(0, 20, (3, 5))
    alpha = torch.tensor([0.0, 1.0, 2.5])
    emb.set_alpha(alpha)
    want = ops.reference_embed_alignment_mix(ids, emb.weight, emb.alignment.weight, emb.alignment.bias, alpha)
    torch.testing.assert_close(emb(ids), want)
    assert torch.equal(emb(ids)[0], nn.functional.embedding(ids[0], emb.weight))  # alpha 0: the table


def test_only_the_layer_gets_gradients_and_alpha_scales_them():
    emb = AlignedEmbedding.wrap(_embedding())
    emb.weight.requires_grad_(False)
    ids = torch.randint(0, 20, (2, 4))
    emb.set_alpha(0.0)
    emb(ids).sum().backward()
    assert emb.alignment.weight.grad.abs().max() == 0  # alpha 0: the layer has no effect
    emb.alignment.zero_grad()
    emb.set_alpha(1.0)
    emb(ids).sum().backward()
    assert emb.alignment.weight.grad.abs().max() > 0 and emb.weight.grad is None


def test_scaled_embedding_applies_the_scale_after_the_mix():
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    torch.manual_seed(0)
    base = GemmaTextScaledWordEmbedding(20, 8, padding_idx=0, embed_scale=8 ** 0.5)
    ids = torch.randint(0, 20, (2, 4))
    want0 = base(ids)
    emb = AlignedEmbedding.wrap(base)
    assert isinstance(emb, GemmaTextScaledWordEmbedding) and "embed_scale" not in emb.state_dict()
    assert torch.equal(emb(ids), want0)
    _perturb(emb)
    emb.set_alpha(1.0)
    mixed = ops.reference_embed_alignment_mix(ids, emb.weight, emb.alignment.weight, emb.alignment.bias, 1.0)
    torch.testing.assert_close(emb(ids), mixed * emb.embed_scale)
    assert type(pickle.loads(pickle.dumps(emb))) is type(emb)
    emb.unwrap()
    assert type(emb) is GemmaTextScaledWordEmbedding and torch.equal(emb(ids), want0)


def test_cached_aligned_table_matches_and_follows_updates():
    emb = AlignedEmbedding.wrap(_embedding(), cache_aligned_table=True)
    _perturb(emb)
    ids = torch.randint(0, 20, (3, 5))
    emb.set_alpha(torch.tensor([0.0, 0.5, 2.0]))
    with torch.no_grad():
        cached = emb(ids)
        assert emb._table is not None
        torch.testing.assert_close(cached, ops.embed_alignment_mix(ids, emb.weight, emb.alignment.weight, emb.alignment.bias, emb.alpha))
        assert torch.equal(cached[0], nn.functional.embedding(ids[0], emb.weight))
        emb.alignment.bias.add_(1.0)  # an in-place update (an optimizer step) must invalidate the table
        torch.testing.assert_close(emb(ids), ops.embed_alignment_mix(ids, emb.weight, emb.alignment.weight, emb.alignment.bias, emb.alpha))


def test_alpha_survives_dtype_casts_exactly():
    emb = AlignedEmbedding.wrap(_embedding())
    emb.set_alpha(0.3)
    emb.to(torch.bfloat16)
    assert emb.alpha.dtype == torch.float32 and emb.alpha.item() == torch.tensor(0.3).item()
    assert emb.alignment.weight.dtype == torch.bfloat16
    assert emb(torch.randint(0, 20, (2, 3))).dtype == torch.bfloat16


def test_wrap_errors():
    emb = AlignedEmbedding.wrap(_embedding())
    with pytest.raises(RuntimeError, match="already has an alignment layer"):
        AlignedEmbedding.wrap(emb)
    with pytest.raises(TypeError, match="nn.Embedding"):
        AlignedEmbedding.wrap(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="max_norm"):
        AlignedEmbedding.wrap(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="mode must be one of"):
        AlignedEmbedding.wrap(_embedding(), mode="middle")


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (float("nan"), ValueError, "finite"),
        (float("inf"), ValueError, "finite"),
        (torch.tensor([0.0, float("nan")]), ValueError, "finite"),
        (True, TypeError, "float"),
        ("1.0", TypeError, "float"),
        (torch.zeros(2, 2), ValueError, "1-D"),
        (torch.zeros(0), ValueError, "at least one"),
    ],
)
def test_as_alpha_rejects_bad_values(bad, error, match):
    with pytest.raises(error, match=match):
        as_alpha(bad)


def test_as_alpha_accepts_numbers_lists_and_tensors():
    assert as_alpha(1).dtype == torch.float32 and as_alpha(1).dim() == 0
    assert as_alpha([0, 1.5]).tolist() == [0.0, 1.5]
    assert as_alpha(torch.tensor([1, 2])).dtype == torch.float32


def test_expand_alpha_repeats_per_sequence_or_refuses():
    a = torch.tensor([0.0, 1.0])
    assert expand_alpha(a, 2) is a
    assert expand_alpha(a, 6).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert expand_alpha(torch.tensor(0.5), 7).dim() == 0
    with pytest.raises(ValueError, match="2 values .* 3 rows"):
        expand_alpha(a, 3)
    emb = AlignedEmbedding.wrap(_embedding())
    emb.set_alpha(torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="3 values"):
        emb(torch.randint(0, 20, (4, 2)))
