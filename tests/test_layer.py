"""The alignment layers on their own: identity at init, the mix they compute, alpha checks, the cache."""
import pickle

import pytest
import torch
from torch import nn

from clm_ext import ops
from clm_ext.alpha import alpha_tensor, expand_alpha
from clm_ext.layer import AlignedEmbedding


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


def test_alpha_and_the_float32_layer_survive_dtype_casts_exactly():
    """model.to(bfloat16) after wrapping casts the table, never the layer (its float32 master weights)."""
    emb = AlignedEmbedding.wrap(_embedding())
    _perturb(emb, scale=1e-3)  # below bfloat16's spacing near 1: a bf16 round trip would lose it
    want = emb.alignment.weight.detach().clone()
    emb.set_alpha(0.3)
    emb.to(torch.bfloat16)
    assert emb.alpha.dtype == torch.float32 and emb.alpha.item() == torch.tensor(0.3).item()
    assert emb.weight.dtype == torch.bfloat16
    assert emb.alignment.weight.dtype == torch.float32 and torch.equal(emb.alignment.weight, want)
    emb.half()
    assert emb.weight.dtype == torch.float16 and emb.alignment.weight.dtype == torch.float32
    assert emb(torch.randint(0, 20, (2, 3))).dtype == torch.float16
    emb.double()  # a float64 table computes the layer in float64, as wrap() would have made it
    assert emb.alignment.weight.dtype == torch.float64


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
        (1e300, ValueError, "finite in float32"),  # a finite Python float, inf in float32
        (torch.tensor([0.5, 1e300], dtype=torch.float64), ValueError, "finite in float32"),
        (torch.tensor([0.0, float("nan")]), ValueError, "finite"),
        (True, TypeError, "float"),
        ("1.0", TypeError, "float"),
        (torch.zeros(2, 2), ValueError, "1-D"),
        (torch.zeros(0), ValueError, "at least one"),
    ],
)
def test_alpha_tensor_rejects_bad_values(bad, error, match):
    with pytest.raises(error, match=match):
        alpha_tensor(bad)


def test_alpha_tensor_accepts_numbers_lists_and_tensors():
    assert alpha_tensor(1).dtype == torch.float32 and alpha_tensor(1).dim() == 0
    assert alpha_tensor([0, 1.5]).tolist() == [0.0, 1.5]
    assert alpha_tensor(torch.tensor([1, 2])).dtype == torch.float32


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


def test_cached_table_after_a_write_through_data_needs_a_refresh():
    """Writes through `.data` bypass PyTorch's version counter, so the cache cannot see them by itself
    (checking W's values every step would cost what the cache saves): refresh_aligned_table() rebuilds it."""
    emb = AlignedEmbedding.wrap(_embedding(), cache_aligned_table=True)
    ids = torch.randint(0, 20, (2, 5))
    emb.set_alpha(1.0)
    with torch.no_grad():
        emb(ids)
        new = torch.eye(8) + 0.5 * torch.randn(8, 8)
        emb.alignment.weight.data.copy_(new)
        emb.refresh_aligned_table()
        want = ops.reference_embed_alignment_mix(ids, emb.weight, new, emb.alignment.bias, 1.0)
        torch.testing.assert_close(emb(ids), want)


@pytest.mark.parametrize("options", [{"padding_idx": 0}, {"scale_grad_by_freq": True}, {"sparse": True}])
def test_a_trained_table_honours_the_embeddings_gradient_options(options):
    """padding_idx, scale_grad_by_freq and sparse shape the table's gradient exactly as nn.Embedding does."""
    torch.manual_seed(0)
    emb = AlignedEmbedding.wrap(nn.Embedding(20, 8, **options))
    _perturb(emb, scale=0.3)
    emb.weight.requires_grad_(True)
    ids = torch.tensor([[0, 3, 3, 5], [0, 0, 7, 3]])
    alpha = torch.tensor([0.5, 2.0])
    emb.set_alpha(alpha)
    grad = torch.randn(2, 4, 8)
    emb(ids).backward(grad)
    plain = nn.Embedding(20, 8, **options)
    with torch.no_grad():
        plain.weight.copy_(emb.weight)
    ops.reference_alignment_mix(plain(ids), emb.alignment.weight.detach(), emb.alignment.bias.detach(), alpha).backward(grad)
    assert emb.weight.grad.is_sparse == plain.weight.grad.is_sparse
    torch.testing.assert_close(emb.weight.grad.to_dense(), plain.weight.grad.to_dense())
    if "padding_idx" in options:
        assert torch.equal(emb.weight.grad[0], torch.zeros(8))


def test_logits_mode_runs_the_layer_on_the_aligned_half_only(monkeypatch):
    """The unaligned stream has alpha 0: a plain lookup, no d x d GEMM (nor dW) over its rows."""
    emb = AlignedEmbedding.wrap(_embedding(), mode="logits")
    _perturb(emb, scale=0.3)
    ids = torch.randint(0, 20, (6, 5))
    rows_seen = []
    fused = ops.embed_alignment_mix
    monkeypatch.setattr(ops, "embed_alignment_mix", lambda i, *a: rows_seen.append(i.shape[0]) or fused(i, *a))
    emb._stream_rows = 6
    out = emb(ids)
    assert rows_seen == [3]
    assert torch.equal(out[:3], nn.functional.embedding(ids[:3], emb.weight))
    want = ops.reference_embed_alignment_mix(ids[3:], emb.weight, emb.alignment.weight, emb.alignment.bias, 1.0)
    torch.testing.assert_close(out[3:], want)
