#pragma once
// Argument checks and bit-mask helpers shared by the CPU and CUDA kernels.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace sparsebert {

// Bytes per row of a packed mask over `cols` elements.
inline int64_t packed_cols(int64_t cols) { return (cols + 7) / 8; }

// A packed mask for a tensor of shape `like`: uint8, contiguous, same device,
// shape [*like.shape[:-1], ceil(like.shape[-1] / 8)].
inline void check_packed_mask(const at::Tensor& mask, const at::Tensor& like, const char* mask_name) {
  TORCH_CHECK(mask.scalar_type() == at::kByte, mask_name, " must be a bit-packed uint8 mask, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.device() == like.device(), mask_name, " is on ", mask.device(), " but the tensor it masks is on ",
              like.device());
  TORCH_CHECK(like.dim() >= 1, mask_name, ": the masked tensor must have at least one dimension");
  TORCH_CHECK(mask.dim() == like.dim(), mask_name, " has ", mask.dim(), " dimensions, expected ", like.dim());
  for (int64_t d = 0; d + 1 < like.dim(); ++d) {
    TORCH_CHECK(mask.size(d) == like.size(d), mask_name, " has shape ", mask.sizes(), ", expected ",
                "[*", like.sizes(), "[:-1], ", packed_cols(like.size(-1)), "]");
  }
  TORCH_CHECK(mask.size(-1) == packed_cols(like.size(-1)), mask_name, " has shape ", mask.sizes(),
              ", expected last dimension ceil(", like.size(-1), " / 8) = ", packed_cols(like.size(-1)));
  // Checked after the shape, so that a wrong shape is reported as such. The kernels read packed rows as
  // plain bytes; the Python wrappers (sparsebert.ops) pass mask.contiguous().
  TORCH_CHECK(mask.is_contiguous(), mask_name, " must be contiguous");
}

#if defined(__CUDACC__)
#define SPARSEBERT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPARSEBERT_HOST_DEVICE inline
#endif

SPARSEBERT_HOST_DEVICE bool mask_bit(const uint8_t* row, int64_t j) { return (row[j >> 3] >> (j & 7)) & 1; }

}  // namespace sparsebert
