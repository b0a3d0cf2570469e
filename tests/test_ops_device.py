"""Kernel paths the small shapes of the other op tests do not reach, on every device; and the CUDA-only checks
(bad ids caught on the device, tensors on another GPU than the current one). `-k cuda` selects the CUDA ones."""
import subprocess
import sys

import pytest
import torch

from clm_ext import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _grads(fn, inputs, grad):
    out = fn(*inputs)
    return [out] + list(torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_rows_than_blocks_and_unaligned_rows_match_the_reference(device, dtype):
    """70,000 rows: more than the 65,536 blocks the CUDA backward launches, so its grid-stride loop turns; x
    one element into its storage: no row starts on 16 bytes, so the unvectorised kernels run."""
    g = torch.Generator().manual_seed(0)
    seqs, tokens, d = 7, 10_000, 16
    storage = torch.randn(seqs * tokens * d + 1, generator=g, dtype=torch.float64)
    x64 = storage[1:].view(seqs, tokens, d)
    w64 = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
    b64 = 0.2 * torch.randn(d, generator=g, dtype=torch.float64)
    alpha = torch.linspace(-1.0, 2.5, seqs, device=device)
    grad64 = torch.randn(seqs, tokens, d, generator=g, dtype=torch.float64)
    shifted = torch.empty(storage.numel(), device=device, dtype=dtype)[1:].view(seqs, tokens, d)
    shifted.copy_(x64)  # same offset on the device: not 16-byte aligned
    assert shifted.data_ptr() % 16 != 0
    inputs = [shifted.requires_grad_(), w64.to(device, dtype).requires_grad_(), b64.to(device, dtype).requires_grad_()]
    got = _grads(lambda *t: ops.alignment_mix(*t, alpha), inputs, grad64.to(device, dtype))
    # The reference: the plain composition in float64 on the CPU, from the same (rounded) values.
    exact = [t.detach().cpu().double().requires_grad_() for t in inputs]
    want = _grads(lambda *t: ops.reference_alignment_mix(*t, alpha.cpu().double()), exact,
                  grad64.to(dtype).double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, want):
        assert a.device.type == device and a.dtype == dtype
        assert ((a.cpu().double() - b).norm() / b.norm()).item() < tol


BAD_IDS = """
import sys, torch
from clm_ext import ops
op, bad = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(0)
table, w, b = torch.randn(10, 8, generator=g), torch.eye(8), torch.zeros(8)
table, w, b = table.cuda(), w.cuda(), b.cuda()
ids = torch.tensor([[0, bad, 3]], device="cuda")
try:
    if op == "embedding_lerp":
        out = ops.embedding_lerp(ids, table, ops.alignment_mix(table, w, b, 1.0), 0.5)
    else:
        out = ops.embed_alignment_mix(ids, table, w, b, 0.5)
    torch.cuda.synchronize()
except (RuntimeError, IndexError) as e:  # a device assert, or a check before the launch
    print("CAUGHT", str(e).strip().splitlines()[0])
else:
    print("NOT CAUGHT: returned", out.tolist())
"""


@needs_cuda
@pytest.mark.parametrize("op,bad", [("embedding_lerp", 10), ("embedding_lerp", -1), ("embed_alignment_mix", 10),
                                    ("embed_alignment_mix", -1)])
def test_cuda_ids_out_of_range_are_caught_on_the_device(op, bad):
    """On CUDA the Python range check would cost a device sync per call, so the kernels must check. A device
    assert poisons the CUDA context, hence a process of its own."""
    proc = subprocess.run([sys.executable, "-c", BAD_IDS, op, str(bad)], capture_output=True, text=True, timeout=120)
    assert "CAUGHT" in proc.stdout and "NOT CAUGHT" not in proc.stdout, proc.stdout + proc.stderr[-2000:]


@needs_two_gpus
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tensors_on_another_gpu_than_the_current_one(dtype):
    """The kernels launch on their tensors' GPU (a device guard), not on the current one."""
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    w = torch.eye(16) + 0.2 * torch.randn(16, 16, generator=g)
    b = 0.2 * torch.randn(16, generator=g)
    alpha = torch.tensor([-0.5, 1.0, 2.0])
    table = x.reshape(-1, 16)
    ids = torch.tensor([[1, 2], [3, 4], [14, 0]])
    x1, w1, b1, t1 = (t.to("cuda:1", dtype) for t in (x, w, b, table))
    a1, i1 = alpha.to("cuda:1"), ids.to("cuda:1")  # alpha stays float32
    out, emb = ops.alignment_mix(x1, w1, b1, a1), ops.embed_alignment_mix(i1, t1, w1, b1, a1)
    assert out.device == emb.device == torch.device("cuda:1")
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    exact = [t.cpu().double() for t in (x1, w1, b1, t1)]
    torch.testing.assert_close(out.cpu().double(), ops.reference_alignment_mix(*exact[:3], alpha.double()),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(emb.cpu().double(), ops.reference_embed_alignment_mix(
        ids, exact[3], exact[1], exact[2], alpha.double()), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="weight is on cuda:0, the input on cuda:1"):
        ops.alignment_mix(x1, w1.to("cuda:0"), b1, 1.0)
