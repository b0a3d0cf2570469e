// CUDA kernels of the alignment-mix ops: memory-bound element-wise passes around the cuBLAS GEMMs,
// 16-byte vectorised where the row length and pointers allow, on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../alignment_mix.h"
#include "block_sum.cuh"

namespace clm_ext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// out[r] = base[src(r)] + a * (other[src(r)] + bias - base[src(r)]), src(r) = ids ? ids[r] : r.
// `mix` is the case other == out (in place, ids == nullptr); `gather_lerp` has ids (each asserted to lie
// in [0, vocab)) and no bias.
template <typename scalar_t, int N>
__global__ void lerp_rows_kernel(scalar_t* out, const scalar_t* base, const scalar_t* other,
                                 const scalar_t* __restrict__ bias, const int64_t* __restrict__ ids, int64_t vocab,
                                 const at::opmath_type<scalar_t>* __restrict__ alpha, int64_t rows_per_alpha,
                                 int64_t d, int64_t packs) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t packs_per_row = d / N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / packs_per_row;
    const int64_t c = (i - r * packs_per_row) * N;
    const int64_t row = ids != nullptr ? ids[r] : r;
    CUDA_KERNEL_ASSERT(ids == nullptr || (row >= 0 && row < vocab));
    const int64_t src = row * d + c;
    const opmath_t a = alpha[r / rows_per_alpha];
    const Pack<scalar_t, N> xb = load<scalar_t, N>(base + src);
    const Pack<scalar_t, N> xo = load<scalar_t, N>(other + src);
    Pack<scalar_t, N> res;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const opmath_t b = bias != nullptr ? static_cast<opmath_t>(bias[c + j]) : opmath_t(0);
      const opmath_t x = static_cast<opmath_t>(xb.v[j]);
      res.v[j] = static_cast<scalar_t>(x + a * (static_cast<opmath_t>(xo.v[j]) + b - x));
    }
    store<scalar_t, N>(out + r * d + c, res);
  }
}

// out[r] = a * src[r], a = alpha[r / rows_per_alpha].
template <typename scalar_t, int N>
__global__ void scale_rows_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ src,
                                  const at::opmath_type<scalar_t>* __restrict__ alpha, int64_t rows_per_alpha,
                                  int64_t d, int64_t packs) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t packs_per_row = d / N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const opmath_t a = alpha[i / packs_per_row / rows_per_alpha];
    Pack<scalar_t, N> v = load<scalar_t, N>(src + i * N);
#pragma unroll
    for (int j = 0; j < N; ++j) v.v[j] = static_cast<scalar_t>(a * static_cast<opmath_t>(v.v[j]));
    store<scalar_t, N>(out + i * N, v);
  }
}

// One block per row: p <- dy + a * (p - dy); row_dot[r] = (p - dy) . x when row_dot is given.
template <typename scalar_t, int N>
__global__ void mix_backward_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ dy,
                                    const scalar_t* __restrict__ x,
                                    const at::opmath_type<scalar_t>* __restrict__ alpha, int64_t rows_per_alpha,
                                    int64_t rows, int64_t d, at::opmath_type<scalar_t>* __restrict__ row_dot) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const opmath_t a = alpha[r / rows_per_alpha];
    opmath_t dot = 0;
    for (int64_t c = threadIdx.x * N; c < d; c += static_cast<int64_t>(blockDim.x) * N) {
      const int64_t at_ = r * d + c;
      Pack<scalar_t, N> pv = load<scalar_t, N>(p + at_);
      const Pack<scalar_t, N> gv = load<scalar_t, N>(dy + at_);
      if (row_dot != nullptr) {  // x is read only for dalpha
        const Pack<scalar_t, N> xv = load<scalar_t, N>(x + at_);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          dot += (static_cast<opmath_t>(pv.v[j]) - static_cast<opmath_t>(gv.v[j])) * static_cast<opmath_t>(xv.v[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const opmath_t g = static_cast<opmath_t>(gv.v[j]);
        pv.v[j] = static_cast<scalar_t>(g + a * (static_cast<opmath_t>(pv.v[j]) - g));
      }
      store<scalar_t, N>(p + at_, pv);
    }
    if (row_dot != nullptr) {
      dot = block_sum<kThreads>(dot);
      if (threadIdx.x == 0) row_dot[r] = dot;
    }
  }
}

// Elements per 16-byte access when every row start is 16-byte aligned, else 1.
template <typename scalar_t>
int pack_width(int64_t d, std::initializer_list<const void*> ptrs) {
  constexpr int wide = 16 / sizeof(scalar_t);
  if (d % wide != 0) return 1;
  for (const void* ptr : ptrs) {
    if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return 1;
  }
  return wide;
}

int64_t blocks_for(int64_t work) { return std::max<int64_t>(1, std::min((work + kThreads - 1) / kThreads, kMaxBlocks)); }

template <typename scalar_t, int N>
void launch_lerp_rows(scalar_t* out, const scalar_t* base, const scalar_t* other, const scalar_t* bias,
                      const int64_t* ids, int64_t vocab, const at::opmath_type<scalar_t>* alpha,
                      int64_t rows_per_alpha, int64_t rows, int64_t d) {
  const int64_t packs = rows * d / N;
  lerp_rows_kernel<scalar_t, N><<<blocks_for(packs), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out, base, other, bias, ids, vocab, alpha, rows_per_alpha, d, packs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void lerp_rows(scalar_t* out, const scalar_t* base, const scalar_t* other, const scalar_t* bias,
               const int64_t* ids, int64_t vocab, const at::opmath_type<scalar_t>* alpha, int64_t rows_per_alpha,
               int64_t rows, int64_t d) {
  constexpr int wide = 16 / sizeof(scalar_t);
  if (pack_width<scalar_t>(d, {out, base, other, bias}) == wide) {
    launch_lerp_rows<scalar_t, wide>(out, base, other, bias, ids, vocab, alpha, rows_per_alpha, rows, d);
  } else {
    launch_lerp_rows<scalar_t, 1>(out, base, other, bias, ids, vocab, alpha, rows_per_alpha, rows, d);
  }
}

void mix_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& bias, const at::Tensor& alpha,
              int64_t rows_per_alpha) {
  const c10::cuda::CUDAGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_mix_cuda", [&] {
    lerp_rows<scalar_t>(out.data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, nullptr, out.size(0),
                        alpha.const_data_ptr<at::opmath_type<scalar_t>>(), rows_per_alpha, out.size(0),
                        out.size(1));
  });
}

void gather_lerp_cuda(at::Tensor& out, const at::Tensor& ids, const at::Tensor& base, const at::Tensor& aligned,
                      const at::Tensor& alpha, int64_t rows_per_alpha) {
  const c10::cuda::CUDAGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_gather_lerp_cuda", [&] {
    lerp_rows<scalar_t>(out.data_ptr<scalar_t>(), base.const_data_ptr<scalar_t>(),
                        aligned.const_data_ptr<scalar_t>(), nullptr, ids.const_data_ptr<int64_t>(), base.size(0),
                        alpha.const_data_ptr<at::opmath_type<scalar_t>>(), rows_per_alpha, out.size(0),
                        out.size(1));
  });
}

void mix_backward_cuda(at::Tensor& p, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha,
                       int64_t rows_per_alpha, at::Tensor& row_dot) {
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t rows = p.size(0), d = p.size(1);
  const int blocks = static_cast<int>(std::min(rows, kMaxBlocks));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "clm_ext_mix_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int wide = 16 / sizeof(scalar_t);
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const opmath_t* a = alpha.const_data_ptr<opmath_t>();
    opmath_t* dots = row_dot.defined() ? row_dot.data_ptr<opmath_t>() : nullptr;
    if (pack_width<scalar_t>(d, {pp, gp, xp}) == wide) {
      mix_backward_kernel<scalar_t, wide><<<blocks, kThreads, 0, stream>>>(pp, gp, xp, a, rows_per_alpha, rows, d, dots);
    } else {
      mix_backward_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(pp, gp, xp, a, rows_per_alpha, rows, d, dots);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scale_rows_cuda(at::Tensor& out, const at::Tensor& src, const at::Tensor& alpha, int64_t rows_per_alpha) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t rows = out.size(0), d = out.size(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_scale_rows_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int wide = 16 / sizeof(scalar_t);
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    const opmath_t* a = alpha.const_data_ptr<opmath_t>();
    if (pack_width<scalar_t>(d, {op, sp}) == wide) {
      scale_rows_kernel<scalar_t, wide><<<blocks_for(rows * d / wide), kThreads, 0, stream>>>(op, sp, a, rows_per_alpha,
                                                                                             d, rows * d / wide);
    } else {
      scale_rows_kernel<scalar_t, 1><<<blocks_for(rows * d), kThreads, 0, stream>>>(op, sp, a, rows_per_alpha, d,
                                                                                   rows * d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr Kernels kCudaKernels{mix_cuda, mix_backward_cuda, scale_rows_cuda, gather_lerp_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(clm_ext, CUDA, m) { register_kernels<&kCudaKernels>(m); }

}  // namespace clm_ext
