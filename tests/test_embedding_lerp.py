"""clm_ext.ops.embedding_lerp: the decode path from a cached aligned table (gather + lerp, no GEMM)."""
import pytest
import torch

from clm_ext import ops
from test_alignment_mix import BAD_RAW_ALPHAS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(vocab, d, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(vocab, d, generator=g)
    weight = torch.eye(d) + 0.2 * torch.randn(d, d, generator=g)
    bias = 0.2 * torch.randn(d, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (embed, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,alpha", [((4, 1), [0.0, 0.5, 1.0, 2.5]), ((3, 5), -0.5), ((6,), 1.0)])
@pytest.mark.parametrize("d", [7, 64])
def test_equals_the_fused_op(device, dtype, shape, alpha, d):
    embed, weight, bias = make(31, d, dtype, device)
    aligned = ops.alignment_mix(embed, weight, bias, 1.0)
    ids = torch.randint(0, 31, shape, generator=torch.Generator().manual_seed(2)).to(device)
    a = torch.tensor(alpha, device=device) if isinstance(alpha, list) else alpha
    out = ops.embedding_lerp(ids, embed, aligned, a)
    ref = ops.embed_alignment_mix(ids, embed, weight, bias, a)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


def test_alpha_zero_is_the_embedding():
    embed, weight, bias = make(20, 16)
    ids = torch.tensor([[3, 4, 19]])
    assert torch.equal(ops.embedding_lerp(ids, embed, ops.alignment_mix(embed, weight, bias, 1.0), 0.0), embed[ids])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    embed, weight, bias = make(12, 8, torch.float64, device)
    aligned = ops.alignment_mix(embed, weight, bias, 1.0)
    ids = torch.tensor([[1, 2], [11, 0]], device=device)
    alpha = torch.tensor([0.5, 2.0], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.clm_ext.embedding_lerp.default, (ids, embed, aligned, alpha))


def test_aligned_table_must_match():
    embed, _, _ = make(12, 8)
    with pytest.raises(ValueError, match="aligned_weight must match embed_weight"):
        ops.embedding_lerp(torch.tensor([1]), embed, embed[:, :4], 1.0)


@pytest.mark.parametrize(
    "aligned,match",
    [
        (lambda e: e[:4], r"aligned_weight must have the shape of embed_weight \[12, 8\], got \[4, 8\]"),
        (lambda e: e.double(), "aligned_weight has dtype Double, expected Float"),
    ],
)
def test_direct_op_call_checks_the_aligned_table(aligned, match):
    embed, _, _ = make(12, 8)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.clm_ext.embedding_lerp(torch.tensor([[11, 3]]), embed, aligned(embed), torch.tensor(0.5))


@pytest.mark.parametrize("alpha,match", BAD_RAW_ALPHAS)
def test_direct_op_call_refuses_a_bad_alpha(alpha, match):
    embed, weight, bias = make(12, 8)
    aligned = ops.alignment_mix(embed, weight, bias, 1.0)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    with pytest.raises(RuntimeError, match="embedding_lerp: " + match.format(batch="input_ids")):
        torch.ops.clm_ext.embedding_lerp(ids, embed, aligned, alpha)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_direct_op_call_checks_devices():
    embed, weight, bias = make(12, 8, device="cuda")
    aligned = ops.alignment_mix(embed, weight, bias, 1.0)
    with pytest.raises(RuntimeError, match="aligned_weight is on cpu, expected cuda"):
        torch.ops.clm_ext.embedding_lerp(torch.tensor([[1, 2]], device="cuda"), embed, aligned.cpu(), torch.tensor(0.5))
    with pytest.raises(RuntimeError, match="input_ids are on cpu, embed_weight on cuda"):
        torch.ops.clm_ext.embedding_lerp(torch.tensor([[1, 2]]), embed, aligned, torch.tensor(0.5))


@pytest.mark.parametrize("bad_id", [12, -3, 2**40])
def test_direct_op_call_rejects_out_of_range_ids(bad_id):
    embed, weight, bias = make(12, 8)
    aligned = ops.alignment_mix(embed, weight, bias, 1.0)
    with pytest.raises(RuntimeError, match=rf"embedding_lerp: input_ids must lie in \[0, 12\), got {bad_id}"):
        torch.ops.clm_ext.embedding_lerp(torch.tensor([[1, bad_id]]), embed, aligned, torch.tensor(0.5))


def test_compiled_call_rejects_out_of_range_ids():
    embed, weight, bias = make(12, 8)
    aligned = ops.alignment_mix(embed, weight, bias, 1.0)
    compiled = torch.compile(ops.embedding_lerp, backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, 12\), got 40"):
        compiled(torch.tensor([[1, 40]]), embed, aligned, 0.5)
