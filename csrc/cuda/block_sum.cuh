// A thread block's sum, shared by the CUDA kernels that reduce one row per block.
#pragma once

// Sum of `v` over a block of kThreads threads (a multiple of 32, at most 1024): warp shuffles, then one warp
// over the per-warp sums. The total is valid in thread 0.
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_sum needs whole warps");
  __shared__ T warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_sums[lane] : T(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
  }
  __syncthreads();  // warp_sums is reused by the next sum
  return v;
}
