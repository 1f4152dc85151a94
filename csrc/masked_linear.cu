// masked_linear on CUDA. In the general case W * M never exists in global memory: a tiled GEMM
// applies the mask bits while it stages W tiles in shared memory (forward and grad_input), on
// tensor cores (wmma) for fp16/bf16 and on CUDA cores for fp32/fp64.
// weight_is_masked=True forward / grad_input are plain cuBLAS GEMMs through ATen. grad_weight is
// an ATen GEMM followed by one fused elementwise mask epilogue (which also writes grad_S).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "masked_linear.h"

namespace sparsebert {
namespace {

constexpr const char* kDtypes = "float32, float64, bfloat16 or float16";

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Block tile BM x BN over the output, BK deep, 256 threads. The SIMT kernel gives each of its
// 16 x 16 threads TM x TN outputs spaced 16 apart, so that a warp's shared-memory reads and
// global writes are consecutive; the tensor-core kernel gives each of its 8 warps two 16 x 16
// accumulator fragments and reuses the same thread mapping for its epilogue.
constexpr int kBM = 64, kBN = 64, kBK = 16;
constexpr int kThreadsM = 16, kThreadsN = 16, kThreads = kThreadsM * kThreadsN;
constexpr int kTM = kBM / kThreadsM, kTN = kBN / kThreadsN;
// Row pitch of the staged tiles (and of the fp32 epilogue tile): the padding staggers the
// transposed stores across banks; 8 keeps 16-bit rows a multiple of 16 bytes, as wmma needs.
constexpr int kPad = 4, kPadWmma = 8;
static_assert(kBM == kBN, "one row pitch serves both staged tiles");
static_assert(kBM * kBK % kThreads == 0 && kBN * kBK % kThreads == 0, "tile loads must split evenly");

// Stages the k0 slice of C[M, N] = A[M, K] B[K, N] in shared memory, element (m, k) of A at
// As[k * ld + m - m0] and (k, n) of B at Bs[k * ld + n - n0], zero outside the matrices. A is
// row-major; B comes from a row-major W with packed mask M over W's own shape:
//   kWeightRowsAreN (forward):  W is [N, K], B[k, n] = W[n, k] * M[n, k]
//   !kWeightRowsAreN (grad_in): W is [K, N], B[k, n] = W[k, n] * M[k, n]
// The mask is a select, so non-finite weights at pruned positions never reach C.
template <typename T, typename S, bool kWeightRowsAreN>
__device__ __forceinline__ void stage_tiles(S* __restrict__ As, S* __restrict__ Bs, int ld, const T* __restrict__ a,
                                            const T* __restrict__ w, const uint8_t* __restrict__ mask, int64_t m0,
                                            int64_t n0, int64_t k0, int64_t M, int64_t N, int64_t K) {
  const int tid = threadIdx.x;
  const int64_t w_cols = kWeightRowsAreN ? K : N;
  const int64_t mask_cols = (w_cols + 7) / 8;  // packed_cols() is host-only
  // A: consecutive threads read consecutive k of one row.
#pragma unroll
  for (int l = 0; l < kBM * kBK / kThreads; ++l) {
    const int e = tid + l * kThreads;
    const int row = e / kBK, kk = e % kBK;
    const int64_t m = m0 + row, k = k0 + kk;
    As[kk * ld + row] = (m < M && k < K) ? static_cast<S>(a[m * K + k]) : S(0);
  }
  // B: consecutive threads read along W's contiguous dimension.
#pragma unroll
  for (int l = 0; l < kBN * kBK / kThreads; ++l) {
    const int e = tid + l * kThreads;
    const int kk = kWeightRowsAreN ? e % kBK : e / kBN;
    const int nn = kWeightRowsAreN ? e / kBK : e % kBN;
    const int64_t n = n0 + nn, k = k0 + kk;
    const int64_t w_row = kWeightRowsAreN ? n : k;
    const int64_t w_col = kWeightRowsAreN ? k : n;
    const bool keep = n < N && k < K && mask_bit(mask + w_row * mask_cols, w_col);
    Bs[kk * ld + nn] = keep ? static_cast<S>(w[w_row * w_cols + w_col]) : S(0);
  }
}

// C = acc (+ bias) for this thread's outputs of the block tile; value(i, j) is the
// accumulator of output (m0 + ty + 16 i, n0 + tx + 16 j).
template <typename T, typename Value>
__device__ __forceinline__ void store_tile(Value value, const T* __restrict__ bias, T* __restrict__ c, int64_t m0,
                                           int64_t n0, int64_t M, int64_t N) {
  using acc_t = at::opmath_type<T>;
  const int tx = threadIdx.x % kThreadsN, ty = threadIdx.x / kThreadsN;
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t m = m0 + ty + i * kThreadsM;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t n = n0 + tx + j * kThreadsN;
      if (n >= N) continue;
      acc_t v = value(i, j);
      if (bias != nullptr) v += static_cast<acc_t>(bias[n]);
      c[m * N + n] = static_cast<T>(v);
    }
  }
}

// C[M, N] = A[M, K] B[K, N] (+ bias[N]) on CUDA cores, tiles staged in the accumulation type.
template <typename T, bool kWeightRowsAreN>
__global__ void __launch_bounds__(kThreads)
    masked_gemm_kernel(const T* __restrict__ a, const T* __restrict__ w, const uint8_t* __restrict__ mask,
                       const T* __restrict__ bias, T* __restrict__ c, int64_t M, int64_t N, int64_t K) {
  using acc_t = at::opmath_type<T>;
  constexpr int ld = kBM + kPad;
  __shared__ acc_t As[kBK * ld];
  __shared__ acc_t Bs[kBK * ld];
  const int tx = threadIdx.x % kThreadsN, ty = threadIdx.x / kThreadsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  acc_t acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    stage_tiles<T, acc_t, kWeightRowsAreN>(As, Bs, ld, a, w, mask, m0, n0, k0, M, N, K);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      acc_t av[kTM], bv[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) av[i] = As[kk * ld + ty + i * kThreadsM];
#pragma unroll
      for (int j = 0; j < kTN; ++j) bv[j] = Bs[kk * ld + tx + j * kThreadsN];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += av[i] * bv[j];
    }
    // The next iteration overwrites the tiles that slower threads may still be reading.
    __syncthreads();
  }
  store_tile<T>([&](int i, int j) { return acc[i][j]; }, bias, c, m0, n0, M, N);
}

// The CUDA type of a 16-bit c10 type, for the wmma fragments (same bits, same layout).
template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// The same product on tensor cores for fp16/bf16 (fp32 accumulate): 16 x 16 x 16 wmma
// fragments; warp w owns fragment row w / 2 and fragment columns 2 (w % 2) and 2 (w % 2) + 1.
template <typename T, bool kWeightRowsAreN>
__global__ void __launch_bounds__(kThreads)
    masked_gemm_wmma_kernel(const T* __restrict__ a, const T* __restrict__ w, const uint8_t* __restrict__ mask,
                            const T* __restrict__ bias, T* __restrict__ c, int64_t M, int64_t N, int64_t K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // bf16 fragments need sm_80; the build targets sm_80 and sm_90 (SPARSEBERT_CUDA_ARCHS).
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using F = typename WmmaType<T>::type;
  constexpr int ld = kBM + kPadWmma;
  constexpr int ldc = kBN + kPad;
  static_assert(kBK == 16 && kBM == 4 * 16 && kBN == 4 * 16 && kThreads == 8 * 32, "one k-step, 2 fragments a warp");
  // wmma loads and stores need 32-byte aligned fragment pointers: fragment offsets are
  // multiples of 16 elements (32 bytes) and the tiles themselves are aligned.
  __shared__ __align__(32) T As[kBK * ld];
  __shared__ __align__(32) T Bs[kBK * ld];
  __shared__ __align__(32) float Cs[kBM * ldc];
  const int warp = threadIdx.x / 32;
  const int frag_m = warp / 2, frag_n = (warp % 2) * 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    stage_tiles<T, T, kWeightRowsAreN>(As, Bs, ld, a, w, mask, m0, n0, k0, M, N, K);
    __syncthreads();
    // As holds A k-major, i.e. a column-major 16 x 16 block per fragment; Bs holds B row-major.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, F, wmma::col_major> fa;
    wmma::load_matrix_sync(fa, reinterpret_cast<const F*>(As) + frag_m * 16, ld);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, F, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, reinterpret_cast<const F*>(Bs) + (frag_n + j) * 16, ld);
      wmma::mma_sync(acc[j], fa, fb, acc[j]);
    }
    __syncthreads();
  }
  // Fragment element order is opaque: go through shared memory for the bounded epilogue.
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    wmma::store_matrix_sync(Cs + frag_m * 16 * ldc + (frag_n + j) * 16, acc[j], ldc, wmma::mem_row_major);
  }
  __syncthreads();
  const int tx = threadIdx.x % kThreadsN, ty = threadIdx.x / kThreadsN;
  store_tile<T>([&](int i, int j) { return Cs[(ty + i * kThreadsM) * ldc + tx + j * kThreadsN]; }, bias, c, m0, n0, M,
                N);
#endif
}

// g = g where the mask bit is set, else 0 (exactly 0, whatever g holds), over a row-major
// [rows, cols] g; with kScores also scores = g * w from the same read of g.
template <typename T, bool kScores>
__global__ void mask_epilogue_kernel(T* __restrict__ g, const uint8_t* __restrict__ mask, const T* __restrict__ w,
                                     T* __restrict__ scores, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<T>;
  const int64_t mask_cols = (cols + 7) / 8;  // packed_cols() is host-only
  const int64_t n = rows * cols;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / cols, col = i - r * cols;
    const T v = g[i];
    if constexpr (kScores) scores[i] = static_cast<T>(static_cast<acc_t>(v) * static_cast<acc_t>(w[i]));
    g[i] = mask_bit(mask + r * mask_cols, col) ? v : T(0);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A [M, K] (any layout; made contiguous) times the masked W, as laid out in stage_tiles.
at::Tensor masked_gemm(const at::Tensor& a_in, const at::Tensor& weight, const at::Tensor& mask,
                       const std::optional<at::Tensor>& bias, bool weight_rows_are_n) {
  const at::Tensor a = a_in.contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t N = weight_rows_are_n ? w.size(0) : w.size(1);
  TORCH_CHECK(ceil_div(N, kBN) <= 65535, "masked_linear: ", N, " output columns exceed the CUDA grid");
  at::Tensor c = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kBM)), static_cast<unsigned>(ceil_div(N, kBN)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "masked_linear_gemm_cuda", [&] {
    const scalar_t* bias_ptr = b.has_value() ? b->const_data_ptr<scalar_t>() : nullptr;
    // One launch for both weight layouts and both kinds of cores.
    auto kernel = [&] {
      if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
        return weight_rows_are_n ? masked_gemm_wmma_kernel<scalar_t, true> : masked_gemm_wmma_kernel<scalar_t, false>;
      } else {
        return weight_rows_are_n ? masked_gemm_kernel<scalar_t, true> : masked_gemm_kernel<scalar_t, false>;
      }
    }();
    kernel<<<grid, kThreads, 0, stream>>>(a.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                           mask.const_data_ptr<uint8_t>(), bias_ptr, c.mutable_data_ptr<scalar_t>(),
                                           M, N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c;
}

template <bool kScores>
void mask_epilogue(const at::Tensor& g, const at::Tensor& mask, const at::Tensor& weight, const at::Tensor& scores) {
  const int64_t rows = g.size(0), cols = g.size(1);
  if (rows * cols == 0) return;
  constexpr int threads = 256;
  // Grid-stride loop: a few waves of blocks are enough to saturate memory bandwidth.
  const int64_t blocks = std::min<int64_t>(ceil_div(rows * cols, threads), 65536);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "masked_linear_epilogue_cuda", [&] {
    mask_epilogue_kernel<scalar_t, kScores><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        g.mutable_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(),
        kScores ? weight.const_data_ptr<scalar_t>() : nullptr, kScores ? scores.mutable_data_ptr<scalar_t>() : nullptr,
        rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_cuda_dtype(const at::Tensor& t, const char* name) {
  check_linear_dtype(t, name, supported_dtype(t.scalar_type()), kDtypes);
}

// t as [rows, last dim]; explicit rows, as reshape(-1, 0) is ambiguous for zero features.
at::Tensor as_2d(const at::Tensor& t) {
  return t.reshape({c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)), t.size(-1)});
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                          const std::optional<at::Tensor>& bias, bool weight_is_masked) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (weight_is_masked) return at::linear(x, weight, bias);
  const at::Tensor y = masked_gemm(as_2d(x), weight, mask, bias, /*weight_rows_are_n=*/true);
  return y.view(with_last(x, weight.size(0)));
}

at::Tensor masked_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                              const std::optional<at::Tensor>& bias, bool weight_is_masked) {
  check_cuda_dtype(weight, "weight");
  check_forward(x, weight, mask, bias);
  return linear_forward(x, weight, mask, bias, weight_is_masked);
}

at::Tensor movement_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                                const at::Tensor& mask, const std::optional<at::Tensor>& bias) {
  check_cuda_dtype(weight, "weight");
  check_forward(x, weight, mask, bias);
  check_scores(scores, weight);
  return linear_forward(x, weight, mask, bias, /*weight_is_masked=*/false);
}

at::Tensor masked_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& mask,
                                         bool weight_is_masked) {
  check_cuda_dtype(weight, "weight");
  check_grad_input(grad_out, weight, mask);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  if (weight_is_masked) return at::matmul(grad_out, weight);
  const at::Tensor gx = masked_gemm(as_2d(grad_out), weight, mask, std::nullopt,
                                    /*weight_rows_are_n=*/false);
  return gx.view(with_last(grad_out, weight.size(1)));
}

// G = grad_out^T x over the flattened leading dimensions: a fresh contiguous [out, in].
at::Tensor grad_weight_gemm(const at::Tensor& grad_out, const at::Tensor& x) {
  return at::mm(as_2d(grad_out).t(), as_2d(x)).contiguous();
}

at::Tensor masked_linear_grad_weight_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask) {
  check_cuda_dtype(x, "x");
  check_grad_weight_inputs(grad_out, x);
  check_mask_shape(mask, grad_out.size(-1), x.size(-1), x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor g = grad_weight_gemm(grad_out, x);
  mask_epilogue<false>(g, mask, {}, {});
  return g;
}

std::tuple<at::Tensor, at::Tensor> movement_linear_grad_weight_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                     const at::Tensor& weight,
                                                                     const at::Tensor& mask) {
  check_cuda_dtype(weight, "weight");
  check_movement_grad_weight(grad_out, x, weight, mask);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor g = grad_weight_gemm(grad_out, x);
  at::Tensor grad_scores = at::empty_like(g);
  mask_epilogue<true>(g, mask, weight.contiguous(), grad_scores);
  return {g, grad_scores};
}

}  // namespace
}  // namespace sparsebert

TORCH_LIBRARY_IMPL(sparsebert, CUDA, m) {
  m.impl("masked_linear", &sparsebert::masked_linear_cuda);
  m.impl("movement_linear", &sparsebert::movement_linear_cuda);
  m.impl("masked_linear_grad_input", &sparsebert::masked_linear_grad_input_cuda);
  m.impl("masked_linear_grad_weight", &sparsebert::masked_linear_grad_weight_cuda);
  m.impl("movement_linear_grad_weight", &sparsebert::movement_linear_grad_weight_cuda);
}
