// The alignment-mix ops, shared by every device: the GEMMs go through at::mm (MKL/oneDNN on CPU,
// cuBLAS on CUDA); each device supplies only the fused element-wise passes in `Kernels`.
//
//   forward   h  = x + a * (x W^T + b - x)           one GEMM into the output, then `mix` in place
//   backward  P  = dy W                               one GEMM, needed for dx and for dalpha
//             dx = dy + a * (P - dy)                  `mix_backward` in place, also giving
//             dalpha_row = (P - dy) . x               per-row dots (dy . b is added per sequence)
//             dW = (a dy)^T x,  db = sum_rows a dy     `scale_rows` makes a dy (several sequences)
// `a` is one value per sequence: row r uses alpha[r / rows_per_alpha].
#pragma once

#include <array>
#include <optional>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace clm_ext {

struct Kernels {
  // out[r] <- x[r] + a * (out[r] + bias - x[r]) in place; bias may be undefined.
  void (*mix)(at::Tensor& out, const at::Tensor& x, const at::Tensor& bias, const at::Tensor& alpha,
              int64_t rows_per_alpha);
  // p[r] <- dy[r] + a * (p[r] - dy[r]) in place; where row_dot is defined, first
  // row_dot[r] <- (p[r] - dy[r]) . x[r] (in the opmath type).
  void (*mix_backward)(at::Tensor& p, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha,
                       int64_t rows_per_alpha, at::Tensor& row_dot);
  // out[r] <- a * src[r]: dW's left factor when the sequences have different alphas.
  void (*scale_rows)(at::Tensor& out, const at::Tensor& src, const at::Tensor& alpha, int64_t rows_per_alpha);
  // out[r] <- base[ids[r]] + a * (aligned[ids[r]] - base[ids[r]]).
  void (*gather_lerp)(at::Tensor& out, const at::Tensor& ids, const at::Tensor& base,
                      const at::Tensor& aligned, const at::Tensor& alpha, int64_t rows_per_alpha);
};

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor alignment_mix(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& alpha, const Kernels& k);
Grads alignment_mix_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                             std::array<bool, 4> output_mask, const Kernels& k);
at::Tensor embed_alignment_mix(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& alpha, const Kernels& k);
Grads embed_alignment_mix_backward(const at::Tensor& grad, const at::Tensor& input_ids,
                                   const at::Tensor& embed_weight, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                                   std::array<bool, 4> output_mask, const Kernels& k);
at::Tensor embedding_lerp(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                          const at::Tensor& aligned_weight, const at::Tensor& alpha, const Kernels& k);

// Registers every op for one dispatch key with that device's kernels.
template <const Kernels* K>
void register_kernels(torch::Library& m) {
  m.impl("alignment_mix", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                             const at::Tensor& a) { return alignment_mix(x, w, b, a, *K); });
  m.impl("alignment_mix_backward",
         [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
            const at::Tensor& a, std::array<bool, 4> mask) { return alignment_mix_backward(g, x, w, b, a, mask, *K); });
  m.impl("embed_alignment_mix",
         [](const at::Tensor& ids, const at::Tensor& e, const at::Tensor& w, const std::optional<at::Tensor>& b,
            const at::Tensor& a) { return embed_alignment_mix(ids, e, w, b, a, *K); });
  m.impl("embed_alignment_mix_backward",
         [](const at::Tensor& g, const at::Tensor& ids, const at::Tensor& e, const at::Tensor& w,
            const std::optional<at::Tensor>& b, const at::Tensor& a, std::array<bool, 4> mask) {
           return embed_alignment_mix_backward(g, ids, e, w, b, a, mask, *K);
         });
  m.impl("embedding_lerp", [](const at::Tensor& ids, const at::Tensor& e, const at::Tensor& ea,
                              const at::Tensor& a) { return embedding_lerp(ids, e, ea, a, *K); });
}

}  // namespace clm_ext
