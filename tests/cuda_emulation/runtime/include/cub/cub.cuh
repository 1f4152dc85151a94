#pragma once
// The parts of CUB the kernels use, with CUB's contracts: block collectives need the whole block
// (of the size given as template argument) and end without a barrier, so reusing their
// TempStorage needs a __syncthreads() in between, as in CUB; BlockReduce's result is valid in
// thread 0 only (other threads get their partial sums, as from CUB's warp reductions).
// Every algorithm variant runs the warp-scan / warp-reduction algorithm (CUB's
// BLOCK_SCAN_WARP_SCANS / BLOCK_REDUCE_WARP_REDUCTIONS), through the emulated shuffles.
#include <cuda_runtime.h>

#include <cstring>
#include <string>

namespace cub {

enum BlockScanAlgorithm { BLOCK_SCAN_RAKING, BLOCK_SCAN_RAKING_MEMOIZE, BLOCK_SCAN_WARP_SCANS };
enum BlockReduceAlgorithm { BLOCK_REDUCE_RAKING_COMMUTATIVE_ONLY, BLOCK_REDUCE_RAKING, BLOCK_REDUCE_WARP_REDUCTIONS };

namespace detail {

constexpr unsigned kFullWarp = 0xffffffffu;

inline void check_block(const char* what, int threads, emu::Loc loc) {
  const dim3& b = blockDim;
  if (static_cast<int>(b.x * b.y * b.z) != threads) {
    emu::fault(std::string(what) + " is declared for " + std::to_string(threads) + " threads but the block has " +
                   std::to_string(b.x * b.y * b.z),
               loc);
  }
}

// The shared memory of both block collectives: one aggregate per warp.
template <typename T, int THREADS>
class WarpAggregates {
 protected:
  static constexpr int kThreads = THREADS;
  static constexpr int kWarps = THREADS / 32;
  static_assert(THREADS % 32 == 0, "the emulated cub block collectives take whole warps");

 public:
  struct TempStorage {
    T warp_aggregates[kWarps];
  };
  explicit WarpAggregates(TempStorage& storage) : storage_(storage) {}

 protected:
  TempStorage& storage_;
};

}  // namespace detail

template <typename T, int BLOCK_DIM_X, BlockScanAlgorithm ALGORITHM = BLOCK_SCAN_RAKING, int BLOCK_DIM_Y = 1,
          int BLOCK_DIM_Z = 1>
class BlockScan : public detail::WarpAggregates<T, BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z> {
  using Base = detail::WarpAggregates<T, BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z>;

 public:
  using Base::Base;

  void ExclusiveSum(T input, T& output, emu::Loc loc = emu::Loc::current()) {
    T aggregate;
    scan(input, output, aggregate, loc);
  }
  void ExclusiveSum(T input, T& output, T& block_aggregate, emu::Loc loc = emu::Loc::current()) {
    scan(input, output, block_aggregate, loc);
  }
  void InclusiveSum(T input, T& output, emu::Loc loc = emu::Loc::current()) {
    T aggregate;
    scan(input, output, aggregate, loc);
    output = output + input;
  }
  template <int ITEMS>
  void ExclusiveSum(T (&input)[ITEMS], T (&output)[ITEMS], emu::Loc loc = emu::Loc::current()) {
    T prefix;
    scan(thread_total(input), prefix, loc);
    for (int i = 0; i < ITEMS; ++i) {
      output[i] = prefix;
      prefix = prefix + input[i];
    }
  }
  template <int ITEMS>
  void InclusiveSum(T (&input)[ITEMS], T (&output)[ITEMS], emu::Loc loc = emu::Loc::current()) {
    T prefix;
    scan(thread_total(input), prefix, loc);
    for (int i = 0; i < ITEMS; ++i) {
      prefix = prefix + input[i];
      output[i] = prefix;
    }
  }

 private:
  template <int ITEMS>
  static T thread_total(const T (&input)[ITEMS]) {
    T total = input[0];
    for (int i = 1; i < ITEMS; ++i) total = total + input[i];
    return total;
  }

  void scan(T input, T& exclusive, emu::Loc loc) {
    T aggregate;
    scan(input, exclusive, aggregate, loc);
  }

  // Inclusive warp scan by shuffles, warp totals through shared memory, one barrier.
  void scan(T input, T& exclusive, T& block_aggregate, emu::Loc loc) {
    detail::check_block("cub::BlockScan", Base::kThreads, loc);
    const int tid = emu::linear_thread(), lane = tid % 32, warp = tid / 32;
    T inclusive = input;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const T up = __shfl_up_sync(detail::kFullWarp, inclusive, offset, 32, loc);
      if (lane >= offset) inclusive = inclusive + up;
    }
    T before_lane = __shfl_up_sync(detail::kFullWarp, inclusive, 1, 32, loc);
    if (lane == 0) before_lane = T(0);
    if (lane == 31) this->storage_.warp_aggregates[warp] = inclusive;
    __syncthreads(loc);
    T before_warp = T(0), total = T(0);
    for (int w = 0; w < Base::kWarps; ++w) {
      const T a = this->storage_.warp_aggregates[w];
      if (w < warp) before_warp = before_warp + a;
      total = total + a;
    }
    exclusive = before_warp + before_lane;
    block_aggregate = total;
  }
};

template <typename T, int BLOCK_DIM_X, BlockReduceAlgorithm ALGORITHM = BLOCK_REDUCE_WARP_REDUCTIONS,
          int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1>
class BlockReduce : public detail::WarpAggregates<T, BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z> {
  using Base = detail::WarpAggregates<T, BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z>;

 public:
  using Base::Base;

  // The block's sum in thread 0.
  T Sum(T input, emu::Loc loc = emu::Loc::current()) {
    return Reduce(input, [](const T& a, const T& b) { return a + b; }, loc);
  }

  template <class Op>
  T Reduce(T input, Op op, emu::Loc loc = emu::Loc::current()) {
    detail::check_block("cub::BlockReduce", Base::kThreads, loc);
    const int tid = emu::linear_thread(), lane = tid % 32, warp = tid / 32;
    T partial = input;
    for (int offset = 16; offset > 0; offset >>= 1) {
      const T down = __shfl_down_sync(detail::kFullWarp, partial, offset, 32, loc);
      if (lane + offset < 32) partial = op(partial, down);
    }
    if (lane == 0) this->storage_.warp_aggregates[warp] = partial;
    __syncthreads(loc);
    if (tid == 0) {
      for (int w = 1; w < Base::kWarps; ++w) partial = op(partial, this->storage_.warp_aggregates[w]);
    }
    return partial;
  }
};

// Device-wide scans run as one host loop over the (host) memory. The temporary storage protocol is
// CUDA's: a first call with d_temp_storage == nullptr asks for its size; the storage is then
// overwritten in full, so a buffer smaller than asked for shows under AddressSanitizer.
struct DeviceScan {
  template <typename In, typename Out, typename NumItems>
  static cudaError_t ExclusiveSum(void* d_temp_storage, size_t& temp_storage_bytes, In d_in, Out d_out,
                                  NumItems num_items, cudaStream_t stream = nullptr) {
    return scan(d_temp_storage, temp_storage_bytes, d_in, d_out, num_items, /*inclusive=*/false);
  }
  template <typename In, typename Out, typename NumItems>
  static cudaError_t InclusiveSum(void* d_temp_storage, size_t& temp_storage_bytes, In d_in, Out d_out,
                                  NumItems num_items, cudaStream_t stream = nullptr) {
    return scan(d_temp_storage, temp_storage_bytes, d_in, d_out, num_items, /*inclusive=*/true);
  }

 private:
  static constexpr size_t kTempBytes = 256;

  template <typename In, typename Out, typename NumItems>
  static cudaError_t scan(void* temp, size_t& temp_bytes, In in, Out out, NumItems num_items, bool inclusive) {
    if (temp == nullptr) {
      temp_bytes = kTempBytes;
      return cudaSuccess;
    }
    if (temp_bytes < kTempBytes || num_items < 0) return cudaErrorInvalidValue;
    std::memset(temp, 0xA5, kTempBytes);
    using T = std::remove_cv_t<std::remove_reference_t<decltype(*out)>>;
    T running = T(0);
    for (NumItems i = 0; i < num_items; ++i) {
      const T x = in[i];  // read before the write: in and out may be the same array
      if (inclusive) running = running + x;
      out[i] = running;
      if (!inclusive) running = running + x;
    }
    return cudaSuccess;
  }
};

}  // namespace cub
