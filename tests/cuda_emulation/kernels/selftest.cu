// Kernels that test the CUDA emulation itself (test_emu_harness.py): the order each schedule runs
// threads and blocks in, garbage in shared memory, warp and block collectives, cub and wmma
// against known results, and each fault a GPU would not report. Ops of namespace emu_selftest.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cub/cub.cuh>

#include <string>

namespace {

constexpr unsigned kFull = 0xffffffffu;

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// out[0 * n + id]: when thread id first ran; out[1 * n + id]: when it ran after the barrier.
__global__ void order_kernel(int* counter, int* out) {
  const int n = gridDim.x * blockDim.x, id = blockIdx.x * blockDim.x + threadIdx.x;
  out[id] = atomicAdd(counter, 1);
  __syncthreads();
  out[n + id] = atomicAdd(counter, 1);
}

// Reads shared memory nobody wrote: garbage, new for every block.
__global__ void uninitialized_shared_kernel(int* out) {
  __shared__ int never_written[32];
  extern __shared__ int dynamic[];
  out[blockIdx.x * 64 + threadIdx.x] = never_written[threadIdx.x];
  out[blockIdx.x * 64 + 32 + threadIdx.x] = dynamic[threadIdx.x];
}

constexpr int kWarpOps = 12;

__global__ void warp_ops_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32, v = 10 * t;
  int* o = out + t * kWarpOps;
  o[0] = static_cast<int>(__ballot_sync(kFull, lane % 3 == 0));
  o[1] = __shfl_down_sync(kFull, v, 5);
  o[2] = __shfl_up_sync(kFull, v, 3);
  o[3] = __shfl_xor_sync(kFull, v, 7);
  o[4] = __shfl_sync(kFull, v, 31 - lane);
  o[5] = __shfl_down_sync(kFull, v, 2, 8);
  o[6] = __any_sync(kFull, lane == 17);
  o[7] = __all_sync(kFull, lane < 31);
  o[8] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 1) : -1;
  o[9] = __syncthreads_or(t == 40);
  o[10] = __syncthreads_count(t % 3 == 0);
  o[11] = __syncthreads_and(t < 1000);
}

constexpr int kCubThreads = 256;

// Per thread: exclusive sum of x[2t], inclusive sums of (x[2t], x[2t+1]) over the block, and in
// thread 0 the block sum of x[2t].
__global__ void cub_kernel(const int64_t* x, int64_t* out) {
  using Scan = cub::BlockScan<int64_t, kCubThreads>;
  using Reduce = cub::BlockReduce<int64_t, kCubThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int t = threadIdx.x;
  int64_t items[2] = {x[2 * t], x[2 * t + 1]}, inclusive[2], exclusive;
  Scan(scan_storage).ExclusiveSum(items[0], exclusive);
  __syncthreads();
  Scan(scan_storage).InclusiveSum(items, inclusive);
  const int64_t sum = Reduce(reduce_storage).Sum(items[0]);
  out[4 * t] = exclusive;
  out[4 * t + 1] = inclusive[0];
  out[4 * t + 2] = inclusive[1];
  out[4 * t + 3] = t == 0 ? sum : 0;
}

// Two scans through one TempStorage without the barrier cub requires in between.
__global__ void cub_reuse_kernel(const int64_t* x, int64_t* out) {
  using Scan = cub::BlockScan<int64_t, kCubThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int t = threadIdx.x;
  int64_t a, b;
  Scan(scan_storage).ExclusiveSum(x[t], a);
  Scan(scan_storage).ExclusiveSum(2 * x[t], b);
  out[t] = a;
  out[kCubThreads + t] = b;
}

// C = A B for 16 x 16 halves: A row-major at a with leading dimension lda, B column-major.
__global__ void wmma_kernel(const __half* a, const __half* b, float* c, int lda) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, lda);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// --- each a mistake the harness must report ------------------------------------------------

__global__ void exit_before_barrier_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_sync(kFull, static_cast<int>(threadIdx.x), 0);
}

__global__ void deadlock_kernel() {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

__global__ void lane_not_in_mask_kernel(int* out) { out[threadIdx.x] = __ballot_sync(0x1u, 1); }

__global__ void shuffle_outside_mask_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 4);
}

__global__ void trap_kernel() {
  if (threadIdx.x == 7) __trap();
}

__global__ void kernel_assert_kernel() { CUDA_KERNEL_ASSERT(threadIdx.x != 11); }

__global__ void too_much_shared_kernel(int* out) {
  __shared__ int big[10000];
  big[threadIdx.x] = 1;
  out[threadIdx.x] = big[threadIdx.x];
}

__global__ void empty_kernel() {}

// --- host side -----------------------------------------------------------------------------

// The ops write into `out` (int32, contiguous), whose shape gives the launch its size.
void check_out(const at::Tensor& out, int64_t dims) {
  TORCH_CHECK(out.scalar_type() == at::kInt && out.is_contiguous() && out.dim() == dims, "bad out tensor");
}

// out: [2, blocks, threads]
void order(at::Tensor& out) {
  check_out(out, 3);
  auto counter = at::zeros({1}, out.options());
  order_kernel<<<static_cast<unsigned>(out.size(1)), static_cast<unsigned>(out.size(2)), 0, stream()>>>(
      counter.data_ptr<int>(), out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out: [blocks, 2, 32]
void uninitialized_shared(at::Tensor& out) {
  check_out(out, 3);
  uninitialized_shared_kernel<<<static_cast<unsigned>(out.size(0)), 32, 32 * sizeof(int), stream()>>>(
      out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out: [64, kWarpOps]
void warp_ops(at::Tensor& out) {
  check_out(out, 2);
  TORCH_CHECK(out.size(0) == 64 && out.size(1) == kWarpOps);
  warp_ops_kernel<<<1, 64, 0, stream()>>>(out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor block_collectives(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kLong && x.numel() == 2 * kCubThreads && x.is_contiguous());
  auto out = at::empty({kCubThreads, 4}, x.options());
  cub_kernel<<<1, kCubThreads, 0, stream()>>>(x.data_ptr<int64_t>(), out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scan_storage_reuse(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kLong && x.numel() == kCubThreads && x.is_contiguous());
  auto out = at::empty({2, kCubThreads}, x.options());
  cub_reuse_kernel<<<1, kCubThreads, 0, stream()>>>(x.data_ptr<int64_t>(), out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor device_scan(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kLong && x.is_contiguous());
  auto out = at::empty_like(x);
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, x.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                               static_cast<int>(x.numel()), stream()));
  auto temp = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.data_ptr(), bytes, x.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                               static_cast<int>(x.numel()), stream()));
  return out;
}

// a: halves, the 16 x 16 A row-major from element a_offset with leading dimension lda;
// b: the 16 x 16 B stored column-major (B^T row-major).
at::Tensor wmma_product(const at::Tensor& a, const at::Tensor& b, int64_t lda, int64_t a_offset) {
  TORCH_CHECK(a.scalar_type() == at::kHalf && b.scalar_type() == at::kHalf && b.numel() == 256);
  auto c = at::empty({16, 16}, a.options().dtype(at::kFloat));
  const auto* pa = reinterpret_cast<const __half*>(a.data_ptr<at::Half>()) + a_offset;
  wmma_kernel<<<1, 32, 0, stream()>>>(pa, reinterpret_cast<const __half*>(b.data_ptr<at::Half>()), c.data_ptr<float>(),
                                      static_cast<int>(lda));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

// out: [64]
void run_fault(at::Tensor& out, c10::string_view which) {
  check_out(out, 1);
  int* o = out.data_ptr<int>();
  const std::string w(which);
  if (w == "exit_before_barrier") {
    exit_before_barrier_kernel<<<1, 64, 0, stream()>>>();
  } else if (w == "divergent_barrier") {
    divergent_barrier_kernel<<<1, 64, 0, stream()>>>();
  } else if (w == "exited_lane") {
    exited_lane_kernel<<<1, 32, 0, stream()>>>(o);
  } else if (w == "deadlock") {
    deadlock_kernel<<<1, 32, 0, stream()>>>();
  } else if (w == "lane_not_in_mask") {
    lane_not_in_mask_kernel<<<1, 32, 0, stream()>>>(o);
  } else if (w == "shuffle_outside_mask") {
    shuffle_outside_mask_kernel<<<1, 32, 0, stream()>>>(o);
  } else if (w == "trap") {
    trap_kernel<<<1, 32, 0, stream()>>>();
  } else if (w == "kernel_assert") {
    kernel_assert_kernel<<<1, 32, 0, stream()>>>();
  } else if (w == "too_much_shared") {
    too_much_shared_kernel<<<1, 32, 10000, stream()>>>(o);
  } else {
    TORCH_CHECK(false, "unknown fault ", std::string(which));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 2048 threads a block: an invalid configuration, reported by cudaGetLastError() only.
void bad_launch(at::Tensor& out, bool check) {
  empty_kernel<<<1, 2048, 0, stream()>>>();
  if (check) C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY(emu_selftest, m) {
  m.def("order(Tensor(a!) out) -> ()");
  m.def("uninitialized_shared(Tensor(a!) out) -> ()");
  m.def("warp_ops(Tensor(a!) out) -> ()");
  m.def("block_collectives(Tensor x) -> Tensor");
  m.def("scan_storage_reuse(Tensor x) -> Tensor");
  m.def("device_scan(Tensor x) -> Tensor");
  m.def("wmma_product(Tensor a, Tensor b, int lda, int a_offset) -> Tensor");
  m.def("fault(Tensor(a!) out, str which) -> ()");
  m.def("bad_launch(Tensor(a!) out, bool check) -> ()");
}

TORCH_LIBRARY_IMPL(emu_selftest, CUDA, m) {
  m.impl("order", &order);
  m.impl("uninitialized_shared", &uninitialized_shared);
  m.impl("warp_ops", &warp_ops);
  m.impl("block_collectives", &block_collectives);
  m.impl("scan_storage_reuse", &scan_storage_reuse);
  m.impl("device_scan", &device_scan);
  m.impl("wmma_product", &wmma_product);
  m.impl("fault", &run_fault);
  m.impl("bad_launch", &bad_launch);
}
