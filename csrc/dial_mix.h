// The K-dial mix ops: K named linear alignment layers on one input, each with its own alpha per row,
//
//   h = x + sum_k a[s, k] * (x W_k^T + b_k - x)        s = r / rows_per_alpha (a sequence or a token)
//
// shared by every device: the GEMMs go through at::mm (one GEMM over the stacked [K d, d] weights), each
// device supplies only the fused passes in `DialKernels`.
//
//   forward   Y  = x [W_0; ...; W_{K-1}]^T             one GEMM, [rows, K d]
//             h  = x + sum_k a_k (Y_k + b_k - x)       `combine` (one pass over Y)
//   backward  P  = dy [W_0, ..., W_{K-1}]              one GEMM, [rows, K d]
//             dx = dy + sum_k a_k (P_k - dy)           `combine` again (base dy, no bias)
//             dalpha[s, k] = sum_rows (P_k - dy) . x + dy . b_k    `dial_dots` per row and dial
//             dW = (a dy)^T x stacked, db = a^T (per-sequence sums of dy)   `scale_dials` makes a dy
// With K = 1 every pass computes what the one-dial ops (alignment_mix.h) compute, in the same order, so
// a one-dial model is bit for bit today's model.
#pragma once

#include <array>
#include <optional>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace clm_ext {

struct DialKernels {
  // out[r] <- base[r] + sum_k a[r / rows_per_alpha, k] * (y[r, k] + bias[k] - base[r]); y is [rows, K d],
  // bias [K, d] in the opmath type or undefined, alpha [S, K] in the opmath type.
  void (*combine)(at::Tensor& out, const at::Tensor& base, const at::Tensor& y, const at::Tensor& bias,
                  const at::Tensor& alpha, int64_t rows_per_alpha);
  // dots[r, k] <- (p[r, k] - dy[r]) . x[r] in the opmath type; p is [rows, K d].
  void (*dial_dots)(at::Tensor& dots, const at::Tensor& p, const at::Tensor& dy, const at::Tensor& x);
  // out[r, k] <- a[r / rows_per_alpha, k] * src[r]; out is [rows, K d].
  void (*scale_dials)(at::Tensor& out, const at::Tensor& src, const at::Tensor& alpha, int64_t rows_per_alpha);
  // out[r] <- base[ids[r]] + sum_k a[r / rows_per_alpha, k] * (aligned[k, ids[r]] - base[ids[r]]).
  void (*gather_combine)(at::Tensor& out, const at::Tensor& ids, const at::Tensor& base, const at::Tensor& aligned,
                         const at::Tensor& alpha, int64_t rows_per_alpha);
};

using DialGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor dial_mix(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& alpha, const DialKernels& k);
DialGrads dial_mix_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                            std::array<bool, 4> output_mask, const DialKernels& k);
at::Tensor dial_embedding_lerp(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                               const at::Tensor& aligned_weights, const at::Tensor& alpha, const DialKernels& k);

// Registers the dial ops for one dispatch key with that device's kernels.
template <const DialKernels* K>
void register_dial_kernels(torch::Library& m) {
  m.impl("dial_mix", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                        const at::Tensor& a) { return dial_mix(x, w, b, a, *K); });
  m.impl("dial_mix_backward",
         [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
            const at::Tensor& a, std::array<bool, 4> mask) { return dial_mix_backward(g, x, w, b, a, mask, *K); });
  m.impl("dial_embedding_lerp", [](const at::Tensor& ids, const at::Tensor& e, const at::Tensor& ea,
                                   const at::Tensor& a) { return dial_embedding_lerp(ids, e, ea, a, *K); });
}

}  // namespace clm_ext
