#pragma once
// Order-preserving 32-bit keys shared by the CPU and CUDA top-k kernels.
//
// The key of a value is taken from the value converted to float32 (|value| when
// use_abs): bits ^ (sign ? 0xFFFFFFFF : 0x80000000). Unsigned key order is then
// the float order, so "the k largest values" is "the k largest keys", and a radix
// select over key digits finds the k-th largest without sorting.
#include <ATen/ATen.h>

#include "common.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace sparsebert::topk {

// Bits of a float32, without type punning through a union (valid in host and device code).
SPARSEBERT_HOST_DEVICE uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
#endif
}

// Exponent all ones: NaN or +-Inf.
SPARSEBERT_HOST_DEVICE bool bits_non_finite(uint32_t bits) { return (bits & 0x7F800000u) == 0x7F800000u; }

// Float bits (already |.|-ed when use_abs) to the order-preserving key.
SPARSEBERT_HOST_DEVICE uint32_t bits_to_key(uint32_t bits) {
  // Arithmetic shift of the sign bit: all ones for negatives, zero otherwise.
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
  return bits ^ flip;
}

SPARSEBERT_HOST_DEVICE uint32_t abs_bits(uint32_t bits, bool use_abs) { return use_abs ? bits & 0x7FFFFFFFu : bits; }

// The inverse of bits_to_key, as a float: the value the threshold key stands for.
SPARSEBERT_HOST_DEVICE float key_to_float(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? key ^ 0x80000000u : ~key;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// Which keys a histogram pass looks at and which of their bits it counts.
struct Digit {
  uint32_t prefix_mask;   // top prefix_bits bits set
  uint32_t prefix_value;  // prefix << (32 - prefix_bits)
  uint32_t shift;         // 32 - prefix_bits - digit_bits
  uint32_t digit_mask;    // 2 ** digit_bits - 1

  static Digit make(uint32_t prefix, int prefix_bits, int digit_bits) {
    Digit d;
    d.prefix_mask = prefix_bits == 0 ? 0u : ~0u << (32 - prefix_bits);
    d.prefix_value = prefix_bits == 0 ? 0u : prefix << (32 - prefix_bits);
    d.shift = static_cast<uint32_t>(32 - prefix_bits - digit_bits);
    d.digit_mask = digit_bits == 32 ? ~0u : (1u << digit_bits) - 1u;
    return d;
  }
  SPARSEBERT_HOST_DEVICE bool matches(uint32_t key) const { return (key & prefix_mask) == prefix_value; }
  SPARSEBERT_HOST_DEVICE uint32_t bin(uint32_t key) const { return (key >> shift) & digit_mask; }
};

// Argument checks of topk_histogram, shared by both backends.
inline void check_histogram_args(int64_t prefix, int64_t prefix_bits, int64_t digit_bits) {
  TORCH_CHECK(digit_bits >= 1 && digit_bits <= 16, "topk_histogram: digit_bits must be in [1, 16], got ", digit_bits);
  TORCH_CHECK(prefix_bits >= 0 && prefix_bits + digit_bits <= 32,
              "topk_histogram: prefix_bits must be in [0, 32 - digit_bits] = [0, ", 32 - digit_bits, "], got ",
              prefix_bits);
  TORCH_CHECK(prefix >= 0 && prefix < (int64_t{1} << prefix_bits), "topk_histogram: prefix must be in [0, 2**",
              prefix_bits, "), got ", prefix);
}

// The tensor list every top-k op takes: non-empty, one device, one floating dtype, >= 1-D.
inline void check_inputs(at::TensorList xs, const char* op) {
  TORCH_CHECK(!xs.empty(), op, ": xs must hold at least one tensor");
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto& x = xs[i];
    TORCH_CHECK(x.dim() >= 1, op, ": xs[", i, "] must have at least one dimension, got a 0-d tensor");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16 ||
                    x.scalar_type() == at::kHalf,
                op, ": xs[", i, "] must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
    TORCH_CHECK(x.scalar_type() == xs[0].scalar_type(), op, ": all xs must share one dtype; xs[0] is ",
                xs[0].scalar_type(), " but xs[", i, "] is ", x.scalar_type());
    TORCH_CHECK(x.device() == xs[0].device(), op, ": all xs must be on one device; xs[0] is on ", xs[0].device(),
                " but xs[", i, "] is on ", x.device());
  }
}

inline int64_t total_numel(at::TensorList xs) {
  int64_t n = 0;
  for (const auto& x : xs) n += x.numel();
  return n;
}

// Packed mask outputs, one per input; zeroed, or left for a kernel that writes every byte.
inline std::vector<at::Tensor> new_masks(at::TensorList xs, bool zeroed) {
  std::vector<at::Tensor> masks;
  masks.reserve(xs.size());
  for (const auto& x : xs) {
    auto shape = x.sizes().vec();
    shape.back() = packed_cols(shape.back());
    const auto options = x.options().dtype(at::kByte);
    masks.push_back(zeroed ? at::zeros(shape, options) : at::empty(shape, options));
  }
  return masks;
}

[[noreturn]] inline void fail_non_finite(const char* op) {
  TORCH_CHECK(false, op, ": the input holds NaN or +-Inf (after conversion to float32); top-k selection needs finite values");
}

}  // namespace sparsebert::topk
