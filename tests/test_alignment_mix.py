"""clm_ext.ops.alignment_mix against the eager composition: values, gradients, registration, errors."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clm_ext import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW_PRECISION = {torch.bfloat16: 3e-2, torch.float16: 3e-3}


def make(shape, d, dtype=torch.float64, device="cpu", scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    weight = torch.eye(d, dtype=torch.float64) + scale * torch.randn(d, d, generator=g, dtype=torch.float64)
    bias = scale * torch.randn(d, generator=g, dtype=torch.float64)
    return (t.to(device=device, dtype=dtype) for t in (x, weight, bias))


def per_sequence(values, dtype=torch.float64, device="cpu"):
    return torch.tensor(values, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,alpha",
    [
        ((3, 5), [-1.0, 0.5, 2.5]),  # per-sequence, outside [0, 1] too
        ((3, 5), 0.7),
        ((4,), [0.0, 1.0, -0.5, 3.0]),  # [N, d]: one alpha per row
        ((1,), 1.0),  # a single token
        ((), 1.5),  # x of shape [d]
        ((2, 1, 3), [0.25, 2.0]),  # extra dimensions follow the sequence's alpha
    ],
)
@pytest.mark.parametrize("d", [1, 7, 33, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(device, dtype, shape, alpha, d, with_bias):
    x, weight, bias = make(shape, d, dtype, device)
    bias = bias if with_bias else None
    a = per_sequence(alpha, torch.float32 if dtype == torch.float32 else dtype, device) if isinstance(alpha, list) else alpha
    out = ops.alignment_mix(x, weight, bias, a)
    ref = ops.reference_alignment_mix(x, weight, bias, a)
    assert out.shape == x.shape and out.dtype == x.dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 9), (2, 30)])  # fewer rows than d: GEMM + mix; more: alpha folded in W
def test_alpha_zero_is_exactly_the_input(device, dtype, shape):
    x, weight, bias = make(shape, 40, dtype, device, scale=1.0)
    assert torch.equal(ops.alignment_mix(x, weight, bias, 0.0), x)
    assert torch.equal(ops.alignment_mix(x, weight, bias, torch.zeros(2, device=device)), x)


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_one_is_the_aligned_layer(device):
    x, weight, bias = make((2, 9), 24, torch.float32, device)
    torch.testing.assert_close(ops.alignment_mix(x, weight, bias, 1.0), torch.nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
def test_low_precision_forward_and_grads(device, dtype):
    x64, w64, b64 = make((3, 17), 48, torch.float64, device)
    alpha = per_sequence([-0.5, 1.0, 2.0], torch.float32, device)
    tol = LOW_PRECISION[dtype]
    inputs = [t.to(dtype).requires_grad_() for t in (x64, w64, b64)]
    out = ops.alignment_mix(*inputs, alpha)
    grad = torch.randn_like(out)
    out.backward(grad)
    exact = [t.detach().to(dtype).double().requires_grad_() for t in (x64, w64, b64)]
    ref = ops.reference_alignment_mix(*exact, alpha.double())
    ref.backward(grad.double())
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * scale)
    for got, want in zip(inputs, exact):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=tol * want.grad.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, weight, bias = make((6, 4), 16, torch.float32, device)
    x_t = x.transpose(0, 1)  # [4, 6, 16], not contiguous
    w_t = weight.t().contiguous().t()  # same values, transposed strides
    alpha = per_sequence([0.0, 0.5, 1.0, 2.0], torch.float32, device)
    out = ops.alignment_mix(x_t, w_t, bias[::1], alpha)
    torch.testing.assert_close(out, ops.reference_alignment_mix(x_t, weight, bias, alpha))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, weight, bias = make((0, 3), 8, torch.float64, device)
    x.requires_grad_()
    weight.requires_grad_()
    out = ops.alignment_mix(x, weight, bias, per_sequence([], device=device))
    out.sum().backward()
    assert out.shape == (0, 3, 8) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha_kind", ["per_sequence", "scalar"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_every_input(device, alpha_kind, with_bias):
    x, weight, bias = make((3, 4), 6, torch.float64, device)
    alpha = per_sequence([-1.0, 0.5, 2.0], device=device) if alpha_kind == "per_sequence" else torch.tensor(0.7, dtype=torch.float64, device=device)
    args = [x, weight, bias if with_bias else None, alpha]
    for t in args:
        if t is not None:
            t.requires_grad_()
    assert torch.autograd.gradcheck(ops.alignment_mix, args)


@pytest.mark.parametrize("trainable", [("weight",), ("weight", "bias"), ("x",), ("alpha",), ("x", "alpha")])
@pytest.mark.parametrize("alpha", [[0.3, 1.7], 1.3])
def test_gradcheck_subsets(trainable, alpha):
    """Each output_mask combination the backward can be asked for computes the right grads."""
    x, weight, bias = make((2, 3), 5, torch.float64)
    named = {"x": x, "weight": weight, "bias": bias, "alpha": torch.tensor(alpha, dtype=torch.float64)}
    for name in trainable:
        named[name].requires_grad_()
    assert torch.autograd.gradcheck(ops.alignment_mix, tuple(named.values()))


def test_saves_no_activation():
    """Backward keeps only the op's inputs (x, the layer, alpha): no [N, d] intermediate."""
    x, weight, bias = make((4, 8), 16, torch.float32)
    alpha = per_sequence([0.0, 1.0, 2.0, 3.0], torch.float32).requires_grad_()
    weight.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.alignment_mix(x, weight, bias, alpha)
    inputs = {t.data_ptr() for t in (x, weight, bias, alpha)}
    assert saved and all(t.data_ptr() in inputs for t in saved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [[0.5, -1.0], 1.25])
def test_opcheck(device, alpha):
    x, weight, bias = make((2, 3), 8, torch.float64, device)
    a = per_sequence(alpha, device=device) if isinstance(alpha, list) else torch.tensor(alpha, dtype=torch.float64, device=device)
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in (x, weight, bias, a)]
        torch.library.opcheck(torch.ops.clm_ext.alignment_mix.default, tuple(args))
    torch.library.opcheck(
        torch.ops.clm_ext.alignment_mix_backward.default,
        (torch.randn_like(x), x, weight, bias, a, [True, False, True, True]),
    )


def test_compiles_without_graph_breaks():
    x, weight, bias = make((2, 5), 12, torch.float32)
    weight.requires_grad_()
    alpha = per_sequence([0.5, 2.0], torch.float32)
    compiled = torch.compile(ops.alignment_mix, backend="aot_eager", fullgraph=True)
    out = compiled(x, weight, bias, alpha)
    out.sum().backward()
    torch.testing.assert_close(out, ops.reference_alignment_mix(x, weight, bias, alpha))
    assert weight.grad is not None


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 9),
    d=st.integers(1, 70),
    alphas=st.lists(st.floats(-3, 3, allow_nan=False), min_size=4, max_size=4),
)
def test_random_shapes_match_reference(batch, tokens, d, alphas):
    x, weight, bias = make((batch, tokens), d, torch.float64, seed=d)
    alpha = per_sequence(alphas[:batch])
    torch.testing.assert_close(ops.alignment_mix(x, weight, bias, alpha), ops.reference_alignment_mix(x, weight, bias, alpha))


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument.


def _bad(**change):
    x, weight, bias = make((2, 3), 8, torch.float32)
    args = {"x": x, "weight": weight, "bias": bias, "alpha": 0.5}
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"weight": torch.eye(4)}, ValueError, r"weight must have shape \(8, 8\)"),
        ({"weight": torch.ones(8, 4)}, ValueError, r"weight must have shape"),
        ({"bias": torch.zeros(7)}, ValueError, r"bias must have shape \(8,\)"),
        ({"weight": torch.eye(8, dtype=torch.float64)}, TypeError, "weight dtype"),
        ({"bias": torch.zeros(8, dtype=torch.float16)}, TypeError, "bias dtype"),
        ({"alpha": math.nan}, ValueError, "alpha must be finite"),
        ({"alpha": math.inf}, ValueError, "alpha must be finite"),
        ({"alpha": torch.tensor([0.5, math.nan])}, ValueError, "alpha must be finite"),
        ({"alpha": torch.tensor([0.5, 1.0, 2.0])}, ValueError, "alpha has 3 values but the batch has 2"),
        ({"alpha": torch.ones(2, 1)}, ValueError, "alpha must be 0-d or 1-D"),
        ({"alpha": torch.tensor([1, 2])}, TypeError, "alpha must be a floating-point tensor"),
        ({"alpha": "strong"}, TypeError, "alpha must be a float or a tensor"),
        ({"x": torch.ones(2, 3, 8, dtype=torch.int64)}, TypeError, "x must be a floating-point tensor"),
        ({"x": torch.ones(8), "alpha": torch.ones(1)}, ValueError, "per-sequence alpha needs a batch dimension"),
    ],
)
def test_bad_input_errors(change, error, match):
    args = _bad(**change)
    with pytest.raises(error, match=match):
        ops.alignment_mix(args["x"], args["weight"], args["bias"], args["alpha"])


@pytest.mark.parametrize("device", DEVICES)
def test_runs_in_its_input_dtype_under_autocast(device):
    """Mixed-precision training (TRL's bf16=True) wraps the model in autocast; the op keeps fp32 inputs exact."""
    x, weight, bias = make((2, 5), 16, torch.float32, device)
    weight.requires_grad_()
    alpha = per_sequence([0.5, 2.0], torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ops.alignment_mix(x, weight, bias, alpha)
    out.sum().backward()
    assert out.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, ops.reference_alignment_mix(x, weight, bias, alpha))


# ------------------------------------------------------------------------------------------------
# Direct calls into torch.ops.clm_ext: the C++ checks its inputs itself (no Python wrapper in front).


@pytest.mark.parametrize(
    "change,match",
    [
        ({"bias": torch.zeros(3)}, r"bias must have shape \[8\]"),  # shorter than d: read out of bounds
        ({"bias": torch.zeros(8, dtype=torch.float64)}, "bias has dtype Double, expected Float"),
        ({"weight": torch.eye(4)}, r"weight must have shape \[8, 8\]"),
        ({"weight": torch.eye(8, dtype=torch.float16)}, "weight has dtype Half"),
        ({"alpha": torch.tensor([1, 2])}, "alpha must be floating point"),
        ({"alpha": torch.ones(3)}, r"alpha has 3 values but x has 2 sequences .*shape \[2\]"),
        ({"x": torch.ones(2, 3, 8, dtype=torch.int32)}, "x must be floating point"),
    ],
)
def test_direct_op_call_checks_its_inputs(change, match):
    x, weight, bias = make((2, 3), 8, torch.float32)
    args = {"x": x, "weight": weight, "bias": bias, "alpha": torch.tensor(0.5)}
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.clm_ext.alignment_mix(args["x"], args["weight"], args["bias"], args["alpha"])


# Bad alphas straight into torch.ops: refused in C++, never spread over blocks of rows.
BAD_RAW_ALPHAS = [
    (torch.ones(2), r"alpha has 2 values but {batch} has 4 sequences"),  # used to mix rows 0-5 at a[0]
    (torch.ones(12), r"alpha has 12 values but {batch} has 4 sequences"),  # used to be taken as one per row
    (torch.ones(3), r"alpha has 3 values but {batch} has 4 sequences"),  # used to mix rows in blocks of 4
    (torch.ones(2, 2), r"alpha must be 0-d or 1-D \(one value per sequence\), got shape \[2, 2\]"),
    (torch.tensor([0.5, 1.0, math.nan, 2.0]), r"alpha must be finite in Float, got nan at index 2"),
    (torch.tensor(math.inf), r"alpha must be finite in Float, got inf$"),
    (torch.tensor([0.5, 1e300, 1.0, 2.0], dtype=torch.float64), r"alpha must be finite in Float, got 1e\+300 at index 1"),
    (torch.tensor([3.5000001e38], dtype=torch.float64), r"alpha must be finite in Float, got 3.5000001e\+38 at index 0"),
]


@pytest.mark.parametrize("alpha,match", BAD_RAW_ALPHAS)
def test_direct_op_call_refuses_a_bad_alpha(alpha, match):
    x, weight, bias = make((4, 3), 8, torch.float32)
    with pytest.raises(RuntimeError, match="alignment_mix: " + match.format(batch="x")):
        torch.ops.clm_ext.alignment_mix(x, weight, bias, alpha)
    with pytest.raises(RuntimeError, match="alignment_mix_backward: " + match.format(batch="x")):
        torch.ops.clm_ext.alignment_mix_backward(torch.ones_like(x), x, weight, bias, alpha, [True] * 4)


def test_direct_op_call_takes_one_alpha_or_one_per_sequence():
    x, weight, bias = make((4, 3), 8, torch.float64)
    per_seq = torch.tensor([-1.0, 0.5, 2.0, 1e300], dtype=torch.float64)  # float64 computes in float64
    for alpha in (torch.tensor(0.7, dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64), per_seq):
        want = ops.reference_alignment_mix(x, weight, bias, alpha if alpha.numel() > 1 else alpha.reshape(()))
        torch.testing.assert_close(torch.ops.clm_ext.alignment_mix(x, weight, bias, alpha), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_direct_op_call_checks_devices():
    """A CPU bias with CUDA x would hand the kernel a host pointer."""
    x, weight, bias = make((2, 3), 8, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="bias is on cpu, expected cuda"):
        torch.ops.clm_ext.alignment_mix(x, weight, bias.cpu(), torch.tensor(0.5, device="cuda"))
    with pytest.raises(RuntimeError, match="weight is on cpu, expected cuda"):
        torch.ops.clm_ext.alignment_mix(x, weight.cpu(), bias, torch.tensor(0.5, device="cuda"))


def test_direct_backward_call_checks_the_grad():
    x, weight, bias = make((2, 3), 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"alignment_mix_backward: grad must have shape \[2, 3, 8\]"):
        torch.ops.clm_ext.alignment_mix_backward(torch.ones(2, 8), x, weight, bias, torch.tensor(0.5), [True] * 4)
    with pytest.raises(RuntimeError, match=r"alignment_mix_backward: bias must have shape \[8\]"):
        torch.ops.clm_ext.alignment_mix_backward(torch.ones_like(x), x, weight, bias[:2], torch.tensor(0.5), [True] * 4)


# ------------------------------------------------------------------------------------------------
# Double backward, the output's aliasing, alpha range, the fold threshold.


@pytest.mark.parametrize("alpha_kind", ["per_sequence", "scalar"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradgradcheck(alpha_kind, with_bias):
    x, weight, bias = make((3, 2), 5, torch.float64, scale=0.5)
    alpha = per_sequence([-1.0, 0.5, 2.0]) if alpha_kind == "per_sequence" else torch.tensor(1.7, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, weight, bias if with_bias else None, alpha) if t is not None]
    fn = ops.alignment_mix if with_bias else (lambda x, w, a: ops.alignment_mix(x, w, None, a))
    assert torch.autograd.gradgradcheck(fn, tuple(args))


def test_opcheck_of_the_backward_op_with_its_own_autograd():
    x, weight, bias = make((2, 3), 8, torch.float64)
    args = [t.requires_grad_() for t in (torch.randn_like(x), x, weight, bias, per_sequence([0.5, -1.0]))]
    torch.library.opcheck(torch.ops.clm_ext.alignment_mix_backward.default, (*args, [True] * 4))


def test_second_order_grads_equal_the_reference():
    """A gradient penalty (create_graph=True) through the op gives the eager composition's numbers."""
    x, weight, bias = make((3, 4), 6, torch.float64, scale=0.5)
    alpha = per_sequence([-0.5, 1.0, 2.5])

    def penalty_grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, alpha)]
        out = fn(*leaves)
        first = torch.autograd.grad((out.sin()).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g ** 2).sum() for g in first), leaves)

    for got, want in zip(penalty_grads(ops.alignment_mix), penalty_grads(ops.reference_alignment_mix)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_output_is_not_a_view_and_supports_in_place_use():
    x, weight, bias = make((2, 3), 8, torch.float32)
    weight.requires_grad_()
    out = ops.alignment_mix(x, weight, bias, per_sequence([0.5, 2.0], torch.float32))
    assert out._base is None
    out.mul_(3.0).add_(1.0)  # what CTRL does to its embeddings (`inputs_embeds *= ...`)
    out.sum().backward()
    ref_weight = weight.detach().clone().requires_grad_()
    (3.0 * ops.reference_alignment_mix(x, ref_weight, bias, per_sequence([0.5, 2.0], torch.float32)) + 1.0).sum().backward()
    torch.testing.assert_close(weight.grad, ref_weight.grad)


def test_alpha_must_be_finite_in_the_ops_float32():
    x, weight, bias = make((2, 3), 8, torch.float32)
    with pytest.raises(ValueError, match="alpha must be finite in float32"):
        ops.alignment_mix(x, weight, bias, 1e300)
    with pytest.raises(ValueError, match="alpha must be finite in float32"):
        ops.alignment_mix(x, weight, bias, torch.tensor([1e300, 0.5], dtype=torch.float64))
    x64, w64, b64 = make((2, 3), 8, torch.float64)  # float64 computes in float64: 1e300 is a number there
    torch.testing.assert_close(ops.alignment_mix(x64, w64, b64, 1e300), ops.reference_alignment_mix(x64, w64, b64, 1e300))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_python_alpha_on_cuda_does_not_synchronize():
    x, weight, bias = make((2, 3), 8, torch.float32, "cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.alignment_mix(x, weight, bias, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype,mixes_at", [(torch.bfloat16, 3.0), (torch.float16, 3.0), (torch.float32, 0.5)])
def test_fold_threshold_per_dtype(dtype, mixes_at):
    """One alpha folds into W only where that moves fewer bytes than the mixing pass: from rows >= 3.3 d
    in 16-bit types, from rows >= 0.67 d in float32. Below, a scalar alpha takes the same path (bit for bit)
    as a per-sequence alpha of equal values; above, the single GEMM."""
    d = 48
    x, weight, bias = make((2, int(mixes_at * d) // 2), d, dtype, scale=1.0)
    mixed = ops.alignment_mix(x, weight, bias, torch.tensor([0.7, 0.7]))
    assert torch.equal(ops.alignment_mix(x, weight, bias, 0.7), mixed)
    x, weight, bias = make((2, 2 * d), d, torch.float32, scale=1.0)  # rows = 4 d: folds in every dtype
    x, weight, bias = (t.to(dtype) for t in (x, weight, bias))
    wa = (0.7 * weight.float() + 0.3 * torch.eye(d)).to(dtype)
    folded = torch.addmm((0.7 * bias.float()).to(dtype), x.reshape(-1, d), wa.t()).view_as(x)
    assert torch.equal(ops.alignment_mix(x, weight, bias, 0.7), folded)
