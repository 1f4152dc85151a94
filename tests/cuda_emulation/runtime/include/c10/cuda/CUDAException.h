#pragma once
// C10_CUDA_CHECK and C10_CUDA_KERNEL_LAUNCH_CHECK over the emulated runtime's errors.
#include <cuda_runtime.h>

#include <c10/util/Exception.h>

#define C10_CUDA_CHECK(EXPR)                                                             \
  do {                                                                                   \
    const cudaError_t emu_error_ = (EXPR);                                               \
    TORCH_CHECK(emu_error_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(emu_error_)); \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
