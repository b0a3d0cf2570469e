// CPU kernels of the K-dial ops: one pass over rows, split across threads with at::parallel_for and
// vectorised with at::vec. Half and bfloat16 rows are widened into a per-task float buffer, so every dial's
// term accumulates in float and the result rounds once (with K = 1: the one-dial kernels' arithmetic).
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../dial_mix.h"

namespace clm_ext {
namespace {

int64_t grain(int64_t work_per_row) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work_per_row, 1));
}

// A row as opmath values: the row itself for float/double, else widened into `buffer`.
template <typename scalar_t, typename opmath_t>
const opmath_t* widen(const scalar_t* row, opmath_t* buffer, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return row;
  } else {
    at::vec::convert(row, buffer, d);
    return buffer;
  }
}

// out = base + sum_k a[k] * (y_k + bias_k - base), y_k = y + k * dial_stride; in the opmath type.
template <typename opmath_t>
void combine_row(opmath_t* out, const opmath_t* base, const opmath_t* const* y, const opmath_t* bias,
                 const opmath_t* a, int64_t dials, int64_t d) {
  using Vec = at::vec::Vectorized<opmath_t>;
  for (int64_t i = 0; i < d; i += Vec::size()) {
    const int n = static_cast<int>(std::min<int64_t>(Vec::size(), d - i));
    const Vec xv = Vec::loadu(base + i, n);
    Vec acc = xv;
    for (int64_t k = 0; k < dials; ++k) {
      const Vec yv = Vec::loadu(y[k] + i, n);
      if (bias != nullptr) {
        acc = acc + Vec(a[k]) * (yv + Vec::loadu(bias + k * d + i, n) - xv);
      } else {
        acc = acc + Vec(a[k]) * (yv - xv);
      }
    }
    acc.store(out + i, n);
  }
}

// The shared body of `combine` and `gather_combine`: row r reads base row base_row(r) and dial rows
// dial_row(r, k), writes out[r].
template <typename scalar_t, typename BaseRow, typename DialRow>
void combine_rows(at::Tensor& out, const at::Tensor& bias, const at::Tensor& alpha, int64_t rows_per_alpha,
                  int64_t dials, BaseRow base_row, DialRow dial_row) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t rows = out.size(0), d = out.size(1);
  scalar_t* o = out.data_ptr<scalar_t>();
  const opmath_t* b = bias.defined() ? bias.const_data_ptr<opmath_t>() : nullptr;
  const opmath_t* a = alpha.const_data_ptr<opmath_t>();
  at::parallel_for(0, rows, grain(d * (dials + 1)), [&](int64_t begin, int64_t end) {
    constexpr bool wide = !std::is_same_v<scalar_t, opmath_t>;
    std::vector<opmath_t> buffer(wide ? (dials + 2) * d : 0);
    std::vector<const opmath_t*> y(dials);
    for (int64_t r = begin; r < end; ++r) {
      const opmath_t* x = widen(base_row(r), buffer.data(), d);
      for (int64_t k = 0; k < dials; ++k) y[k] = widen(dial_row(r, k), buffer.data() + (k + 1) * d, d);
      const opmath_t* ar = a + (r / rows_per_alpha) * dials;
      if constexpr (wide) {
        opmath_t* acc = buffer.data() + (dials + 1) * d;
        combine_row(acc, x, y.data(), b, ar, dials, d);
        at::vec::convert(acc, o + r * d, d);
      } else {
        combine_row(o + r * d, x, y.data(), b, ar, dials, d);
      }
    }
  });
}

void combine_cpu(at::Tensor& out, const at::Tensor& base, const at::Tensor& y, const at::Tensor& bias,
                 const at::Tensor& alpha, int64_t rows_per_alpha) {
  const int64_t d = out.size(1), dials = y.size(1) / d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_combine_cpu", [&] {
    const scalar_t* xp = base.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    combine_rows<scalar_t>(
        out, bias, alpha, rows_per_alpha, dials, [&](int64_t r) { return xp + r * d; },
        [&](int64_t r, int64_t k) { return yp + (r * dials + k) * d; });
  });
}

void gather_combine_cpu(at::Tensor& out, const at::Tensor& ids, const at::Tensor& base, const at::Tensor& aligned,
                        const at::Tensor& alpha, int64_t rows_per_alpha) {
  const int64_t d = out.size(1), dials = aligned.size(0), table = aligned.size(1) * d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_gather_combine_cpu", [&] {
    const int64_t* id = ids.const_data_ptr<int64_t>();
    const scalar_t* ep = base.const_data_ptr<scalar_t>();
    const scalar_t* ap = aligned.const_data_ptr<scalar_t>();
    combine_rows<scalar_t>(
        out, at::Tensor(), alpha, rows_per_alpha, dials, [&](int64_t r) { return ep + id[r] * d; },
        [&](int64_t r, int64_t k) { return ap + k * table + id[r] * d; });
  });
}

void dial_dots_cpu(at::Tensor& dots, const at::Tensor& p, const at::Tensor& dy, const at::Tensor& x) {
  const int64_t rows = x.size(0), d = x.size(1), dials = dots.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "clm_ext_dial_dots_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    opmath_t* out = dots.data_ptr<opmath_t>();
    at::parallel_for(0, rows, grain(d * dials), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t k = 0; k < dials; ++k) {
          out[r * dials + k] = at::vec::map3_reduce_all<scalar_t>(
              [](Vec pv, Vec gv, Vec xv) { return (pv - gv) * xv; }, [](Vec u, Vec v) { return u + v; },
              pp + (r * dials + k) * d, gp + r * d, xp + r * d, d);
        }
      }
    });
  });
}

void scale_dials_cpu(at::Tensor& out, const at::Tensor& src, const at::Tensor& alpha, int64_t rows_per_alpha) {
  const int64_t rows = src.size(0), d = src.size(1), dials = out.size(1) / d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_scale_dials_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    const opmath_t* a = alpha.const_data_ptr<opmath_t>();
    at::parallel_for(0, rows, grain(d * dials), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const opmath_t* ar = a + (r / rows_per_alpha) * dials;
        for (int64_t k = 0; k < dials; ++k) {
          const Vec av(ar[k]);
          at::vec::map([av](Vec v) { return av * v; }, o + (r * dials + k) * d, sp + r * d, d);
        }
      }
    });
  });
}

constexpr DialKernels kCpuDialKernels{combine_cpu, dial_dots_cpu, scale_dials_cpu, gather_combine_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(clm_ext, CPU, m) { register_dial_kernels<&kCpuDialKernels>(m); }

}  // namespace clm_ext
