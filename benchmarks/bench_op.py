"""The fused alignment-mix ops against the eager PyTorch composition, torch.compile of it and the bare GEMMs.

Why: benchmarks/README.md asks how far the fused op is from its floor (the GEMMs it must do: forward
[N,d]x[d,d]; backward dx = dy W and dW = dy^T x) and how much it saves over eager. Measured for
`alignment_mix` (x, W and b trainable) and `embed_alignment_mix` (frozen table: W and b trainable, so the
backward floor is the dW GEMM alone), per-sequence and scalar alpha, forward / backward / forward+backward.
Also the decode step (one token per sequence, inference): `embed_alignment_mix` and `embedding_lerp` from a
cached aligned table against the eager gather + GEMM + lerp.

Also the fold threshold per dtype (case "fold/<dtype>", forward, no grad): with one alpha the op folds it
into the weight (W_a = I + a (W - I), then one GEMM) once rows >= a per-dtype threshold (csrc: 0.67 d in
fp32, 3.3 d in bf16/fp16, from the bytes each path moves); "mix" is the GEMM + mixing pass (the op with a
per-sequence alpha of equal values), "fold" the same ATen calls the fold makes (W_a, then addmm), "clm" the
op with a scalar alpha, which picks by the threshold (metric fold_threshold_rows).

Also the K-dial op (case "dial_mix/K=<k>/<phase>"): `dial_ops.dial_mix` (x, the stacked W_k and b_k trainable,
a different alpha vector per sequence) against the eager composition `reference_dial_mix` (K linear layers,
then the weighted sum), forward / backward / forward+backward; and its forward GEMM as one GEMM over the
stacked [K d, d] weights ("gemm_stacked", what the op does) or K GEMMs ("gemm_per_dial").

Rows: time_s per provider and phase, roofline_fraction (roofline time / median time, with ceilings measured
in the same run, at its start and its end: a large square GEMM and a large copy), flop and bytes of each shape (provider "roofline"),
saved_bytes (activations saved for backward, alpha trainable or not), peak_bytes (CUDA only) and
kernels per call (CUDA only, from the profiler).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from clm_ext import dial_ops, ops  # noqa: E402


def grids(args, device):
    """(token counts, hidden sizes, decode batches, vocab, headline (N, d)) for the mode and device."""
    if args.smoke:
        return (64,), (64,), (4,), 256, (64, 64)
    if device.type == "cuda":
        head = (16384, 4096)
        if args.quick:
            return head[:1], head[1:], (1, 64), 32000, head
        return (1, 64, 1024, 4096, 16384), (256, 1024, 4096, 8192), (1, 8, 64), 32000, head
    head = (4096, 512)
    if args.quick:
        return head[:1], head[1:], (1, 64), 32000, head
    return (1, 64, 1024, 4096), (256, 512, 1024), (1, 8, 64), 32000, head


def ceilings(device, dtype, rows, smoke, when):
    """Attainable FLOP/s (square GEMM) and bytes/s (copy), measured now: the roofline's two roofs."""
    m = 256 if smoke else (8192 if device.type == "cuda" else 2048)
    a = torch.randn(m, m, device=device, dtype=dtype)
    n = (1 << 20) if smoke else ((1 << 30) if device.type == "cuda" else (1 << 28)) // a.element_size()
    src, dst = torch.empty(n, device=device, dtype=dtype), torch.empty(n, device=device, dtype=dtype)
    t = common.time_fns({"mm": lambda: torch.mm(a, a), "copy": lambda: dst.copy_(src)}, device,
                        repeats=3 if smoke else 10, budget_s=4.0)
    flops = [2 * m ** 3 / s for s in t["mm"]]
    bw = [2 * n * a.element_size() / s for s in t["copy"]]
    rows.add(f"ceiling/{when}", f"mm {m}x{m}x{m}", "torch", "flop_per_s", "FLOP/s", flops)
    rows.add(f"ceiling/{when}", f"copy {n} elements", "torch", "bytes_per_s", "B/s", bw)
    # The roofs are the best samples (and main() keeps the better of two runs): what the machine can
    # reach, not what a loaded moment gave.
    rows.add(f"ceiling/{when}", f"mm {m}x{m}x{m}", "torch", "roof_flop_per_s", "FLOP/s", max(flops))
    rows.add(f"ceiling/{when}", f"copy {n} elements", "torch", "roof_bytes_per_s", "B/s", max(bw))
    return max(flops), max(bw)


def roofline(op, n, d, esize):
    """{phase: (flop, bytes)}: GEMM FLOP only; bytes read and written once (ids are int64)."""
    fwd = (2 * n * d * d, (2 * n * d + d * d + d) * esize)
    if op == "alignment_mix":
        bwd = (4 * n * d * d, (3 * n * d + 2 * d * d + d) * esize)
    else:
        fwd = (fwd[0], fwd[1] + 8 * n)
        bwd = (2 * n * d * d, (2 * n * d + d * d + d) * esize + 8 * n)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}


def make_inputs(op, n, d, alpha_kind, device, dtype, vocab, alpha_grad=False):
    """Inputs of one case: B = min(8, n) sequences of n // B tokens (per-sequence alpha: one value each);
    W = I + noise (a trained layer)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    b_ = min(8, n)
    weight = (torch.eye(d) + 0.02 * torch.randn(d, d, generator=g)).to(device, dtype).requires_grad_()
    bias = (0.02 * torch.randn(d, generator=g)).to(device, dtype).requires_grad_()
    alpha = torch.linspace(0.5, 1.5, b_) if alpha_kind == "per_seq" else torch.tensor(1.5)
    alpha = alpha.to(device).requires_grad_(alpha_grad)
    if op == "alignment_mix":
        first = torch.randn(b_, n // b_, d, generator=g).to(device, dtype).requires_grad_()
        table = None
    else:
        first = torch.randint(0, vocab, (b_, n // b_), generator=g).to(device)
        table = torch.randn(vocab, d, generator=g).to(device, dtype)
    return first, table, weight, bias, alpha


def providers(op, with_compile):
    if op == "alignment_mix":
        fused, eager = ops.alignment_mix, ops.reference_alignment_mix
    else:
        fused, eager = ops.embed_alignment_mix, ops.reference_embed_alignment_mix
    out = {"clm": fused, "eager": eager}
    if with_compile:
        torch._dynamo.reset()  # a fresh compile per case: no recompilation limit, no shape guards shared
        out["compile"] = torch.compile(eager, dynamic=False)
    return out


def phase_fns(fn, call_args, grad_inputs, dy):
    """fwd, bwd (backward of one retained graph) and fwd+bwd closures; grads via autograd.grad (no .grad
    accumulation, the same for every provider)."""
    graph = {}

    def fwd():
        return fn(*call_args)

    def bwd():
        if "y" not in graph:
            graph["y"] = fwd()
        return torch.autograd.grad(graph["y"], grad_inputs, dy, retain_graph=True)

    def fwdbwd():
        return torch.autograd.grad(fwd(), grad_inputs, dy)

    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwdbwd}


def gemm_fns(op, x2, w, dy2):
    """The floor: the bare torch.mm calls the op must make, on the same shapes."""
    fwd = lambda: torch.mm(x2, w.t())  # noqa: E731
    if op == "alignment_mix":
        bwd = lambda: (torch.mm(dy2, w), torch.mm(dy2.t(), x2))  # noqa: E731
    else:
        bwd = lambda: torch.mm(dy2.t(), x2)  # noqa: E731
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": lambda: (fwd(), bwd())}


def kernel_count(fn, device):
    """CUDA kernels launched by one call (profiler); None on CPU, where there are no launches."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def bench_training(op, n, d, alpha_kind, args, device, dtype, rows, pending, vocab, with_compile, budget):
    case = f"{op}/{alpha_kind}"
    shape = f"N={n} d={d}"
    esize = torch.empty((), dtype=dtype).element_size()
    first, table, w, b, alpha = make_inputs(op, n, d, alpha_kind, device, dtype, vocab)
    call_args = (first, w, b, alpha) if table is None else (first, table, w, b, alpha)
    grad_inputs = (first, w, b) if table is None else (w, b)
    dy = torch.randn(first.shape[:2] + (d,), device=device, dtype=dtype)
    x2 = (first if table is None else table[first]).detach().reshape(-1, d)
    fns = {name: phase_fns(f, call_args, grad_inputs, dy) for name, f in providers(op, with_compile).items()}
    fns["gemm"] = gemm_fns(op, x2, w.detach(), dy.reshape(-1, d))
    for phase, (flop, nbytes) in roofline(op, n, d, esize).items():
        rows.add(case + "/" + phase, shape, "roofline", "flop", "FLOP", flop)
        rows.add(case + "/" + phase, shape, "roofline", "bytes", "B", nbytes)
        pending.append((case + "/" + phase, shape, "roofline", flop, nbytes, None))
        times = common.time_fns({name: pf[phase] for name, pf in fns.items()}, device, repeats=args.repeats,
                                budget_s=budget * len(fns), min_repeat_s=args.min_repeat_s)
        for provider, pf in fns.items():
            t = times[provider]
            rows.add(case + "/" + phase, shape, provider, "time_s", "s", t)
            pending.append((case + "/" + phase, shape, provider, flop, nbytes, common.quantiles(t)[0]))
            if device.type == "cuda" and phase != "bwd":
                rows.add(case + "/" + phase, shape, provider, "peak_bytes", "B",
                         common.peak_cuda_bytes(pf[phase], device))
    print(f"  {case:34s} {shape:16s} " + "  ".join(
        f"{r['provider']}={r['median'] * 1e3:.3f}ms" for r in rows.rows[-40:]
        if r["case"] == case + "/fwdbwd" and r["shape"] == shape and r["metric"] == "time_s"
        and r["provider"] != "roofline"), flush=True)


def bench_saved(op, n, d, alpha_kind, device, dtype, rows, vocab, with_compile):
    """Activation bytes saved for backward by one forward, alpha trainable and not (parameters excluded)."""
    for alpha_grad in (False, True):
        first, table, w, b, alpha = make_inputs(op, n, d, alpha_kind, device, dtype, vocab, alpha_grad)
        call_args = (first, w, b, alpha) if table is None else (first, table, w, b, alpha)
        exclude = (w, b) if table is None else (w, b, table)
        case = f"{op}/{alpha_kind}/{'alpha_trainable' if alpha_grad else 'alpha_fixed'}"
        for provider, f in providers(op, with_compile).items():
            nbytes = common.saved_activation_bytes(lambda: f(*call_args), exclude)
            rows.add(case, f"N={n} d={d}", provider, "saved_bytes", "B", nbytes)


def bench_decode(batch, d, vocab, args, device, dtype, rows, pending, with_compile, budget):
    """One decode step of the layer at inference: `batch` sequences, one new token each, per-sequence alpha."""
    g = torch.Generator(device="cpu").manual_seed(0)
    table = torch.randn(vocab, d, generator=g).to(device, dtype)
    w = (torch.eye(d) + 0.02 * torch.randn(d, d, generator=g)).to(device, dtype)
    b = (0.02 * torch.randn(d, generator=g)).to(device, dtype)
    aligned = torch.nn.functional.linear(table, w, b)  # the cached aligned table E W^T + b
    ids = torch.randint(0, vocab, (batch, 1), generator=g).to(device)
    alpha = torch.linspace(0.5, 1.5, batch).to(device)
    fns = {
        "clm_fused": lambda: ops.embed_alignment_mix(ids, table, w, b, alpha),
        "clm_cached_lerp": lambda: ops.embedding_lerp(ids, table, aligned, alpha),
        "eager": lambda: ops.reference_embed_alignment_mix(ids, table, w, b, alpha),
    }
    if with_compile:
        torch._dynamo.reset()
        compiled = torch.compile(ops.reference_embed_alignment_mix, dynamic=False)
        fns["compile"] = lambda: compiled(ids, table, w, b, alpha)
    esize = table.element_size()
    roof = {"clm_fused": (2 * batch * d * d, (2 * batch * d + d * d + d) * esize + 8 * batch),
            "clm_cached_lerp": (3 * batch * d, 3 * batch * d * esize + 8 * batch)}
    roof["eager"] = roof["compile"] = roof["clm_fused"]
    shape = f"B={batch} d={d} V={vocab}"
    with torch.inference_mode():
        times = common.time_fns(fns, device, repeats=args.repeats, budget_s=budget * len(fns),
                                min_repeat_s=args.min_repeat_s)
        for provider, fn in fns.items():
            flop, nbytes = roof[provider]
            t = times[provider]
            rows.add("decode", shape, provider, "time_s", "s", t)
            pending.append(("decode", shape, provider, flop, nbytes, common.quantiles(t)[0]))
            kernels = kernel_count(fn, device)
            if kernels is not None:
                rows.add("decode", shape, provider, "kernels", "launches", kernels)
    print(f"  decode {shape:24s} " + "  ".join(
        f"{r['provider']}={r['median'] * 1e6:.1f}us" for r in rows.rows
        if r["case"] == "decode" and r["shape"] == shape and r["metric"] == "time_s"), flush=True)


FOLD_RATIOS = (0.25, 0.5, 0.67, 1.0, 2.0, 3.33, 4.0, 8.0)  # rows / d


def fold_threshold_rows(d, dtype):
    """csrc/alignment_mix.cpp's fold_threshold_rows: fold where building W_a moves fewer bytes than mixing."""
    size = torch.empty((), dtype=dtype).element_size()
    opmath = 8 if dtype == torch.float64 else 4
    fold = 2 * opmath if size == opmath else 4 * opmath + 2 * size
    return -(-d * fold // (3 * size))


def fold_dtypes(device):
    # bf16/fp16 on CPU run through float conversions and are not representative of a GPU's
    return (torch.float32, torch.bfloat16) if device.type == "cpu" else (torch.float32, torch.bfloat16, torch.float16)


def bench_fold(d, args, device, rows, budget):
    """Scalar alpha, forward: mixing pass against folding alpha into W, rows from d/4 to 8 d, per dtype."""
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in fold_dtypes(device):
        name = str(dtype).removeprefix("torch.")
        w = (torch.eye(d) + 0.02 * torch.randn(d, d, generator=g)).to(device, dtype)
        b = (0.02 * torch.randn(d, generator=g)).to(device, dtype)
        a = torch.tensor(0.7, device=device)
        threshold = fold_threshold_rows(d, dtype)
        rows.add(f"fold/{name}", f"d={d}", "clm", "fold_threshold_rows", "rows", threshold, dtype=name)

        def fold(x2):
            wa = w.to(a.dtype).mul(a)
            wa.diagonal().add_(a.neg().add(1))
            return torch.addmm(b.to(a.dtype).mul(a).to(dtype), x2, wa.to(dtype).t())

        line = []
        for ratio in FOLD_RATIOS:
            n = max(2, 2 * round(ratio * d / 2))
            x = torch.randn(2, n // 2, d, generator=g).to(device, dtype)
            per_seq = a.repeat(2)
            fns = {"mix": lambda: ops.alignment_mix(x, w, b, per_seq),
                   "fold": lambda: fold(x.view(-1, d)),
                   "clm": lambda: ops.alignment_mix(x, w, b, 0.7)}
            with torch.inference_mode():
                times = common.time_fns(fns, device, repeats=args.repeats, budget_s=budget * len(fns),
                                        min_repeat_s=args.min_repeat_s)
            for provider, t in times.items():
                rows.add(f"fold/{name}", f"rows={n} d={d}", provider, "time_s", "s", t, dtype=name)
            mix_s, fold_s = (common.quantiles(times[k])[0] for k in ("mix", "fold"))
            line.append(f"{n / d:.2f}d:{mix_s / fold_s:.2f}")
        print(f"  fold/{name} d={d} (threshold {threshold} rows = {threshold / d:.2f} d) mix/fold time: "
              + " ".join(line), flush=True)


def bench_dials(n, d, dials, args, device, dtype, rows, budget):
    """The K-dial op's forward / backward / forward+backward against the eager composition; one sequence of
    64 tokens per alpha vector."""
    g = torch.Generator(device="cpu").manual_seed(0)
    seqs = max(1, n // 64)
    x = torch.randn(seqs, n // seqs, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.eye(d) + 0.02 * torch.randn(dials, d, d, generator=g)).to(device, dtype).requires_grad_()
    b = (0.02 * torch.randn(dials, d, generator=g)).to(device, dtype).requires_grad_()
    alpha = (torch.rand(seqs, dials, generator=g) * 3 - 1).to(device)
    dy = torch.randn(x.shape, generator=g).to(device, dtype)
    case, shape = f"dial_mix/K={dials}", f"N={seqs * (n // seqs)} d={d}"
    fns = {name: phase_fns(f, (x, w, b, alpha), (x, w, b), dy)
           for name, f in (("clm", dial_ops.dial_mix), ("eager", dial_ops.reference_dial_mix))}
    x2, w_stacked = x.detach().reshape(-1, d), w.detach().reshape(dials * d, d)
    gemms = {"gemm_stacked": lambda: torch.mm(x2, w_stacked.t()),
             "gemm_per_dial": lambda: [torch.mm(x2, w.detach()[k].t()) for k in range(dials)]}
    for phase in ("fwd", "bwd", "fwdbwd"):
        timed = {name: pf[phase] for name, pf in fns.items()}
        if phase == "fwd":
            timed.update(gemms)
        times = common.time_fns(timed, device, repeats=args.repeats, budget_s=budget * len(timed),
                                min_repeat_s=args.min_repeat_s)
        for provider, t in times.items():
            rows.add(f"{case}/{phase}", shape, provider, "time_s", "s", t)
    print(f"  {case:34s} {shape:16s} " + "  ".join(
        f"{r['provider']}={r['median'] * 1e3:.3f}ms" for r in rows.rows[-4:]
        if r["case"] == case + "/fwdbwd" and r["metric"] == "time_s"), flush=True)


def add_roofline(rows, pending, roofs):
    """Roofline time of every shape (provider "roofline") and each measurement's fraction of it."""
    peak_flops, peak_bw = roofs
    for case, shape, provider, flop, nbytes, median in pending:
        floor_s = max(flop / peak_flops, nbytes / peak_bw)
        if median is None:
            rows.add(case, shape, "roofline", "time_s", "s", floor_s)
        else:
            rows.add(case, shape, provider, "roofline_fraction", "1", floor_s / median)


def main(argv=None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--fold-only", action="store_true", help="only the fold-threshold sweep per dtype")
    args = p.parse_args(argv)
    device, dtype = common.resolve(args)
    args.repeats = args.repeats or (3 if args.smoke else 20)
    args.min_repeat_s = 0.0 if args.smoke else 2e-3
    # Seconds of timing per provider and phase; a quick CUDA run must fit the lent GPU's few minutes.
    budget = 0.05 if args.smoke else (0.5 if device.type == "cpu" else (0.3 if args.quick else 1.0))
    with_compile = not (args.no_compile or args.smoke)
    ns, ds, batches, vocab, head = grids(args, device)
    rows = common.Rows("bench_op", device, dtype)
    roofs = ceilings(device, dtype, rows, args.smoke, "start")
    print(f"bench_op on {rows.common['device_name']}, {dtype}: ceilings {roofs[0] / 1e9:.1f} GFLOP/s, "
          f"{roofs[1] / 1e9:.1f} GB/s", flush=True)
    pending = []  # roofline fractions wait for the ceilings measured again at the end
    # Per-sequence alpha (the general case) everywhere, scalar alpha at the headline shape; torch.compile
    # (a fresh compile per case, seconds each) at the smallest batch of several tokens and the largest N;
    # --quick compiles only what the performance target names: alignment_mix forward+backward.
    for d in () if args.fold_only else ds:
        for n in ns:
            for op in ("alignment_mix", "embed_alignment_mix"):
                compiled = with_compile and n in (64, ns[-1]) and not (args.quick and op != "alignment_mix")
                for alpha_kind in ("per_seq", "scalar") if (n, d) == head else ("per_seq",):
                    bench_training(op, n, d, alpha_kind, args, device, dtype, rows, pending, vocab,
                                   compiled, budget)
                bench_saved(op, n, d, "per_seq", device, dtype, rows, vocab,
                            compiled and n == ns[-1] and not args.quick)
        for batch in batches:
            bench_decode(batch, d, vocab, args, device, dtype, rows, pending, with_compile and not args.quick,
                         budget)
    if not args.fold_only:
        for dials in (1, 3):
            bench_dials(head[0], head[1], dials, args, device, dtype, rows, budget)
    if args.fold_only or not args.quick:  # --quick: the headline cases only, not this 8-size sweep per dtype
        bench_fold(head[1], args, device, rows, 4 * budget)  # small differences: more rounds
    end = ceilings(device, dtype, rows, args.smoke, "end")
    add_roofline(rows, pending, (max(roofs[0], end[0]), max(roofs[1], end[1])))
    stem = rows.write(args.out)
    print(f"wrote {stem}.json and .csv ({len(rows.rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
