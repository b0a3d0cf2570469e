// CPU kernels of the alignment-mix ops: each is one pass over rows, split across threads with
// at::parallel_for and vectorised with at::vec (half and bfloat16 are computed in float).
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../alignment_mix.h"

namespace clm_ext {
namespace {

// Rows per task so that each task touches about at::internal::GRAIN_SIZE elements.
int64_t grain_rows(int64_t d) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(d, 1)); }

void mix_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& bias, const at::Tensor& alpha,
             int64_t rows_per_alpha) {
  const int64_t rows = out.size(0), d = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_mix_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const opmath_t* a = alpha.const_data_ptr<opmath_t>();
    at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Vec ar(a[r / rows_per_alpha]);
        scalar_t* orow = o + r * d;
        const scalar_t* xrow = xp + r * d;
        if (b != nullptr) {
          at::vec::map3([ar](Vec xv, Vec yv, Vec bv) { return xv + ar * (yv + bv - xv); }, orow, xrow, orow, b, d);
        } else {
          at::vec::map2([ar](Vec xv, Vec yv) { return xv + ar * (yv - xv); }, orow, xrow, orow, d);
        }
      }
    });
  });
}

void mix_backward_cpu(at::Tensor& p, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha,
                      int64_t rows_per_alpha, at::Tensor& row_dot) {
  const int64_t rows = p.size(0), d = p.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "clm_ext_mix_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const opmath_t* a = alpha.const_data_ptr<opmath_t>();
    opmath_t* dots = row_dot.defined() ? row_dot.data_ptr<opmath_t>() : nullptr;
    at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* prow = pp + r * d;
        const scalar_t* grow = gp + r * d;
        if (dots != nullptr) {
          dots[r] = at::vec::map3_reduce_all<scalar_t>(
              [](Vec pv, Vec gv, Vec xv) { return (pv - gv) * xv; }, [](Vec u, Vec v) { return u + v; }, prow,
              grow, xp + r * d, d);
        }
        const Vec ar(a[r / rows_per_alpha]);
        at::vec::map2([ar](Vec gv, Vec pv) { return gv + ar * (pv - gv); }, prow, grow, prow, d);
      }
    });
  });
}

void scale_rows_cpu(at::Tensor& out, const at::Tensor& src, const at::Tensor& alpha, int64_t rows_per_alpha) {
  const int64_t rows = out.size(0), d = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_scale_rows_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    const opmath_t* a = alpha.const_data_ptr<opmath_t>();
    at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Vec ar(a[r / rows_per_alpha]);
        at::vec::map([ar](Vec v) { return ar * v; }, o + r * d, sp + r * d, d);
      }
    });
  });
}

void gather_lerp_cpu(at::Tensor& out, const at::Tensor& ids, const at::Tensor& base, const at::Tensor& aligned,
                     const at::Tensor& alpha, int64_t rows_per_alpha) {
  const int64_t rows = out.size(0), d = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_gather_lerp_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t* id = ids.const_data_ptr<int64_t>();
    const scalar_t* e = base.const_data_ptr<scalar_t>();
    const scalar_t* ea = aligned.const_data_ptr<scalar_t>();
    const opmath_t* a = alpha.const_data_ptr<opmath_t>();
    at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Vec ar(a[r / rows_per_alpha]);
        at::vec::map2([ar](Vec ev, Vec av) { return ev + ar * (av - ev); }, o + r * d, e + id[r] * d,
                      ea + id[r] * d, d);
      }
    });
  });
}

constexpr Kernels kCpuKernels{mix_cpu, mix_backward_cpu, scale_rows_cpu, gather_lerp_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(clm_ext, CPU, m) { register_kernels<&kCpuKernels>(m); }

}  // namespace clm_ext
