// masked_linear on the CPU: the GEMMs go through ATen (MKL / oneDNN); the mask is applied by
// one fused, parallel pass over the weight (forward, grad_input) or over the GEMM output
// (grad_weight), so a bit-packed mask never becomes a float tensor.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <tuple>
#include <type_traits>

#include "masked_linear.h"

namespace sparsebert {
namespace {

constexpr const char* kDtypes = "float32, float64, bfloat16 or float16";

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// dst = src where the mask bit is set, else +0 (an AND with an all-ones/all-zeros lane mask,
// so pruned NaN/Inf do not leak); with scores != nullptr also scores = src * weight from the
// same read of src. dst may alias src. Rows [r0, r1) of a row-major [rows, cols] matrix. The
// 8 elements of one mask byte form an unrolled inner loop that the compiler turns into
// broadcast/shift/and vectors (an integer AND vectorizes better than a floating-point select).
template <typename T, bool kScores>
__attribute__((target_clones("avx512f", "avx2", "default")))
void mask_rows(const T* src, const uint8_t* mask, T* dst, const T* weight, T* scores, int64_t r0, int64_t r1,
               int64_t cols) {
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(U) == sizeof(T));
  const auto keep_if = [](T g, unsigned bit) { return std::bit_cast<T>(U(std::bit_cast<U>(g) & U(U(0) - U(bit)))); };
  const int64_t mcols = packed_cols(cols);
  const int64_t full = cols / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * mcols;
    const int64_t off = r * cols;
    for (int64_t b = 0; b < full; ++b) {
      const unsigned bits = m[b];
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const int64_t j = off + 8 * b + k;
        const T g = src[j];
        if constexpr (kScores) scores[j] = g * weight[j];
        dst[j] = keep_if(g, (bits >> k) & 1u);
      }
    }
    for (int64_t c = 8 * full; c < cols; ++c) {
      const int64_t j = off + c;
      const T g = src[j];
      if constexpr (kScores) scores[j] = g * weight[j];
      dst[j] = keep_if(g, mask_bit(m, c));
    }
  }
}

template <bool kScores>
void mask_pass(const at::Tensor& src, const at::Tensor& mask, const at::Tensor& dst, const at::Tensor& weight,
               const at::Tensor& scores) {
  const int64_t rows = src.size(0), cols = src.size(1);
  // About 32K elements a task keeps the parallel overhead small against memory traffic.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "masked_linear_mask_pass", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    const uint8_t* m = mask.const_data_ptr<uint8_t>();
    scalar_t* d = dst.mutable_data_ptr<scalar_t>();
    const scalar_t* w = kScores ? weight.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* g = kScores ? scores.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      mask_rows<scalar_t, kScores>(s, m, d, w, g, r0, r1, cols);
    });
  });
}

// W * M as a new contiguous tensor, alive only for the GEMM that needs it.
at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask) {
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  mask_pass<false>(w, mask, out, {}, {});
  return out;
}

void check_cpu_dtype(const at::Tensor& t, const char* name) {
  check_linear_dtype(t, name, supported_dtype(t.scalar_type()), kDtypes);
}

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                          const std::optional<at::Tensor>& bias, bool weight_is_masked) {
  if (weight_is_masked) return at::linear(x, weight, bias);
  return at::linear(x, masked_weight(weight, mask), bias);
}

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const std::optional<at::Tensor>& bias, bool weight_is_masked) {
  check_cpu_dtype(weight, "weight");
  check_forward(x, weight, mask, bias);
  return linear_forward(x, weight, mask, bias, weight_is_masked);
}

at::Tensor movement_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                               const at::Tensor& mask, const std::optional<at::Tensor>& bias) {
  check_cpu_dtype(weight, "weight");
  check_forward(x, weight, mask, bias);
  check_scores(scores, weight);
  return linear_forward(x, weight, mask, bias, /*weight_is_masked=*/false);
}

at::Tensor masked_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& mask,
                                        bool weight_is_masked) {
  check_cpu_dtype(weight, "weight");
  check_grad_input(grad_out, weight, mask);
  // matmul folds the leading dimensions of grad_out into one GEMM, strided or not.
  return at::matmul(grad_out, weight_is_masked ? weight : masked_weight(weight, mask));
}

// G = grad_out^T x over the flattened leading dimensions: a fresh contiguous [out, in].
at::Tensor grad_weight_gemm(const at::Tensor& grad_out, const at::Tensor& x) {
  const auto as_2d = [](const at::Tensor& t) {
    // Explicit rows: reshape(-1, 0) is ambiguous for zero features.
    return t.reshape({c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)), t.size(-1)});
  };
  return at::mm(as_2d(grad_out).t(), as_2d(x)).contiguous();
}

at::Tensor masked_linear_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask) {
  check_cpu_dtype(x, "x");
  check_grad_weight_inputs(grad_out, x);
  check_mask_shape(mask, grad_out.size(-1), x.size(-1), x);
  at::Tensor g = grad_weight_gemm(grad_out, x);
  mask_pass<false>(g, mask, g, {}, {});
  return g;
}

std::tuple<at::Tensor, at::Tensor> movement_linear_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& mask) {
  check_cpu_dtype(weight, "weight");
  check_movement_grad_weight(grad_out, x, weight, mask);
  at::Tensor g = grad_weight_gemm(grad_out, x);
  at::Tensor grad_scores = at::empty_like(g);
  mask_pass<true>(g, mask, g, weight.contiguous(), grad_scores);
  return {g, grad_scores};
}

}  // namespace
}  // namespace sparsebert

TORCH_LIBRARY_IMPL(sparsebert, CPU, m) {
  m.impl("masked_linear", &sparsebert::masked_linear_cpu);
  m.impl("movement_linear", &sparsebert::movement_linear_cpu);
  m.impl("masked_linear_grad_input", &sparsebert::masked_linear_grad_input_cpu);
  m.impl("masked_linear_grad_weight", &sparsebert::masked_linear_grad_weight_cpu);
  m.impl("movement_linear_grad_weight", &sparsebert::movement_linear_grad_weight_cpu);
}
