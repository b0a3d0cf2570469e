"""Where the fused op's time goes: a torch.profiler table of its kernels (fwd+bwd) beside torch.compile's and
the bare GEMMs', at one of bench_op's shapes. Why: bench_op gives totals only; this names the kernels that
make the gap to the GEMM floor, so an optimisation starts from a measurement.

    python benchmarks/profile_op.py --device cuda [--n 16384 --d 4096 --dtype bf16] > profile.txt
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_op  # noqa: E402
import common  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--op", default="alignment_mix", choices=("alignment_mix", "embed_alignment_mix"))
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rows", type=int, default=12, help="kernels shown per provider")
    args = p.parse_args(argv)
    dtype, cuda = common.DTYPES[args.dtype], args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for alpha_kind in ("per_seq", "scalar"):
        first, table, weight, bias, alpha = bench_op.make_inputs(args.op, args.n, args.d, alpha_kind, args.device,
                                                                 dtype, 32000)
        call_args = (first, weight, bias, alpha) if table is None else (first, table, weight, bias, alpha)
        grad_inputs = [t for t in call_args if t.requires_grad]
        dy = torch.randn(*first.shape[:2], args.d, device=args.device, dtype=dtype)
        fns = {name: bench_op.phase_fns(f, call_args, grad_inputs, dy)["fwdbwd"]
               for name, f in bench_op.providers(args.op, with_compile=True).items()}
        x2 = first.reshape(-1, args.d) if table is None else table[first.reshape(-1)]
        fns["gemm"] = bench_op.gemm_fns(args.op, x2.detach(), weight.detach(), dy.reshape(-1, args.d))["fwdbwd"]
        for name, fn in fns.items():
            for _ in range(3):  # warm-up (and torch.compile's compilation)
                fn()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(args.calls):
                    fn()
                if cuda:
                    torch.cuda.synchronize()
            print(f"\n## {args.op} {alpha_kind} fwd+bwd, provider {name}, N={args.n} d={args.d} {args.dtype}, "
                  f"{args.calls} calls (times are totals over the calls)")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
