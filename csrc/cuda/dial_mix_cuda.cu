// CUDA kernels of the K-dial ops: memory-bound passes around the cuBLAS GEMMs, on the current stream.
// Each thread owns one element of a row and loops over the dials, accumulating in the opmath type (with
// K = 1 the one-dial kernels' expression).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../dial_mix.h"
#include "block_sum.cuh"

namespace clm_ext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

int64_t blocks_for(int64_t work) { return std::max<int64_t>(1, std::min((work + kThreads - 1) / kThreads, kMaxBlocks)); }

// out[r, c] = base[src(r), c] + sum_k a[r / group, k] * (dial(k, r)[c] + bias[k, c] - base[src(r), c]).
// Dial rows: y + (r * dials + k) * d (ids == nullptr) or y + k * vocab * d + ids[r] * d (a gather).
template <typename scalar_t>
__global__ void combine_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ base,
                               const scalar_t* __restrict__ y, const at::opmath_type<scalar_t>* __restrict__ bias,
                               const int64_t* __restrict__ ids, int64_t vocab,
                               const at::opmath_type<scalar_t>* __restrict__ alpha, int64_t rows_per_alpha,
                               int64_t dials, int64_t d, int64_t elements) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < elements;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / d, c = i - r * d;
    const int64_t row = ids != nullptr ? ids[r] : r;
    CUDA_KERNEL_ASSERT(ids == nullptr || (row >= 0 && row < vocab));
    const opmath_t* a = alpha + (r / rows_per_alpha) * dials;
    const opmath_t x = static_cast<opmath_t>(base[row * d + c]);
    opmath_t acc = x;
    for (int64_t k = 0; k < dials; ++k) {
      const int64_t at_ = ids != nullptr ? (k * vocab + row) * d + c : (r * dials + k) * d + c;
      const opmath_t yv = static_cast<opmath_t>(y[at_]);
      acc = bias != nullptr ? acc + a[k] * (yv + bias[k * d + c] - x) : acc + a[k] * (yv - x);
    }
    out[r * d + c] = static_cast<scalar_t>(acc);
  }
}

// One block per (row, dial): dots[r, k] = (p[r, k] - dy[r]) . x[r].
template <typename scalar_t>
__global__ void dial_dots_kernel(at::opmath_type<scalar_t>* __restrict__ dots, const scalar_t* __restrict__ p,
                                 const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t pairs,
                                 int64_t dials, int64_t d) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t j = blockIdx.x; j < pairs; j += gridDim.x) {
    const int64_t r = j / dials;
    opmath_t dot = 0;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      dot += (static_cast<opmath_t>(p[j * d + c]) - static_cast<opmath_t>(dy[r * d + c])) *
             static_cast<opmath_t>(x[r * d + c]);
    }
    dot = block_sum<kThreads>(dot);
    if (threadIdx.x == 0) dots[j] = dot;
  }
}

// out[r, k, c] = a[r / group, k] * src[r, c].
template <typename scalar_t>
__global__ void scale_dials_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ src,
                                   const at::opmath_type<scalar_t>* __restrict__ alpha, int64_t rows_per_alpha,
                                   int64_t dials, int64_t d, int64_t elements) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < elements;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i / d, c = i - j * d, r = j / dials, k = j - r * dials;
    out[i] = static_cast<scalar_t>(alpha[(r / rows_per_alpha) * dials + k] * static_cast<opmath_t>(src[r * d + c]));
  }
}

void combine_cuda(at::Tensor& out, const at::Tensor& base, const at::Tensor& y, const at::Tensor& bias,
                  const at::Tensor& alpha, int64_t rows_per_alpha) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t elements = out.numel(), d = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_combine_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    combine_kernel<scalar_t><<<blocks_for(elements), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), base.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        bias.defined() ? bias.const_data_ptr<opmath_t>() : nullptr, nullptr, out.size(0),
        alpha.const_data_ptr<opmath_t>(), rows_per_alpha, y.size(1) / d, d, elements);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void gather_combine_cuda(at::Tensor& out, const at::Tensor& ids, const at::Tensor& base, const at::Tensor& aligned,
                         const at::Tensor& alpha, int64_t rows_per_alpha) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t elements = out.numel(), d = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_gather_combine_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    combine_kernel<scalar_t><<<blocks_for(elements), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), base.const_data_ptr<scalar_t>(), aligned.const_data_ptr<scalar_t>(), nullptr,
        ids.const_data_ptr<int64_t>(), base.size(0), alpha.const_data_ptr<opmath_t>(), rows_per_alpha,
        aligned.size(0), d, elements);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dial_dots_cuda(at::Tensor& dots, const at::Tensor& p, const at::Tensor& dy, const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(dots.device());
  const int64_t pairs = dots.numel();
  const int blocks = static_cast<int>(std::min(pairs, kMaxBlocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "clm_ext_dial_dots_cuda", [&] {
    dial_dots_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dots.data_ptr<at::opmath_type<scalar_t>>(), p.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
        x.const_data_ptr<scalar_t>(), pairs, dots.size(1), x.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scale_dials_cuda(at::Tensor& out, const at::Tensor& src, const at::Tensor& alpha, int64_t rows_per_alpha) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t elements = out.numel(), d = src.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "clm_ext_scale_dials_cuda", [&] {
    scale_dials_kernel<scalar_t><<<blocks_for(elements), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), alpha.const_data_ptr<at::opmath_type<scalar_t>>(),
        rows_per_alpha, out.size(1) / d, d, elements);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr DialKernels kCudaDialKernels{combine_cuda, dial_dots_cuda, scale_dials_cuda, gather_combine_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(clm_ext, CUDA, m) { register_dial_kernels<&kCudaDialKernels>(m); }

}  // namespace clm_ext
