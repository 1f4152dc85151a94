// sparse_linear on CUDA: y = x W^T + b with W packed as R x 1 blocks (see sparse_linear.h).
//
// x is first transposed to an fp32 xt [in_features, tokens] (through shared memory, 32 x 32 tiles), so
// that a warp's 32 lanes, one token each, read one contiguous 32-token segment of xt per nonzero block
// while every lane reads the same (column, values), a broadcast. A thread block owns 32 tokens x 32 output rows:
// its 8 warps share out the 32 / R block rows, accumulate in fp32 registers, and stage the tile in
// shared memory so that y is written in coalesced 32-row segments of each token's output.
// Out-of-range columns or row offsets (a corrupt packed weight) trip a device-side assertion,
// as out-of-range indices do in ATen's indexing kernels.
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "sparse_linear.h"

namespace sparsebert {
namespace {

constexpr int kTileTokens = 32;  // one token per lane
constexpr int kTileRows = 32;    // output rows per thread block
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// xt[k][t] = x[t][k] in fp32 for x [tokens, features] with row stride ldx. Block (32, 8): each thread moves
// 4 elements in and 4 out, both coalesced; the padded row keeps the column reads free of bank conflicts.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    transpose_kernel(const T* __restrict__ x, int64_t ldx, float* __restrict__ xt, int64_t tokens, int64_t features) {
  __shared__ float tile[32][33];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * 32, k0 = static_cast<int64_t>(blockIdx.y) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t t = t0 + i, k = k0 + threadIdx.x;
    if (t < tokens && k < features) tile[i][threadIdx.x] = static_cast<float>(x[t * ldx + k]);
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t k = k0 + i, t = t0 + threadIdx.x;
    if (t < tokens && k < features) xt[k * tokens + t] = tile[threadIdx.x][i];
  }
}

template <typename T, typename Idx, int R>
__global__ void __launch_bounds__(kThreads)
    sparse_linear_kernel(const float* __restrict__ xt, const T* __restrict__ values, const Idx* __restrict__ columns,
                         const int32_t* __restrict__ row_offsets, const T* __restrict__ bias, T* __restrict__ y,
                         int64_t tokens, int64_t in_features, int64_t out_features, int64_t nblocks) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t tile[kTileTokens][kTileRows + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTileTokens;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t t = t0 + lane;
  for (int gl = warp; gl < kTileRows / R; gl += kWarps) {
    const int64_t g = n0 / R + gl;
    if (g * R >= out_features) break;
    acc_t acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = acc_t(0);
    const int64_t b0 = row_offsets[g], b1 = row_offsets[g + 1];
    CUDA_KERNEL_ASSERT(0 <= b0 && b0 <= b1 && b1 <= nblocks);
    // The first block row starts at block 0 and the last ends at nblocks, or blocks are silently skipped.
    CUDA_KERNEL_ASSERT((g > 0 || b0 == 0) && ((g + 1) * R < out_features || b1 == nblocks));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t k = static_cast<int64_t>(columns[b]);
      CUDA_KERNEL_ASSERT(0 <= k && k < in_features);
      const acc_t xv = t < tokens ? xt[k * tokens + t] : acc_t(0);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += static_cast<acc_t>(values[b * R + r]) * xv;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) tile[lane][gl * R + r] = acc[r];
  }
  __syncthreads();
  // Thread i writes row n0 + i % 32 of tokens t0 + i / 32, t0 + i / 32 + 8, ...: 32 consecutive outputs a warp.
  const int64_t n = n0 + lane;
  if (n >= out_features) return;
  const acc_t bv = bias != nullptr ? static_cast<acc_t>(bias[n]) : acc_t(0);
  for (int tl = warp; tl < kTileTokens && t0 + tl < tokens; tl += kWarps) {
    y[(t0 + tl) * out_features + n] = static_cast<T>(tile[tl][lane] + bv);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& columns,
                              const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias) {
  const int64_t out_features = check_sparse_linear(x, values, columns, row_offsets, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in_features = x.size(-1);
  const int64_t tokens = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor y = at::empty(shape, x.options());
  if (tokens == 0 || out_features == 0) return y;
  TORCH_CHECK(ceil_div(out_features, kTileRows) <= 65535 && ceil_div(in_features, 32) <= 65535, "sparse_linear: ",
              out_features, " output features or ", in_features, " input features exceed the CUDA grid");
  at::Tensor x2 = x.reshape({tokens, in_features});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const at::Tensor xt = at::empty({in_features, tokens}, x.options().dtype(at::kFloat));
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const dim3 grid(static_cast<unsigned>(ceil_div(tokens, kTileTokens)),
                  static_cast<unsigned>(ceil_div(out_features, kTileRows)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto value_tag, auto index_tag) {
    using T = decltype(value_tag);
    using Idx = decltype(index_tag);
    if (in_features > 0) {
      const dim3 transpose_grid(static_cast<unsigned>(ceil_div(tokens, 32)),
                                static_cast<unsigned>(ceil_div(in_features, 32)));
      transpose_kernel<T><<<transpose_grid, dim3(32, kThreads / 32), 0, stream>>>(
          x2.const_data_ptr<T>(), x2.stride(0), xt.mutable_data_ptr<float>(), tokens, in_features);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    auto kernel = sparse_block_rows(values) == 1 ? sparse_linear_kernel<T, Idx, 1> : sparse_linear_kernel<T, Idx, 4>;
    kernel<<<grid, kThreads, 0, stream>>>(xt.const_data_ptr<float>(), values.const_data_ptr<T>(),
                                          columns.const_data_ptr<Idx>(), row_offsets.const_data_ptr<int32_t>(),
                                          b.defined() ? b.const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(),
                                          tokens, in_features, out_features, values.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_sparse_types(x, columns, launch);
  return y;
}

}  // namespace
}  // namespace sparsebert

TORCH_LIBRARY_IMPL(sparsebert, CUDA, m) { m.impl("sparse_linear", &sparsebert::sparse_linear_cuda); }
