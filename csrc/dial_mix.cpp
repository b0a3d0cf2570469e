// Schema of the K-dial ops and their device-independent composition (see dial_mix.h).
#include "dial_mix.h"
#include "common.h"

#include <ATen/ATen.h>

namespace clm_ext {
namespace {

// x (or the table) is floating; weight is [K, d, d]; bias, if any, [K, d]; alpha [S, K] floating, S > 0.
// Returns K.
int64_t check_dials(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& alpha) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", x_name, " must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must have a hidden dimension, got a 0-d tensor");
  const int64_t d = x.size(-1);
  check_like(op, "weight", weight, x);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) >= 1 && weight.size(1) == d && weight.size(2) == d, op,
              ": weight must have shape [K, ", d, ", ", d, "] (K >= 1 dials, hidden size of ", x_name, "), got ",
              weight.sizes());
  const int64_t dials = weight.size(0);
  if (bias.has_value()) {
    check_like(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == dials && bias->size(1) == d, op, ": bias must have shape [",
                dials, ", ", d, "], got ", bias->sizes());
  }
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), op, ": alpha must be floating point, got ", alpha.scalar_type());
  TORCH_CHECK(alpha.device() == x.device(), op, ": alpha is on ", alpha.device(), ", expected ", x.device());
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(1) == dials && alpha.size(0) >= 1, op,
              ": alpha must have shape [S, ", dials, "] (one row of ", dials, " dial values per sequence or token), got ",
              alpha.sizes());
  return dials;
}

int64_t dial_rows_per_alpha(const char* op, int64_t rows, const at::Tensor& alpha) {
  const int64_t groups = alpha.size(0);
  TORCH_CHECK(rows % groups == 0, op, ": alpha has ", groups, " rows (sequences or tokens), which does not divide the ",
              rows, " rows of the input");
  return rows / groups;
}

at::Tensor alpha_opmath(const at::Tensor& alpha, const at::Tensor& like) {
  return alpha.to(opmath_of(like.scalar_type())).contiguous();
}

// Fold one alpha row into one weight, W_a = sum_k a_k W_k + (1 - sum_k a_k) I, when that moves fewer bytes than
// the mixing pass (common.h). With K = 1 this is exactly the one-dial op's a W + (1 - a) I.
bool fold_dials(int64_t rows, const at::Tensor& alpha, const at::Tensor& weight) {
  return alpha.size(0) == 1 && rows >= fold_threshold_rows(weight.size(1), weight.scalar_type());
}

// a: [1, K] opmath. Computed in the opmath type; exactly I at a = 0.
at::Tensor folded_weight(const at::Tensor& weight, const at::Tensor& a) {
  const at::Tensor row = a.reshape({-1});
  at::Tensor wa = weight[0].to(a.scalar_type()).mul(row[0]);
  for (int64_t k = 1; k < weight.size(0); ++k) wa.add_(weight[k].to(a.scalar_type()).mul(row[k]));
  wa.diagonal().add_(row.sum().neg().add(1));
  return wa.to(weight.scalar_type());
}

at::Tensor folded_bias(const at::Tensor& bias, const at::Tensor& a) {
  const at::Tensor row = a.reshape({-1});
  at::Tensor ba = bias[0].to(a.scalar_type()).mul(row[0]);
  for (int64_t k = 1; k < bias.size(0); ++k) ba.add_(bias[k].to(a.scalar_type()).mul(row[k]));
  return ba;
}

at::Tensor rows_of(const at::Tensor& t, int64_t d) { return t.reshape({-1, d}).contiguous(); }

// Y = x [W_0; ...; W_{K-1}]^T: one GEMM over the stacked weights. Against K GEMMs on CPU at d = 512, 4096 rows,
// K = 3, one thread, 8 interleaved rounds on a loaded shared machine (noisy): min 226 vs 244 ms, median 346 vs
// 321 ms, no clear winner; one GEMM is kept: one call, and its output is laid out per row for the single
// `combine` pass (benchmarks/bench_op.py, "gemm_stacked" / "gemm_per_dial", measures it again).
at::Tensor dial_outputs(const at::Tensor& x2, const at::Tensor& weight) {
  const int64_t d = weight.size(1);
  return at::mm(x2, weight.reshape({-1, d}).t());
}

at::Tensor mix_dial_rows(const char* op, const at::Tensor& x2, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& alpha, const DialKernels& k) {
  const int64_t rows = x2.size(0), d = x2.size(1);
  const int64_t group = dial_rows_per_alpha(op, rows, alpha);
  const at::Tensor a = alpha_opmath(alpha, x2);
  if (fold_dials(rows, alpha, weight)) {
    const at::Tensor wa = folded_weight(weight, a).t();
    return bias.has_value() ? at::addmm(folded_bias(*bias, a).to(x2.scalar_type()), x2, wa) : at::mm(x2, wa);
  }
  at::Tensor out = at::empty({rows, d}, x2.options());
  if (rows == 0) return out;
  const at::Tensor b = bias.has_value() ? bias->to(a.scalar_type()).contiguous() : at::Tensor();
  k.combine(out, x2, dial_outputs(x2, weight), b, a, group);
  return out;
}

// As in the one-dial ops: computed in the inputs' dtype, whatever autocast region is around them.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace

at::Tensor dial_mix(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& alpha, const DialKernels& k) {
  const NoAutocast no_autocast;
  check_dials("dial_mix", "x", x, weight, bias, alpha);
  const int64_t d = x.size(-1);
  return at::_unsafe_view(mix_dial_rows("dial_mix", rows_of(x, d), weight.contiguous(), bias, alpha, k), x.sizes());
}

DialGrads dial_mix_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight_in,
                            const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                            std::array<bool, 4> need, const DialKernels& k) {
  const NoAutocast no_autocast;
  constexpr const char* op = "dial_mix_backward";
  const int64_t dials = check_dials(op, "x", x, weight_in, bias, alpha);
  check_like(op, "grad", grad, x);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad must have shape ", x.sizes(), ", got ", grad.sizes());
  const auto [need_x, need_w, need_b, need_a] = need;
  const at::Tensor weight = weight_in.contiguous();
  const int64_t d = x.size(-1);
  const at::Tensor x2 = rows_of(x, d), dy = rows_of(grad, d);
  const int64_t rows = x2.size(0), groups = alpha.size(0);
  const int64_t group = dial_rows_per_alpha(op, rows, alpha);
  const at::Tensor a = alpha_opmath(alpha, x2);
  at::Tensor dx = at::empty({0}, x.options()), dw = at::empty({0}, weight.options());
  at::Tensor db = at::empty({0}, weight.options()), da = at::empty({0}, alpha.options());
  if (rows == 0) {
    return {need_x ? at::zeros_like(x) : dx, need_w ? at::zeros_like(weight) : dw,
            need_b ? at::zeros({dials, d}, weight.options()) : db, need_a ? at::zeros_like(alpha) : da};
  }
  at::Tensor seq_sums;  // per-group column sums of dy in the opmath type: db and dalpha's bias term
  if (need_b || (need_a && bias.has_value())) seq_sums = dy.view({groups, group, d}).sum(1, false, a.scalar_type());
  if (need_x || need_a) {
    // P = dy [W_0, ..., W_{K-1}]: one GEMM against the weights laid side by side.
    const at::Tensor p = at::mm(dy, weight.permute({1, 0, 2}).reshape({d, dials * d}));
    if (need_x) {
      dx = at::empty({rows, d}, x.options());
      k.combine(dx, dy, p, at::Tensor(), a, group);
      dx = at::_unsafe_view(dx, x.sizes());
    }
    if (need_a) {
      at::Tensor dots = at::empty({rows, dials}, a.options());
      k.dial_dots(dots, p, dy, x2);
      at::Tensor seq_dot = dots.view({groups, group, dials}).sum(1);
      if (bias.has_value()) seq_dot.add_(at::mm(seq_sums, bias->to(a.scalar_type()).t()));
      da = seq_dot.to(alpha.scalar_type());
    }
  }
  if (need_w) {
    at::Tensor scaled = at::empty({rows, dials * d}, dy.options());
    k.scale_dials(scaled, dy, a, group);
    dw = at::mm(scaled.t(), x2).view({dials, d, d});
  }
  if (need_b) db = at::mm(a.t(), seq_sums).to(weight.scalar_type());
  return {dx, dw, db, da};
}

at::Tensor dial_embedding_lerp(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                               const at::Tensor& aligned_weights, const at::Tensor& alpha, const DialKernels& k) {
  const NoAutocast no_autocast;
  constexpr const char* op = "dial_embedding_lerp";
  TORCH_CHECK(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt, op,
              ": input_ids must be int64 or int32, got ", input_ids.scalar_type());
  TORCH_CHECK(input_ids.device() == embed_weight.device(), op, ": input_ids are on ", input_ids.device(),
              ", embed_weight on ", embed_weight.device());
  TORCH_CHECK(embed_weight.dim() == 2 && at::isFloatingType(embed_weight.scalar_type()), op,
              ": embed_weight must be a 2-D floating table [vocab, hidden], got ", embed_weight.sizes(), " ",
              embed_weight.scalar_type());
  check_like(op, "aligned_weights", aligned_weights, embed_weight);
  const int64_t vocab = embed_weight.size(0), d = embed_weight.size(1);
  TORCH_CHECK(aligned_weights.dim() == 3 && aligned_weights.size(1) == vocab && aligned_weights.size(2) == d, op,
              ": aligned_weights must have shape [K, ", vocab, ", ", d, "], got ", aligned_weights.sizes());
  const int64_t dials = aligned_weights.size(0);
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()) && alpha.dim() == 2 && alpha.size(1) == dials &&
                  alpha.size(0) >= 1 && alpha.device() == embed_weight.device(),
              op, ": alpha must be a floating [S, ", dials, "] tensor on ", embed_weight.device(), ", got ",
              alpha.sizes(), " ", alpha.scalar_type(), " on ", alpha.device());
  const at::Tensor ids = input_ids.reshape({-1}).to(at::kLong).contiguous();
  if (ids.is_cpu()) {
    const int64_t* id = ids.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < ids.numel(); ++r) {
      TORCH_CHECK(id[r] >= 0 && id[r] < vocab, op, ": input_ids must lie in [0, ", vocab, "), got ", id[r],
                  " at position ", r);
    }
  }
  const int64_t group = dial_rows_per_alpha(op, ids.numel(), alpha);
  at::Tensor out = at::empty({ids.numel(), d}, embed_weight.options());
  if (ids.numel() > 0) {
    k.gather_combine(out, ids, embed_weight.contiguous(), aligned_weights.contiguous(), alpha_opmath(alpha, out),
                     group);
  }
  auto shape = input_ids.sizes().vec();
  shape.push_back(d);
  return at::_unsafe_view(out, shape);
}

TORCH_LIBRARY_FRAGMENT(clm_ext, m) {
  m.def("dial_mix(Tensor x, Tensor weight, Tensor? bias, Tensor alpha) -> Tensor");
  m.def(
      "dial_mix_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor alpha, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dial_embedding_lerp(Tensor input_ids, Tensor embed_weight, Tensor aligned_weights, Tensor alpha) -> Tensor");
}

}  // namespace clm_ext
