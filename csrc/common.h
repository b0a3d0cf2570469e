// Helpers shared by the one-dial ops (alignment_mix.cpp) and the K-dial ops (dial_mix.cpp).
#pragma once

#include <ATen/ATen.h>

namespace clm_ext {

// The type the kernels accumulate in: float64 for float64 inputs, float32 for the rest.
inline at::ScalarType opmath_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// t must share like's device and dtype; the message names the argument.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
}

// With one alpha (or one alpha row) for all rows, folding it into the weight, W_a = I + a (W - I), makes the
// op a single GEMM: building W_a moves `fold` bytes per d^2 element (a multiply in the opmath type, plus a
// cast in and out for 16-bit types: 2 + 4, 4 + 4, 4 + 2 = 20 bytes in bf16; 8 in fp32) where the mixing pass
// moves 3 elements (read h and x, write h) per rows x d element (6 bytes in bf16, 12 in fp32). Fold where
// that is less traffic: from rows >= 3.3 d in bf16/fp16 and rows >= 0.67 d in fp32/fp64.
inline int64_t fold_threshold_rows(int64_t d, at::ScalarType weight_type) {
  const int64_t size = at::elementSize(weight_type);
  const int64_t opmath = at::elementSize(opmath_of(weight_type));
  const int64_t fold = size == opmath ? 2 * opmath : 4 * opmath + 2 * size;
  const int64_t mix = 3 * size;
  return (d * fold + mix - 1) / mix;
}

}  // namespace clm_ext
