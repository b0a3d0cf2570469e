"""clm_ext.ops.embed_alignment_mix: the gather fused in; same results and grads as gather + mix."""
import pytest
import torch

from clm_ext import ops
from test_alignment_mix import BAD_RAW_ALPHAS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(vocab, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    weight = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
    bias = 0.2 * torch.randn(d, generator=g, dtype=torch.float64)
    return (t.to(device=device, dtype=dtype) for t in (embed, weight, bias))


def ids_for(shape, vocab, device="cpu", dtype=torch.int64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    "shape,alpha", [((3, 7), [-1.0, 0.5, 2.0]), ((3, 7), 0.25), ((5,), [0.0, 1.0, 2.0, 3.0, -2.0]), ((1, 1), 1.0)]
)
@pytest.mark.parametrize("d", [5, 32])
def test_matches_gather_then_mix(device, id_dtype, shape, alpha, d):
    embed, weight, bias = make(50, d, torch.float32, device)
    ids = ids_for(shape, 50, device, id_dtype)
    a = torch.tensor(alpha, device=device) if isinstance(alpha, list) else alpha
    out = ops.embed_alignment_mix(ids, embed, weight, bias, a)
    assert out.shape == shape + (d,)
    torch.testing.assert_close(out, ops.reference_embed_alignment_mix(ids.long(), embed, weight, bias, a))


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_zero_is_the_embedding(device):
    embed, weight, bias = make(40, 24, torch.float32, device)
    ids = ids_for((2, 6), 40, device)
    assert torch.equal(ops.embed_alignment_mix(ids, embed, weight, bias, 0.0), torch.nn.functional.embedding(ids, embed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_every_input(device, with_bias):
    """Repeated ids make the embedding grad a real scatter-add."""
    embed, weight, bias = make(6, 5, torch.float64, device)
    ids = torch.tensor([[0, 3, 3, 1], [5, 0, 0, 0]], device=device)
    alpha = torch.tensor([0.5, -1.5], dtype=torch.float64, device=device)
    args = [ids, embed, weight, bias if with_bias else None, alpha]
    for t in args[1:]:
        if t is not None:
            t.requires_grad_()
    assert torch.autograd.gradcheck(ops.embed_alignment_mix, args)


def test_frozen_table_gets_no_grad_and_only_ids_are_saved():
    embed, weight, bias = make(30, 8, torch.float32)
    weight.requires_grad_()
    ids = ids_for((2, 5), 30)
    alpha = torch.tensor([1.0, 2.0])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.embed_alignment_mix(ids, embed, weight, bias, alpha)
    out.sum().backward()
    assert embed.grad is None and weight.grad is not None
    assert all(t.data_ptr() in {p.data_ptr() for p in (ids, embed, weight, bias, alpha)} for t in saved)
    assert not any(t.shape == (2, 5, 8) for t in saved)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    embed, weight, bias = make(10, 8, torch.float64, device)
    ids = ids_for((2, 3), 10, device)
    alpha = torch.tensor([0.5, 2.0], dtype=torch.float64, device=device)
    for requires_grad in (False, True):
        args = [ids] + [t.clone().requires_grad_(requires_grad) for t in (embed, weight, bias, alpha)]
        torch.library.opcheck(torch.ops.clm_ext.embed_alignment_mix.default, tuple(args))
    grad = torch.randn(2, 3, 8, dtype=torch.float64, device=device)
    torch.library.opcheck(
        torch.ops.clm_ext.embed_alignment_mix_backward.default,
        (grad, ids, embed, weight, None, alpha, [True, True, False, True]),
    )


@pytest.mark.parametrize(
    "ids,embed,error,match",
    [
        (torch.tensor([[0.0, 1.0]]), None, TypeError, "input_ids must be an int64 or int32 tensor"),
        (torch.tensor([[0, 12]]), None, IndexError, r"input_ids must lie in \[0, 10\), got values in \[0, 12\]"),
        (torch.tensor([[-1, 2]]), None, IndexError, "input_ids must lie in"),
        (torch.tensor([[0, 1]]), torch.ones(10), ValueError, "embed_weight must be 2-D"),
        (torch.tensor([[0, 1]]), torch.ones(10, 4), ValueError, r"weight must have shape \(4, 4\)"),
    ],
)
def test_bad_input_errors(ids, embed, error, match):
    table, weight, bias = make(10, 8, torch.float32)
    with pytest.raises(error, match=match):
        ops.embed_alignment_mix(ids, table if embed is None else embed, weight, bias, 1.0)


def test_alpha_length_must_match_batch():
    embed, weight, bias = make(10, 8, torch.float32)
    with pytest.raises(ValueError, match="alpha has 3 values but the batch has 2"):
        ops.embed_alignment_mix(ids_for((2, 4), 10), embed, weight, bias, torch.ones(3))


# ------------------------------------------------------------------------------------------------
# Every entry point checks the ids against the vocabulary: direct op calls and compiled code too.


@pytest.mark.parametrize("bad_id", [10, -1, 2**40])
def test_direct_op_call_rejects_out_of_range_ids(bad_id):
    embed, weight, bias = make(10, 8, torch.float32)
    ids = torch.tensor([[0, bad_id, 3]])
    with pytest.raises(RuntimeError, match=rf"embed_alignment_mix: input_ids must lie in \[0, 10\), got {bad_id}"):
        torch.ops.clm_ext.embed_alignment_mix(ids, embed, weight, bias, torch.tensor(0.5))
    grad = torch.ones(1, 3, 8)
    with pytest.raises(RuntimeError, match=r"embed_alignment_mix_backward: input_ids must lie in \[0, 10\)"):
        torch.ops.clm_ext.embed_alignment_mix_backward(grad, ids, embed, weight, bias, torch.tensor(0.5), [True] * 4)


def test_compiled_call_rejects_out_of_range_ids():
    """The Python check is skipped while compiling; the kernel's own check still stops a bad id."""
    embed, weight, bias = make(10, 8, torch.float32)
    compiled = torch.compile(ops.embed_alignment_mix, backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, 10\), got 12"):
        compiled(torch.tensor([[0, 12]]), embed, weight, bias, 0.5)


@pytest.mark.parametrize("alpha,match", BAD_RAW_ALPHAS)
def test_direct_op_call_refuses_a_bad_alpha(alpha, match):
    embed, weight, bias = make(10, 8, torch.float32)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]])
    with pytest.raises(RuntimeError, match="embed_alignment_mix: " + match.format(batch="input_ids")):
        torch.ops.clm_ext.embed_alignment_mix(ids, embed, weight, bias, alpha)
    grad = torch.ones(4, 3, 8)
    with pytest.raises(RuntimeError, match="embed_alignment_mix_backward: " + match.format(batch="input_ids")):
        torch.ops.clm_ext.embed_alignment_mix_backward(grad, ids, embed, weight, bias, alpha, [True] * 4)


def test_direct_op_call_takes_one_alpha_per_token_of_flat_ids():
    """Flat ids [T] are T sequences of one token: a per-token alpha (the packed rows of a server)."""
    embed, weight, bias = make(10, 8)
    ids = torch.tensor([3, 1, 4, 1, 5])
    alpha = torch.tensor([0.0, -1.0, 2.5, 0.3, 1.0], dtype=torch.float64)
    want = ops.reference_embed_alignment_mix(ids, embed, weight, bias, alpha)
    torch.testing.assert_close(torch.ops.clm_ext.embed_alignment_mix(ids, embed, weight, bias, alpha), want)
    with pytest.raises(RuntimeError, match="alpha has 4 values but input_ids has 5 sequences"):
        torch.ops.clm_ext.embed_alignment_mix(ids, embed, weight, bias, alpha[:4])


@pytest.mark.parametrize(
    "change,match",
    [
        ({"ids": torch.tensor([[0.0, 1.0]])}, "input_ids must be int64 or int32, got Float"),
        ({"embed": torch.ones(10)}, r"embed_weight must be 2-D \[vocab, hidden\], got \[10\]"),
        ({"bias": torch.zeros(2)}, r"bias must have shape \[8\]"),
        ({"weight": torch.eye(4)}, r"weight must have shape \[8, 8\]"),
    ],
)
def test_direct_op_call_checks_its_inputs(change, match):
    embed, weight, bias = make(10, 8, torch.float32)
    args = {"ids": torch.tensor([[0, 1]]), "embed": embed, "weight": weight, "bias": bias}
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.clm_ext.embed_alignment_mix(args["ids"], args["embed"], args["weight"], args["bias"], torch.tensor(0.5))


# ------------------------------------------------------------------------------------------------
# The table's gradient, double backward, the output's aliasing.


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_table_grad_accumulates_in_float32(device):
    """A repeated id sums its rows' grads in float32 and rounds once, not once per add in bfloat16 (on CUDA
    that was one rounded atomic add per element; CPU's index_add_ already accumulated in float)."""
    embed, weight, bias = make(4, 16, torch.bfloat16, device)
    ids = torch.tensor([[1] * 300 + [2] * 200], device=device)
    alpha = torch.tensor([0.8], device=device)
    grad = torch.randn(1, 500, 16, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    table = embed.clone().requires_grad_()
    ops.embed_alignment_mix(ids, table, weight, bias, alpha).backward(grad)
    x = torch.nn.functional.embedding(ids, embed).requires_grad_()  # the same per-row grads, from the op
    ops.alignment_mix(x, weight, bias, alpha).backward(grad)
    want = torch.zeros(4, 16, device=device).index_add_(0, ids.reshape(-1), x.grad.reshape(-1, 16).float())
    # within one bfloat16 rounding of the float32 sum (float atomics on CUDA add in no fixed order)
    torch.testing.assert_close(table.grad.float(), want, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradgradcheck(with_bias):
    embed, weight, bias = make(6, 4, torch.float64)
    ids = torch.tensor([[0, 3, 3], [5, 0, 0]])
    alpha = torch.tensor([0.5, -1.5], dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (embed, weight, alpha)] + ([bias.requires_grad_()] if with_bias else [])

    def fn(e, w, a, *b):
        return ops.embed_alignment_mix(ids, e, w, b[0] if b else None, a)

    assert torch.autograd.gradgradcheck(fn, tuple(leaves))


def test_opcheck_of_the_backward_op_with_its_own_autograd():
    embed, weight, _ = make(10, 8, torch.float64)
    grad = torch.randn(2, 3, 8, dtype=torch.float64).requires_grad_()
    alpha = torch.tensor([0.5, 2.0], dtype=torch.float64).requires_grad_()
    args = (grad, ids_for((2, 3), 10), embed.requires_grad_(), weight.requires_grad_(), None, alpha, [True, True, False, True])
    torch.library.opcheck(torch.ops.clm_ext.embed_alignment_mix_backward.default, args)


def test_output_is_not_a_view():
    embed, weight, bias = make(10, 8, torch.float32)
    weight.requires_grad_()
    out = ops.embed_alignment_mix(ids_for((2, 3), 10), embed, weight, bias, 0.5)
    assert out._base is None
    out.add_(1.0).sum().backward()
    assert weight.grad is not None
