// Schema of the clm_ext ops and their device-independent composition (see alignment_mix.h).
#include "alignment_mix.h"
#include "common.h"

#include <Python.h>

#include <ATen/ATen.h>

#include <charconv>
#include <cmath>
#include <limits>
#include <string>

namespace clm_ext {
namespace {

// Host-side checks: the Python wrappers check more kindly, but a direct torch.ops.clm_ext call must not
// hand a kernel a pointer of the wrong device, dtype or size. Every message names the argument.

// x (or the table) is floating; weight is [d, d]; bias, if any, is [d]; all on one device and dtype.
void check_layer(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", x_name, " must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must have a hidden dimension, got a 0-d tensor");
  const int64_t d = x.size(-1);
  check_like(op, "weight", weight, x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == d && weight.size(1) == d, op, ": weight must have shape [",
              d, ", ", d, "] to match the hidden size of ", x_name, ", got ", weight.sizes());
  if (bias.has_value()) {
    check_like(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d, op, ": bias must have shape [", d, "], got ",
                bias->sizes());
  }
}

// A double as the shortest text that reads back as it (-2.0000001 stays -2.0000001, not -2).
std::string shortest(double v) {
  char buf[32];
  const auto end = std::to_chars(buf, buf + sizeof buf, v).ptr;
  return std::string(buf, end);
}

// alpha is 0-d, a single value, or 1-D with one value per sequence: `batch` is the first dimension of x or
// input_ids (one row per token where the caller packs tokens as rows). Any other length would be spread
// over blocks of rows, so it is refused. On CPU every value must be finite in the opmath type (float32
// unless the input is float64, where a float64 1e300 turns inf); on CUDA the values are not read here (that
// would synchronise the stream on every call and break graph capture): the Python wrappers and set_alpha
// check them where they are set.
void check_alpha(const char* op, const at::Tensor& alpha, const char* batch_of, int64_t batch,
                 at::ScalarType input) {
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), op, ": alpha must be floating point, got ",
              alpha.scalar_type());
  TORCH_CHECK(alpha.dim() <= 1, op, ": alpha must be 0-d or 1-D (one value per sequence), got shape ",
              alpha.sizes());
  TORCH_CHECK(alpha.dim() == 0 || alpha.numel() == 1 || alpha.numel() == batch, op, ": alpha has ",
              alpha.numel(), " values but ", batch_of, " has ", batch,
              " sequences (its first dimension); expected a 0-d tensor or shape [", batch, "]");
  if (!alpha.is_cpu()) return;
  const at::ScalarType opmath = opmath_of(input);
  const double limit = opmath == at::kDouble ? std::numeric_limits<double>::max()
                                             : static_cast<double>(std::numeric_limits<float>::max());
  const at::Tensor values = alpha.reshape({-1}).to(at::kDouble).contiguous();
  const double* v = values.const_data_ptr<double>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    TORCH_CHECK(std::isfinite(v[i]) && std::abs(v[i]) <= limit, op, ": alpha must be finite in ", opmath,
                ", got ", shortest(v[i]), alpha.dim() ? " at index " + std::to_string(i) : std::string());
  }
}

// The sequences alpha may hold one value each for: x's first dimension (x [d] is one row), input_ids' first.
int64_t x_batch(const at::Tensor& x) { return x.dim() >= 2 ? x.size(0) : 1; }
int64_t ids_batch(const at::Tensor& ids) { return ids.dim() >= 1 ? ids.size(0) : 1; }

void check_grad(const char* op, const at::Tensor& grad, at::IntArrayRef expected, const at::Tensor& like) {
  check_like(op, "grad", grad, like);
  TORCH_CHECK(grad.sizes() == expected, op, ": grad must have shape ", expected, ", got ", grad.sizes());
}

// ids are int32/int64 on the table's device; on CPU every id is checked against the vocabulary here
// (CUDA kernels check with a device assert).
void check_ids(const char* op, const at::Tensor& ids, const at::Tensor& table) {
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
              ": input_ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == table.device(), op, ": input_ids are on ", ids.device(), ", embed_weight on ",
              table.device());
  TORCH_CHECK(table.dim() == 2, op, ": embed_weight must be 2-D [vocab, hidden], got ", table.sizes());
}

void check_id_range(const char* op, const at::Tensor& flat, int64_t vocab) {
  if (!flat.is_cpu()) return;
  const int64_t* id = flat.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < flat.numel(); ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < vocab, op, ": input_ids must lie in [0, ", vocab, "), got ", id[r],
                " at position ", r);
  }
}

// alpha as a flat, contiguous opmath vector of one value per sequence, on the input's device.
at::Tensor alpha_values(const at::Tensor& alpha, const at::Tensor& like) {
  return alpha.reshape({-1}).to(like.device(), opmath_of(like.scalar_type())).contiguous();
}

// Rows per alpha value (check_alpha made the count one or the number of sequences, which divides the rows).
int64_t rows_per_alpha(int64_t rows, const at::Tensor& alpha) {
  TORCH_INTERNAL_ASSERT(alpha.numel() > 0 && rows % alpha.numel() == 0);
  return rows / alpha.numel();
}

at::Tensor bias_or_undefined(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->contiguous() : at::Tensor();
}

at::Tensor flat_rows(const at::Tensor& t, int64_t d) { return t.reshape({-1, d}).contiguous(); }

// The ids as a flat int64 vector, each checked against the table's vocabulary (on CPU here).
at::Tensor flat_ids(const char* op, const at::Tensor& ids, const at::Tensor& table) {
  check_ids(op, ids, table);
  at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  check_id_range(op, flat, table.size(0));
  return flat;
}

std::vector<int64_t> ids_by_hidden(const at::Tensor& ids, int64_t d) {
  auto shape = ids.sizes().vec();
  shape.push_back(d);
  return shape;
}

// Outputs are reshaped with _unsafe_view: a plain view would make the op's result a view of a temporary,
// and in-place use of it (`h *= scale`, `.add_` under grad) would fail where nn.Embedding's does not.
at::Tensor with_hidden(const at::Tensor& rows, const at::Tensor& ids) {
  return at::_unsafe_view(rows, ids_by_hidden(ids, rows.size(1)));
}

// One alpha for all rows: fold it into the weight where that moves fewer bytes than the mixing pass (common.h).
bool fold_alpha_into_weight(int64_t rows, const at::Tensor& alpha, const at::Tensor& weight) {
  return alpha.numel() == 1 && rows >= fold_threshold_rows(weight.size(0), weight.scalar_type());
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
      // One vectorised pass (ATen's broadcasting multiply took 2.7x as long on an H200, profile_op.py).
      at::Tensor scaled = at::empty_like(dy);
      k.scale_rows(scaled, dy, a, group);
      dw = at::mm(scaled.t(), x2);
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
  check_layer("alignment_mix", "x", x, weight, bias);
  check_alpha("alignment_mix", alpha, "x", x_batch(x), x.scalar_type());
  return at::_unsafe_view(mix_rows(flat_rows(x, weight.size(0)), weight, bias, alpha, k), x.sizes());
}

Grads alignment_mix_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                             std::array<bool, 4> output_mask, const Kernels& k) {
  const NoAutocast no_autocast;
  check_layer("alignment_mix_backward", "x", x, weight, bias);
  check_alpha("alignment_mix_backward", alpha, "x", x_batch(x), x.scalar_type());
  check_grad("alignment_mix_backward", grad, x.sizes(), x);
  const int64_t d = weight.size(0);
  auto [dx, dw, db, da] = mix_rows_backward(flat_rows(grad, d), flat_rows(x, d), weight, bias, alpha, output_mask, k);
  if (output_mask[0]) dx = at::_unsafe_view(dx, x.sizes());
  return {dx, dw, db, da};
}

at::Tensor embed_alignment_mix(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& alpha, const Kernels& k) {
  const NoAutocast no_autocast;
  const at::Tensor ids = flat_ids("embed_alignment_mix", input_ids, embed_weight);
  check_layer("embed_alignment_mix", "embed_weight", embed_weight, weight, bias);
  check_alpha("embed_alignment_mix", alpha, "input_ids", ids_batch(input_ids), embed_weight.scalar_type());
  const at::Tensor x2 = at::index_select(embed_weight, 0, ids);
  return with_hidden(mix_rows(x2, weight, bias, alpha, k), input_ids);
}

Grads embed_alignment_mix_backward(const at::Tensor& grad, const at::Tensor& input_ids,
                                   const at::Tensor& embed_weight, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                                   std::array<bool, 4> output_mask, const Kernels& k) {
  const NoAutocast no_autocast;
  constexpr const char* op = "embed_alignment_mix_backward";
  const at::Tensor ids = flat_ids(op, input_ids, embed_weight);
  check_layer(op, "embed_weight", embed_weight, weight, bias);
  check_alpha(op, alpha, "input_ids", ids_batch(input_ids), embed_weight.scalar_type());
  check_grad(op, grad, ids_by_hidden(input_ids, embed_weight.size(1)), embed_weight);
  const at::Tensor x2 = at::index_select(embed_weight, 0, ids);
  auto [dx, dw, db, da] =
      mix_rows_backward(flat_rows(grad, weight.size(0)), x2, weight, bias, alpha, output_mask, k);
  at::Tensor de = dx;
  if (output_mask[0]) {
    // Accumulate in the opmath type: in a 16-bit table every repeated id would otherwise round per add
    // (and on CUDA in no fixed order).
    const at::ScalarType acc = opmath_of(embed_weight.scalar_type());
    de = at::zeros(embed_weight.sizes(), embed_weight.options().dtype(acc))
             .index_add_(0, ids, dx.to(acc))
             .to(embed_weight.scalar_type());
  }
  return {de, dw, db, da};
}

at::Tensor embedding_lerp(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                          const at::Tensor& aligned_weight, const at::Tensor& alpha, const Kernels& k) {
  const NoAutocast no_autocast;
  constexpr const char* op = "embedding_lerp";
  const at::Tensor ids = flat_ids(op, input_ids, embed_weight);
  TORCH_CHECK(at::isFloatingType(embed_weight.scalar_type()), op, ": embed_weight must be floating point, got ",
              embed_weight.scalar_type());
  check_like(op, "aligned_weight", aligned_weight, embed_weight);
  TORCH_CHECK(aligned_weight.sizes() == embed_weight.sizes(), op, ": aligned_weight must have the shape of embed_weight ",
              embed_weight.sizes(), ", got ", aligned_weight.sizes());
  check_alpha(op, alpha, "input_ids", ids_batch(input_ids), embed_weight.scalar_type());
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
