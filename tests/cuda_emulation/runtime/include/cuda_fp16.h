#pragma once
// __half: the IEEE binary16 bits, converted (round to nearest even) through c10::Half.
#include <cuda_runtime.h>

#include <c10/util/Half.h>

struct __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(c10::Half(f).x) {}
  operator float() const { return static_cast<float>(c10::Half(__x, c10::Half::from_bits())); }
};

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
