#pragma once
// Argument checks of the masked_linear op family, shared by the CPU and CUDA bindings so
// that both raise the same messages before any work.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common.h"

namespace sparsebert {

// `dtype_ok` says which dtypes the calling backend implements; `dtype_names` lists them.
inline void check_linear_dtype(const at::Tensor& t, const char* name, bool dtype_ok, const char* dtype_names) {
  TORCH_CHECK(dtype_ok, name, " must be ", dtype_names, " on ", t.device().type(), ", got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

inline void check_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got shape ", weight.sizes());
}

// x (or grad_out) of shape [..., features] against the feature count the weight implies.
inline void check_features(const at::Tensor& t, const char* name, int64_t features, const char* what) {
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dimension, got a scalar");
  TORCH_CHECK(t.size(-1) == features, name, " has last dimension ", t.size(-1), ", expected ", what, " = ",
              features);
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& weight) {
  if (!bias.has_value()) return;
  check_same(*bias, "bias", weight, "weight");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape [", weight.size(0),
              "] (out_features), got ", bias->sizes());
}

// Forward of masked_linear / movement_linear.
inline void check_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                          const std::optional<at::Tensor>& bias) {
  check_weight(weight);
  check_same(x, "x", weight, "weight");
  check_features(x, "x", weight.size(1), "in_features");
  check_bias(bias, weight);
  check_packed_mask(mask, weight, "mask");
}

inline void check_scores(const at::Tensor& scores, const at::Tensor& weight) {
  check_same(scores, "scores", weight, "weight");
  TORCH_CHECK(scores.sizes() == weight.sizes(), "scores must have the shape of weight ", weight.sizes(), ", got ",
              scores.sizes());
}

// grad_out [..., out] and x [..., in] with the same leading dimensions.
inline void check_grad_weight_inputs(const at::Tensor& grad_out, const at::Tensor& x) {
  check_same(grad_out, "grad_out", x, "x");
  TORCH_CHECK(grad_out.dim() >= 1 && x.dim() >= 1, "grad_out and x must have at least one dimension");
  TORCH_CHECK(grad_out.dim() == x.dim() && grad_out.sizes().slice(0, grad_out.dim() - 1) ==
                                               x.sizes().slice(0, x.dim() - 1),
              "grad_out ", grad_out.sizes(), " and x ", x.sizes(), " must agree in all but the last dimension");
}

// grad_input: grad_out [..., out] against weight [out, in] and its mask.
inline void check_grad_input(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& mask) {
  check_weight(weight);
  check_same(grad_out, "grad_out", weight, "weight");
  check_features(grad_out, "grad_out", weight.size(0), "out_features");
  check_packed_mask(mask, weight, "mask");
}

// movement grad_weight: grad_out [..., out] and x [..., in] against weight [out, in] and its mask.
inline void check_movement_grad_weight(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& mask) {
  check_weight(weight);
  check_same(x, "x", weight, "weight");
  check_grad_weight_inputs(grad_out, x);
  check_features(x, "x", weight.size(1), "in_features");
  check_features(grad_out, "grad_out", weight.size(0), "out_features");
  check_packed_mask(mask, weight, "mask");
}

// A packed mask over an [out, in] weight that the op does not receive.
inline void check_mask_shape(const at::Tensor& mask, int64_t out, int64_t in, const at::Tensor& like) {
  TORCH_CHECK(mask.scalar_type() == at::kByte, "mask must be a bit-packed uint8 mask, got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == like.device(), "mask is on ", mask.device(), " but the tensor it masks is on ",
              like.device());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == out && mask.size(1) == packed_cols(in), "mask has shape ",
              mask.sizes(), ", expected [", out, ", ", packed_cols(in), "] for an [", out, ", ", in, "] weight");
  TORCH_CHECK(mask.is_contiguous(), "mask must be contiguous");
}

}  // namespace sparsebert
