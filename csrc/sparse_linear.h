#pragma once
// The packed weight of sparse_linear and its argument checks, shared by the CPU and CUDA bindings
// so that both raise the same messages before any work.
//
// A weight W [out_features, in_features] is stored as R x 1 blocks (R = block_rows, 1 or 4): block
// row g covers output rows [g R, g R + R). Its blocks are blocks [row_offsets[g], row_offsets[g + 1])
// of
//   values      [nblocks, R]    values[b, r] = W[g R + r, columns[b]], the dtype of x
//   columns     [nblocks]       int16 or int32, each in [0, in_features)
//   row_offsets [out / R + 1]   int32, row_offsets[0] = 0, nondecreasing, last = nblocks
// R = 1 is row CSR. R = 4 serves 4x1 block-pruned weights: one load of an activation feeds 4 rows.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace sparsebert {

constexpr const char* kSparseDtypes = "float32, bfloat16 or float16";

inline bool sparse_dtype_ok(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

inline int64_t sparse_block_rows(const at::Tensor& values) { return values.dim() == 2 ? values.size(1) : 0; }

// Everything that needs no pass over the index arrays; returns out_features.
inline int64_t check_sparse_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& columns,
                                   const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(sparse_dtype_ok(x.scalar_type()), "sparse_linear: x must be ", kSparseDtypes, ", got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "sparse_linear: x must have at least one dimension, got a scalar");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "sparse_linear: values have dtype ", values.scalar_type(),
              " but x has dtype ", x.scalar_type());
  const int64_t block_rows = sparse_block_rows(values);
  TORCH_CHECK(block_rows == 1 || block_rows == 4, "sparse_linear: values must have shape [nblocks, R] with R (rows ",
              "per block) 1 or 4, got ", values.sizes());
  TORCH_CHECK(columns.scalar_type() == at::kShort || columns.scalar_type() == at::kInt,
              "sparse_linear: columns must be int16 or int32, got ", columns.scalar_type());
  TORCH_CHECK(columns.dim() == 1 && columns.size(0) == values.size(0), "sparse_linear: columns must have shape [",
              values.size(0), "] (one per block of values), got ", columns.sizes());
  TORCH_CHECK(row_offsets.scalar_type() == at::kInt, "sparse_linear: row_offsets must be int32, got ",
              row_offsets.scalar_type());
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.size(0) >= 1,
              "sparse_linear: row_offsets must have shape [out_features / R + 1], got ", row_offsets.sizes());
  for (const auto& [t, name] : {std::pair{&values, "values"}, {&columns, "columns"}, {&row_offsets, "row_offsets"}}) {
    TORCH_CHECK(t->device() == x.device(), "sparse_linear: ", name, " is on ", t->device(), " but x is on ",
                x.device());
    TORCH_CHECK(t->is_contiguous(), "sparse_linear: ", name, " must be contiguous");
  }
  const int64_t out_features = (row_offsets.size(0) - 1) * block_rows;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), "sparse_linear: bias is ",
                bias->scalar_type(), " on ", bias->device(), " but x is ", x.scalar_type(), " on ", x.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "sparse_linear: bias must have shape [",
                out_features, "] (out_features), got ", bias->sizes());
  }
  return out_features;
}

// Calls fn(T{}, Idx{}) with T the value type of x (float, BFloat16 or Half) and Idx the index type of
// columns (int16_t or int32_t), both checked by check_sparse_linear.
template <typename Fn>
void dispatch_sparse_types(const at::Tensor& x, const at::Tensor& columns, const Fn& fn) {
  const auto with_index = [&](auto value_tag) {
    if (columns.scalar_type() == at::kShort) {
      fn(value_tag, int16_t{});
    } else {
      fn(value_tag, int32_t{});
    }
  };
  AT_DISPATCH_SWITCH(x.scalar_type(), "sparse_linear",
                     AT_DISPATCH_CASE(at::kFloat, [&] { with_index(scalar_t{}); })
                         AT_DISPATCH_CASE(at::kBFloat16, [&] { with_index(scalar_t{}); })
                             AT_DISPATCH_CASE(at::kHalf, [&] { with_index(scalar_t{}); }));
}

}  // namespace sparsebert
