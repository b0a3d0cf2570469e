"""clm_ext.dial_ops (the fused K-dial mix) against a float64 reference: values, gradients, registration,
the one-dial op at K = 1, the cached-table decode path, errors."""
import pytest
import torch

from clm_ext import dial_ops, ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def make(shape, d, dials, dtype=torch.float64, device="cpu", scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    weight = torch.eye(d, dtype=torch.float64) + scale * torch.randn(dials, d, d, generator=g, dtype=torch.float64)
    bias = scale * torch.randn(dials, d, generator=g, dtype=torch.float64)
    return (t.to(device=device, dtype=dtype) for t in (x, weight, bias))


def independent_reference(x, weight, bias, alpha):
    """Row by row, dial by dial, in float64: h = x + sum_k a_k ((x W_k^T + b_k) - x)."""
    d, dials = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, d).double()
    a = alpha.double().reshape(-1, dials)
    per = rows.shape[0] // a.shape[0]
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        h = rows[r].clone()
        for k in range(dials):
            aligned = weight[k].double() @ rows[r] + (0 if bias is None else bias[k].double())
            h += a[r // per, k] * (aligned - rows[r])
        out[r] = h
    return out.reshape(x.shape)


ALPHAS = [
    ((3, 5), [[1.5, -0.5, 2.0], [0.0, 0.0, 0.0], [-1.0, 0.3, 0.7]]),  # per sequence, mixed, outside [0, 1]
    ((3, 5), [0.7, -1.25, 2.5]),  # one vector for every row
    ((2, 3), [[[1.0, 2.0, -1.0], [0.5, 0.0, 3.0], [-0.5, 1.5, 0.25]],
              [[2.0, -2.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]]),  # per token
    ((4,), [[0.0, 1.0, -0.5], [3.0, 0.1, 0.2], [1.0, 1.0, 1.0], [-2.0, 0.5, 0.5]]),  # [N, d]: per row
    ((300,), [1.5, -0.5, 0.75]),  # many rows, one vector: the folded single-GEMM path
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,alpha", ALPHAS)
@pytest.mark.parametrize("d", [1, 7, 33])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_reference(device, dtype, shape, alpha, d, with_bias):
    x, weight, bias = make(shape, d, 3, dtype, device)
    bias = bias if with_bias else None
    a = torch.tensor(alpha, dtype=torch.float32, device=device)
    out = dial_ops.dial_mix(x, weight, bias, a)
    assert out.dtype == dtype and out.shape == x.shape
    expected = independent_reference(x.cpu(), weight.cpu(), None if bias is None else bias.cpu(), a.cpu())
    scale = max(1.0, expected.abs().max().item())
    assert (out.cpu().double() - expected).abs().max().item() <= TOLERANCE[dtype] * scale * 4
    # the module's own eager reference agrees as well
    torch.testing.assert_close(out, dial_ops.reference_dial_mix(x, weight, bias, a), rtol=TOLERANCE[dtype] * 4,
                               atol=TOLERANCE[dtype] * scale * 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [5, 400])  # 400 rows at d=16: the one-dial op folds alpha into W
@pytest.mark.parametrize("with_bias", [True, False])
def test_one_dial_equals_alignment_mix_bit_for_bit(device, dtype, rows, with_bias):
    x, weight, bias = make((rows,), 16, 1, dtype, device)
    bias = bias if with_bias else None
    for alpha in (1.5, -0.75, 0.0, 1.0, 2.25):  # exactly representable: the same value in every dtype
        a = torch.tensor(alpha, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
        expected = ops.alignment_mix(x, weight[0], None if bias is None else bias[0], a)
        assert torch.equal(dial_ops.dial_mix(x, weight, bias, a.reshape(1)), expected)
    per_row = torch.linspace(-1.0, 2.0, rows, device=device)
    expected = ops.alignment_mix(x, weight[0], None if bias is None else bias[0], per_row)
    assert torch.equal(dial_ops.dial_mix(x, weight, bias, per_row[:, None]), expected)


def test_mixed_batch_equals_each_sequence_alone():
    x, weight, bias = make((4, 6), 12, 3, torch.float32)
    alpha = torch.tensor([[1.5, -0.5, 0.0], [0.0, 2.0, 1.0], [-1.0, -1.0, 3.0], [0.25, 0.5, 0.75]])
    batch = dial_ops.dial_mix(x, weight, bias, alpha)
    for i in range(4):
        torch.testing.assert_close(batch[i], dial_ops.dial_mix(x[i:i + 1], weight, bias, alpha[i])[0],
                                   rtol=1e-6, atol=1e-6)


def test_all_dials_at_zero_is_the_input_bit_for_bit():
    x, weight, bias = make((3, 7), 10, 4, torch.float32)
    for alpha in (torch.zeros(4), torch.zeros(3, 4), torch.zeros(3, 7, 4)):
        assert torch.equal(dial_ops.dial_mix(x, weight, bias, alpha), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [[[-1.0, 0.5, 2.0], [1.5, 0.0, -0.25]], [0.7, -1.3, 2.1],
                                   [[[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]], [[2.0, 0.5, -0.5], [1.0, 1.0, 1.0]]]])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_every_input(device, alpha, with_bias):
    x, weight, bias = make((2, 2), 5, 3, torch.float64, device)
    a = torch.tensor(alpha, dtype=torch.float64, device=device)
    args = [x, weight, bias if with_bias else None, a]
    for t in args:
        if t is not None:
            t.requires_grad_()
    assert torch.autograd.gradcheck(dial_ops.dial_mix, args)


@pytest.mark.parametrize("trainable", [("weight",), ("weight", "bias"), ("x",), ("alpha",), ("x", "alpha")])
def test_gradcheck_subsets(trainable):
    """Each output_mask combination the backward can be asked for computes the right grads."""
    x, weight, bias = make((2, 3), 4, 2, torch.float64)
    named = {"x": x, "weight": weight, "bias": bias, "alpha": torch.tensor([[0.3, 1.7], [-0.5, 2.0]], dtype=torch.float64)}
    for name in trainable:
        named[name].requires_grad_()
    assert torch.autograd.gradcheck(dial_ops.dial_mix, tuple(named.values()))


def test_gradients_match_the_eager_composition_in_float32():
    x, weight, bias = make((3, 4), 8, 3, torch.float32)
    a = torch.tensor([[1.5, -0.5, 2.0], [0.0, 1.0, 0.0], [-1.0, 0.3, 0.7]])
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, a)]
    refs = [t.clone().requires_grad_() for t in (x, weight, bias, a)]
    g = torch.randn_like(x)
    dial_ops.dial_mix(*leaves).backward(g)
    dial_ops.reference_dial_mix(*refs).backward(g)
    for mine, theirs in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, weight, bias = make((2, 3), 8, 3, torch.float64, device)
    for alpha in ([[0.5, -1.0, 2.0], [1.0, 0.0, 0.25]], [[1.25, 0.5, -0.5]]):
        a = torch.tensor(alpha, dtype=torch.float64, device=device)
        for requires_grad in (False, True):
            args = [t.clone().requires_grad_(requires_grad) for t in (x, weight, bias, a)]
            torch.library.opcheck(torch.ops.clm_ext.dial_mix.default, tuple(args))
        torch.library.opcheck(torch.ops.clm_ext.dial_mix_backward.default,
                              (torch.randn_like(x), x, weight, bias, a, [True, True, True, True]))
    ids = torch.tensor([[1, 4, 2], [0, 0, 3]], device=device)
    table = torch.randn(6, 8, dtype=torch.float64, device=device)
    tables = torch.randn(3, 6, 8, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.clm_ext.dial_embedding_lerp.default,
                          (ids, table, tables, torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.25]], dtype=torch.float64,
                                                            device=device)))


def test_compiles_without_graph_breaks():
    x, weight, bias = make((2, 5), 12, 3, torch.float32)
    weight.requires_grad_()
    alpha = torch.tensor([[0.5, 2.0, -1.0], [1.0, 0.0, 0.5]])
    compiled = torch.compile(dial_ops.dial_mix, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, weight, bias, alpha), dial_ops.dial_mix(x, weight, bias, alpha))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_tables_decode_path(device, dtype):
    """E[id] + sum_k a_k (T_k[id] - E[id]) with T_k = E W_k^T + b_k equals the op on the gathered rows."""
    table, weight, bias = make((20,), 16, 3, dtype, device)
    tables = torch.stack([ops.alignment_mix(table, weight[k], bias[k], 1.0) for k in range(3)])
    ids = torch.tensor([[3, 7, 19, 0], [5, 5, 1, 2]], device=device)
    for alpha in ([[1.5, -0.5, 2.0], [0.0, 1.0, -1.0]], [0.5, 0.25, -2.0],
                  [[[1.0, 0.0, 0.0]] * 4, [[0.0, 2.0, 1.0]] * 4]):
        a = torch.tensor(alpha, device=device)
        out = dial_ops.dial_embedding_lerp(ids, table, tables, a)
        expected = independent_reference(table[ids].cpu(), weight.cpu(), bias.cpu(), a.cpu())
        tol = 1e-5 if dtype == torch.float32 else 6e-2
        assert (out.cpu().double() - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())


def test_bad_inputs_get_clear_errors():
    x, weight, bias = make((2, 3), 4, 2, torch.float32)
    with pytest.raises(ValueError, match=r"alpha must have shape \(2,\)"):
        dial_ops.dial_mix(x, weight, bias, torch.zeros(3))
    with pytest.raises(ValueError, match="alpha must have shape"):
        dial_ops.dial_mix(x, weight, bias, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="alpha must be finite"):
        dial_ops.dial_mix(x, weight, bias, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"weight must have shape \(K, 4, 4\)"):
        dial_ops.dial_mix(x, weight[0], bias, torch.zeros(2))
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 4\)"):
        dial_ops.dial_mix(x, weight, bias[0], torch.zeros(2))
    with pytest.raises(TypeError, match="weight is torch.float64"):
        dial_ops.dial_mix(x, weight.double(), bias, torch.zeros(2))
    # the C++ checks, for direct torch.ops calls
    with pytest.raises(RuntimeError, match=r"alpha must have shape \[S, 2\]"):
        torch.ops.clm_ext.dial_mix(x, weight, bias, torch.zeros(2))
    with pytest.raises(RuntimeError, match="does not divide"):
        torch.ops.clm_ext.dial_mix(x, weight, bias, torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match="input_ids must lie in"):
        torch.ops.clm_ext.dial_embedding_lerp(torch.tensor([[9]]), torch.zeros(4, 3), torch.zeros(2, 4, 3),
                                              torch.zeros(1, 2))
