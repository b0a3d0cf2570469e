// Schema of the clm_ext ops and their device-independent composition (see alignment_mix.h).
#include "alignment_mix.h"

#include <Python.h>

#include <ATen/ATen.h>

namespace clm_ext {
namespace {

at::ScalarType opmath_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// alpha as a flat, contiguous opmath vector of one value per sequence, on the input's device.
at::Tensor alpha_values(const at::Tensor& alpha, const at::Tensor& like) {
  return alpha.reshape({-1}).to(like.device(), opmath_of(like.scalar_type())).contiguous();
}

int64_t rows_per_alpha(int64_t rows, const at::Tensor& alpha) {
  const int64_t sequences = alpha.numel();
  TORCH_CHECK(sequences > 0 && rows % sequences == 0, "clm_ext: alpha has ", sequences,
              " values, which does not divide the ", rows, " rows of the input");
  return rows / sequences;
}

at::Tensor bias_or_undefined(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->contiguous() : at::Tensor();
}

at::Tensor flat_rows(const at::Tensor& t, int64_t d) { return t.reshape({-1, d}).contiguous(); }

at::Tensor flat_ids(const at::Tensor& ids) { return ids.reshape({-1}).to(at::kLong).contiguous(); }

at::Tensor with_hidden(const at::Tensor& rows, const at::Tensor& ids) {
  auto shape = ids.sizes().vec();
  shape.push_back(rows.size(1));
  return rows.view(shape);
}

// One alpha for all rows and at least d rows: folding alpha into the weight, W_a = I + a (W - I),
// costs O(d^2) and saves the O(rows * d) mixing pass, so the op is a single GEMM.
bool fold_alpha_into_weight(int64_t rows, const at::Tensor& alpha, const at::Tensor& weight) {
  return alpha.numel() == 1 && rows >= weight.size(0);
}

// W_a = a W + (1 - a) I, computed in the opmath type; exactly I at a = 0 and W at a = 1.
at::Tensor interpolated_weight(const at::Tensor& weight, const at::Tensor& a) {
  at::Tensor wa = weight.to(a.scalar_type()).mul(a);
  wa.diagonal().add_(a.neg().add(1));
  return wa.to(weight.scalar_type());
}

// h = x2 + a * (x2 W^T + b - x2) for x2 of shape [rows, d].
at::Tensor mix_rows(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& alpha, const Kernels& k) {
  const at::Tensor a = alpha_values(alpha, x2);
  if (fold_alpha_into_weight(x2.size(0), alpha, weight)) {
    const at::Tensor wa = interpolated_weight(weight, a).t();
    return bias.has_value() ? at::addmm(bias->to(a.scalar_type()).mul(a).to(x2.scalar_type()), x2, wa)
                            : at::mm(x2, wa);
  }
  at::Tensor out = at::mm(x2, weight.t());
  if (x2.size(0) > 0) k.mix(out, x2, bias_or_undefined(bias), a, rows_per_alpha(x2.size(0), alpha));
  return out;
}

// Grads of mix_rows; those not asked for come back as empty tensors.
Grads mix_rows_backward(const at::Tensor& dy, const at::Tensor& x2, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                        std::array<bool, 4> need, const Kernels& k) {
  const auto [need_x, need_w, need_b, need_a] = need;
  const int64_t rows = x2.size(0), d = x2.size(1);
  const at::Tensor a = alpha_values(alpha, x2);
  const int64_t sequences = a.numel();
  at::Tensor dx = at::empty({0}, x2.options()), dw = at::empty({0}, weight.options());
  at::Tensor db = at::empty({0}, weight.options()), da = at::empty({0}, alpha.options());
  if (rows == 0) {
    return {need_x ? at::zeros_like(x2) : dx, need_w ? at::zeros_like(weight) : dw,
            need_b ? at::zeros({d}, weight.options()) : db, need_a ? at::zeros_like(alpha) : da};
  }
  const int64_t group = rows_per_alpha(rows, alpha);
  // Per-sequence column sums of dy in the opmath type: db and the bias term of dalpha need them.
  at::Tensor seq_sums;
  if (need_b || (need_a && bias.has_value())) {
    seq_sums = dy.view({sequences, group, d}).sum(1, false, a.scalar_type());
  }
  if (need_x && !need_a && fold_alpha_into_weight(rows, alpha, weight)) {
    dx = at::mm(dy, interpolated_weight(weight, a));
  } else if (need_x || need_a) {
    at::Tensor p = at::mm(dy, weight);
    at::Tensor row_dot = need_a ? at::empty({rows}, a.options()) : at::Tensor();
    k.mix_backward(p, dy, x2, a, group, row_dot);
    if (need_x) dx = p;
    if (need_a) {
      at::Tensor seq_dot = row_dot.view({sequences, group}).sum(1);
      if (bias.has_value()) seq_dot.add_(at::mv(seq_sums, bias->to(a.scalar_type())));
      da = seq_dot.reshape(alpha.sizes()).to(alpha.scalar_type());
    }
  }
  if (need_w) {
    if (sequences == 1) {
      dw = at::mm(dy.t(), x2).mul_(a.reshape({}));
    } else {
      const at::Tensor scaled = dy.view({sequences, group, d}) * a.view({sequences, 1, 1}).to(dy.scalar_type());
      dw = at::mm(scaled.view({rows, d}).t(), x2);
    }
  }
  if (need_b) db = at::mv(seq_sums.t(), a).to(weight.scalar_type());
  return {dx, dw, db, da};
}

// The ops run in their inputs' dtype: an autocast region around them must not re-type the GEMMs inside
// (that would hand the element-wise kernels a result of another dtype). The layer is cheap beside the
// model, so computing it in the dtype of the embedding table is the simple, exact choice.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace

at::Tensor alignment_mix(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& alpha, const Kernels& k) {
  const NoAutocast no_autocast;
  return mix_rows(flat_rows(x, weight.size(0)), weight, bias, alpha, k).view(x.sizes());
}

Grads alignment_mix_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                             std::array<bool, 4> output_mask, const Kernels& k) {
  const NoAutocast no_autocast;
  const int64_t d = weight.size(0);
  auto [dx, dw, db, da] = mix_rows_backward(flat_rows(grad, d), flat_rows(x, d), weight, bias, alpha, output_mask, k);
  if (output_mask[0]) dx = dx.view(x.sizes());
  return {dx, dw, db, da};
}

at::Tensor embed_alignment_mix(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& alpha, const Kernels& k) {
  const NoAutocast no_autocast;
  const at::Tensor x2 = at::index_select(embed_weight, 0, flat_ids(input_ids));
  return with_hidden(mix_rows(x2, weight, bias, alpha, k), input_ids);
}

Grads embed_alignment_mix_backward(const at::Tensor& grad, const at::Tensor& input_ids,
                                   const at::Tensor& embed_weight, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                                   std::array<bool, 4> output_mask, const Kernels& k) {
  const NoAutocast no_autocast;
  const at::Tensor ids = flat_ids(input_ids);
  const at::Tensor x2 = at::index_select(embed_weight, 0, ids);
  auto [dx, dw, db, da] =
      mix_rows_backward(flat_rows(grad, weight.size(0)), x2, weight, bias, alpha, output_mask, k);
  at::Tensor de = output_mask[0] ? at::zeros_like(embed_weight).index_add_(0, ids, dx) : dx;
  return {de, dw, db, da};
}

at::Tensor embedding_lerp(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                          const at::Tensor& aligned_weight, const at::Tensor& alpha, const Kernels& k) {
  const NoAutocast no_autocast;
  const at::Tensor ids = flat_ids(input_ids);
  at::Tensor out = at::empty({ids.numel(), embed_weight.size(1)}, embed_weight.options());
  if (ids.numel() > 0) {
    k.gather_lerp(out, ids, embed_weight.contiguous(), aligned_weight.contiguous(),
                  alpha_values(alpha, embed_weight), rows_per_alpha(ids.numel(), alpha));
  }
  return with_hidden(out, input_ids);
}

TORCH_LIBRARY(clm_ext, m) {
  m.def("alignment_mix(Tensor x, Tensor weight, Tensor? bias, Tensor alpha) -> Tensor");
  m.def(
      "alignment_mix_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor alpha, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("embed_alignment_mix(Tensor input_ids, Tensor embed_weight, Tensor weight, Tensor? bias, Tensor alpha) -> Tensor");
  m.def(
      "embed_alignment_mix_backward(Tensor grad, Tensor input_ids, Tensor embed_weight, Tensor weight, "
      "Tensor? bias, Tensor alpha, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("embedding_lerp(Tensor input_ids, Tensor embed_weight, Tensor aligned_weight, Tensor alpha) -> Tensor");
}

}  // namespace clm_ext

// An empty Python module: importing clm_ext._C loads this library, which registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
