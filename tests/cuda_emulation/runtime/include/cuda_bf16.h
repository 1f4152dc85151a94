#pragma once
// __nv_bfloat16: the bfloat16 bits, converted (round to nearest even) through c10::BFloat16.
#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(c10::BFloat16(f).x) {}
  operator float() const { return static_cast<float>(c10::BFloat16(__x, c10::BFloat16::from_bits())); }
};

inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
