// Top-k magnitude selection on the GPU: radix select over order-preserving keys,
// computed on the fly from the tensors in place.
//
// Global top-k: three histogram passes over 11, 11 and 10 key bits (2048 bins fit a
// shared-memory sub-histogram per block), each followed by a one-block select kernel
// that picks the bucket on the device and narrows the key prefix in a small device
// state, so the passes need no host round trip. The one host sync is reading the
// NaN/Inf flag after the first pass, so that the error comes before any output exists.
// Then a mask pass (keys > threshold, per-block tie counts), an exclusive scan of the
// tie counts, and a fix-up that gives ties their rank in flat order inside the few
// blocks that hold ties to keep: four passes over the weights in the usual case.
//
// Work is split over mask bytes: byte g of the concatenated masks covers up to 8
// elements of one row, so no two threads ever write the same byte, and the byte order
// is the flat element order (list order, then row-major) that tie ranks follow.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/cub.cuh>

#include <limits>

#include "topk.h"

namespace sparsebert::topk {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 4;
constexpr int kTileBytes = kThreads * kBytesPerThread;  // mask bytes per block: 8192 elements
constexpr int kSelectThreads = 1024;
constexpr int kSelectItems = 2;                         // bins per thread in the select kernel
constexpr int kPassBits[3] = {11, 11, 10};
constexpr int kMaxSharedDigitBits = 12;                 // 16 KiB of shared uint32 counters

// One row of the device table per input tensor (int64 fields).
enum Field { kData, kMask, kCols, kPackedCols, kByteBegin, kBytes, kFields };

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Where global mask byte g lives: tensor entry, row and first column.
struct ByteRef {
  const int64_t* entry;
  int64_t row, col0;
  int width;  // elements covered by the byte, 1..8
};

// Finds the tensor of global mask byte g. A thread's bytes nearly always fall in the tensor
// of its previous byte, so that one is tried before a binary search over the table.
struct Locator {
  const int64_t* table;
  int n;
  int last = 0;

  __device__ __forceinline__ Locator(const int64_t* table_, int n_) : table(table_), n(n_) {}

  __device__ __forceinline__ ByteRef operator()(int64_t g) {
    const int64_t* e = table + last * kFields;
    if (g < e[kByteBegin] || g >= e[kByteBegin] + e[kBytes]) {
      // The last tensor whose first byte is <= g; empty tensors share their begin with the
      // next one, so the last match is the one that holds the byte.
      int lo = 0, hi = n - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (table[mid * kFields + kByteBegin] <= g) lo = mid; else hi = mid - 1;
      }
      last = lo;
      e = table + lo * kFields;
    }
    const int64_t local = g - e[kByteBegin], pc = e[kPackedCols], cols = e[kCols];
    ByteRef r;
    r.entry = e;
    r.row = local / pc;
    r.col0 = (local % pc) * 8;
    r.width = static_cast<int>(imin(8, cols - r.col0));
    return r;
  }
};

template <typename scalar_t>
__device__ __forceinline__ uint32_t raw_bits_at(const ByteRef& r, int j) {
  const scalar_t* x = reinterpret_cast<const scalar_t*>(r.entry[kData]);
  return float_bits(static_cast<float>(x[r.row * r.entry[kCols] + r.col0 + j]));
}

template <typename scalar_t>
__device__ __forceinline__ uint32_t key_at(const ByteRef& r, int j, bool use_abs) {
  return bits_to_key(abs_bits(raw_bits_at<scalar_t>(r, j), use_abs));
}

__device__ __forceinline__ uint8_t* mask_byte(const ByteRef& r) {
  return reinterpret_cast<uint8_t*>(r.entry[kMask]) + r.row * r.entry[kPackedCols] + r.col0 / 8;
}

// Histogram pass. state (device, nullable) = {prefix bits selected so far, ...}: when set, the
// prefix to match comes from it instead of d.prefix_value.
template <typename scalar_t, bool kShared>
__global__ void histogram_kernel(const int64_t* table, int n, int64_t total_bytes, bool use_abs, Digit d,
                                 const int64_t* state, unsigned long long* hist, int* bad) {
  extern __shared__ uint32_t shared_hist[];
  const uint32_t bins = d.digit_mask + 1;
  if (kShared) {
    for (uint32_t b = threadIdx.x; b < bins; b += blockDim.x) shared_hist[b] = 0;
    __syncthreads();
  }
  const uint32_t prefix = state ? static_cast<uint32_t>(state[0]) & d.prefix_mask : d.prefix_value;
  Locator locate(table, n);
  uint32_t local_bad = 0;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kTileBytes;
  for (int i = 0; i < kBytesPerThread; ++i) {
    const int64_t g = tile + i * kThreads + threadIdx.x;  // strided: neighbours read neighbouring bytes
    if (g >= total_bytes) break;
    const ByteRef r = locate(g);
    for (int j = 0; j < r.width; ++j) {
      const uint32_t bits = raw_bits_at<scalar_t>(r, j);
      local_bad |= bits_non_finite(bits);
      const uint32_t key = bits_to_key(abs_bits(bits, use_abs));
      if ((key & d.prefix_mask) == prefix) {
        if (kShared) {
          atomicAdd(&shared_hist[d.bin(key)], 1u);
        } else {
          atomicAdd(&hist[d.bin(key)], 1ull);
        }
      }
    }
  }
  if (local_bad) atomicOr(bad, 1);
  if (kShared) {
    __syncthreads();
    for (uint32_t b = threadIdx.x; b < bins; b += blockDim.x) {
      if (shared_hist[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(shared_hist[b]));
    }
  }
}

// One block: find the bucket of the state[1]-th largest key (1-based) in hist, append its
// digit to the prefix in state[0] and make state[1] the rank inside the bucket. After the
// last pass state = {threshold key, ties to keep}, and threshold_out (nullable) gets the value.
__global__ void select_kernel(const unsigned long long* hist, int digit_bits, int shift, int64_t* state,
                              float* threshold_out) {
  using Scan = cub::BlockScan<int64_t, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int bins = 1 << digit_bits;
  const int64_t k = state[1];
  // Position p counts bins from the top: bin = bins - 1 - p.
  int64_t counts[kSelectItems], above_incl[kSelectItems];
  for (int i = 0; i < kSelectItems; ++i) {
    const int p = threadIdx.x * kSelectItems + i;
    counts[i] = p < bins ? static_cast<int64_t>(hist[bins - 1 - p]) : 0;
  }
  Scan(scan_storage).InclusiveSum(counts, above_incl);
  __syncthreads();  // every thread has read state[1] before it is overwritten
  for (int i = 0; i < kSelectItems; ++i) {
    const int p = threadIdx.x * kSelectItems + i;
    // Exactly one position has above_excl < k <= above_incl (k >= 1 and k <= total).
    if (p < bins && above_incl[i] >= k && above_incl[i] - counts[i] < k) {
      const uint32_t prefix = static_cast<uint32_t>(state[0]) | (static_cast<uint32_t>(bins - 1 - p) << shift);
      state[0] = prefix;
      state[1] = k - (above_incl[i] - counts[i]);
      if (threshold_out) *threshold_out = key_to_float(prefix);
    }
  }
}

// Mask bytes of the keys > state[0]; per-block counts of keys == state[0].
template <typename scalar_t>
__global__ void mask_kernel(const int64_t* table, int n, int64_t total_bytes, bool use_abs, const int64_t* state,
                            int64_t* block_ties) {
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const uint32_t threshold = static_cast<uint32_t>(state[0]);
  Locator locate(table, n);
  int64_t ties = 0;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kTileBytes;
  for (int i = 0; i < kBytesPerThread; ++i) {
    const int64_t g = tile + i * kThreads + threadIdx.x;
    if (g >= total_bytes) break;
    const ByteRef r = locate(g);
    uint32_t byte = 0;
    for (int j = 0; j < r.width; ++j) {
      const uint32_t key = key_at<scalar_t>(r, j, use_abs);
      byte |= static_cast<uint32_t>(key > threshold) << j;
      ties += key == threshold;
    }
    *mask_byte(r) = static_cast<uint8_t>(byte);
  }
  const int64_t total = Reduce(reduce_storage).Sum(ties);
  if (threadIdx.x == 0) block_ties[blockIdx.x] = total;
}

// Sets the bits of the ties whose flat rank is < state[1]. Threads take contiguous bytes
// here, so a block scan of per-thread tie counts gives ranks in flat order.
template <typename scalar_t>
__global__ void tie_fixup_kernel(const int64_t* table, int n, int64_t total_bytes, bool use_abs, const int64_t* state,
                                 const int64_t* block_ties, const int64_t* ties_before) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const uint32_t threshold = static_cast<uint32_t>(state[0]);
  const int64_t keep = state[1];
  // Uniform over the block: the blocks without ties to keep leave at once.
  if (block_ties[blockIdx.x] == 0 || ties_before[blockIdx.x] >= keep) return;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTileBytes + threadIdx.x * kBytesPerThread;
  Locator locate(table, n);
  int64_t mine = 0;
  for (int i = 0; i < kBytesPerThread && first + i < total_bytes; ++i) {
    const ByteRef r = locate(first + i);
    for (int j = 0; j < r.width; ++j) mine += key_at<scalar_t>(r, j, use_abs) == threshold;
  }
  int64_t rank;
  Scan(scan_storage).ExclusiveSum(mine, rank);
  rank += ties_before[blockIdx.x];
  for (int i = 0; i < kBytesPerThread && first + i < total_bytes && rank < keep; ++i) {
    const ByteRef r = locate(first + i);
    uint32_t add = 0;
    for (int j = 0; j < r.width; ++j) {
      if (key_at<scalar_t>(r, j, use_abs) == threshold) {
        add |= static_cast<uint32_t>(rank < keep) << j;
        ++rank;
      }
    }
    if (add) *mask_byte(r) |= static_cast<uint8_t>(add);
  }
}

template <typename scalar_t>
__global__ void check_finite_kernel(const int64_t* table, int n, int64_t total_bytes, int* bad) {
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kTileBytes;
  Locator locate(table, n);
  uint32_t local_bad = 0;
  for (int i = 0; i < kBytesPerThread; ++i) {
    const int64_t g = tile + i * kThreads + threadIdx.x;
    if (g >= total_bytes) break;
    const ByteRef r = locate(g);
    for (int j = 0; j < r.width; ++j) local_bad |= bits_non_finite(raw_bits_at<scalar_t>(r, j));
  }
  if (local_bad) atomicOr(bad, 1);
}

// One block per row: four 8-bit radix passes over the row's keys (re-read from L2), then
// each thread writes a contiguous run of the row's mask bytes with tie ranks from a block scan.
template <typename scalar_t>
__global__ void rows_kernel(const scalar_t* x, uint8_t* mask, int64_t cols, int64_t pc, int64_t k, bool use_abs) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_rank;
  const scalar_t* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  uint8_t* out = mask + static_cast<int64_t>(blockIdx.x) * pc;
  auto key = [&](int64_t c) { return bits_to_key(abs_bits(float_bits(static_cast<float>(row[c])), use_abs)); };
  if (threadIdx.x == 0) {
    s_prefix = 0;
    s_rank = k;
  }
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    const uint32_t prefix_mask = pass == 0 ? 0u : ~0u << (32 - 8 * pass);
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const uint32_t kc = key(c);
      if ((kc & prefix_mask) == prefix) atomicAdd(&hist[(kc >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      for (int b = 255; b >= 0; --b) {
        if (above + hist[b] >= s_rank) {
          s_prefix = prefix | (static_cast<uint32_t>(b) << shift);
          s_rank -= above;
          break;
        }
        above += hist[b];
      }
    }
    __syncthreads();
  }
  const uint32_t threshold = s_prefix;
  const int64_t keep = s_rank;
  const int64_t per = (pc + blockDim.x - 1) / blockDim.x;
  const int64_t b0 = imin(pc, threadIdx.x * per), b1 = imin(pc, b0 + per);
  int64_t mine = 0;
  for (int64_t c = b0 * 8; c < imin(cols, b1 * 8); ++c) mine += key(c) == threshold;
  int64_t rank;
  Scan(scan_storage).ExclusiveSum(mine, rank);
  for (int64_t b = b0; b < b1; ++b) {
    uint32_t byte = 0;
    for (int64_t c = b * 8; c < imin(cols, b * 8 + 8); ++c) {
      const uint32_t kc = key(c);
      const bool tie = kc == threshold;
      byte |= static_cast<uint32_t>(kc > threshold || (tie && rank < keep)) << (c - b * 8);
      rank += tie;
    }
    out[b] = static_cast<uint8_t>(byte);
  }
}

// One thread per mask byte: an element is kept when fewer than n elements of its group of m
// rank before it (larger, or equal at a lower index).
template <typename scalar_t>
__global__ void nm_kernel(const scalar_t* x, uint8_t* mask, int64_t rows, int64_t cols, int64_t pc, int64_t n,
                          int64_t m, bool use_abs) {
  const int64_t total = rows * pc;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = g / pc, c0 = (g % pc) * 8;
    const scalar_t* r = x + row * cols;
    auto key = [&](int64_t c) { return bits_to_key(abs_bits(float_bits(static_cast<float>(r[c])), use_abs)); };
    uint32_t byte = 0;
    for (int64_t c = c0; c < imin(cols, c0 + 8); ++c) {
      const uint32_t kc = key(c);
      const int64_t start = c - c % m;
      int64_t rank = 0;
      for (int64_t j = start; j < start + m; ++j) {
        const uint32_t kj = key(j);
        rank += kj > kc || (kj == kc && j < c);
      }
      byte |= static_cast<uint32_t>(rank < n) << (c - c0);
    }
    mask[g] = static_cast<uint8_t>(byte);
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

struct DeviceTable {
  std::vector<at::Tensor> xs;  // contiguous inputs, kept alive while kernels run
  at::Tensor table;            // int64 [n, kFields] on the device
  int64_t total_bytes = 0;
  int64_t tiles = 0;
  int n = 0;
};

// Small int64 host data to the device without a host sync: staged in pinned memory (the
// caching host allocator keeps it until the copy has run) and copied on the current stream.
at::Tensor pinned_longs(at::IntArrayRef sizes) {
  return at::empty(sizes, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
}

DeviceTable make_table(at::TensorList inputs, const std::vector<at::Tensor>* masks) {
  DeviceTable t;
  t.n = static_cast<int>(inputs.size());
  auto host = pinned_longs({t.n, kFields});
  int64_t* h = host.data_ptr<int64_t>();
  for (int i = 0; i < t.n; ++i) {
    t.xs.push_back(inputs[i].contiguous());
    const int64_t cols = inputs[i].size(-1), pc = packed_cols(cols);
    const int64_t bytes = cols == 0 ? 0 : inputs[i].numel() / cols * pc;
    int64_t* e = h + i * kFields;
    e[kData] = reinterpret_cast<int64_t>(t.xs[i].data_ptr());
    e[kMask] = masks ? reinterpret_cast<int64_t>((*masks)[i].data_ptr()) : 0;
    e[kCols] = cols;
    e[kPackedCols] = pc;
    e[kByteBegin] = t.total_bytes;
    e[kBytes] = bytes;
    t.total_bytes += bytes;
  }
  t.table = host.to(inputs[0].device(), at::kLong, /*non_blocking=*/true);
  t.tiles = (t.total_bytes + kTileBytes - 1) / kTileBytes;
  return t;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

at::Tensor new_flag(const at::Tensor& like) { return at::zeros({1}, like.options().dtype(at::kInt)); }

void raise_if_flagged(const at::Tensor& flag, const char* op) {
  if (flag.item<int>() != 0) fail_non_finite(op);  // the one host sync of each op (reads the flag)
}

void check_finite(const DeviceTable& t, at::ScalarType dtype, const char* op) {
  if (t.tiles == 0) return;
  auto flag = new_flag(t.table);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "topk_check_finite", [&] {
    check_finite_kernel<scalar_t><<<static_cast<unsigned>(t.tiles), kThreads, 0, stream()>>>(t.table.data_ptr<int64_t>(), t.n, t.total_bytes,
                                                                       flag.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_if_flagged(flag, op);
}

// hist (int64 [2**digit_bits], zeroed) += histogram; flag set on NaN/Inf.
void launch_histogram(const DeviceTable& t, at::ScalarType dtype, bool use_abs, Digit d, int digit_bits,
                      const int64_t* state, at::Tensor& hist, at::Tensor& flag) {
  if (t.tiles == 0) return;
  auto* h = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "topk_histogram", [&] {
    if (digit_bits <= kMaxSharedDigitBits) {
      const size_t shared = (size_t{1} << digit_bits) * sizeof(uint32_t);
      histogram_kernel<scalar_t, true><<<static_cast<unsigned>(t.tiles), kThreads, shared, stream()>>>(
          t.table.data_ptr<int64_t>(), t.n, t.total_bytes, use_abs, d, state, h, flag.data_ptr<int>());
    } else {
      histogram_kernel<scalar_t, false><<<static_cast<unsigned>(t.tiles), kThreads, 0, stream()>>>(
          t.table.data_ptr<int64_t>(), t.n, t.total_bytes, use_abs, d, state, h, flag.data_ptr<int>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Masks from state = {threshold key, ties to keep} on the device.
void launch_masks(const DeviceTable& t, at::ScalarType dtype, bool use_abs, const at::Tensor& state) {
  if (t.tiles == 0) return;
  const auto long_options = t.table.options().dtype(at::kLong);
  auto block_ties = at::empty({t.tiles}, long_options);
  auto ties_before = at::empty({t.tiles}, long_options);
  const int64_t* table = t.table.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "topk_mask_pass", [&] {
    mask_kernel<scalar_t><<<static_cast<unsigned>(t.tiles), kThreads, 0, stream()>>>(table, t.n, t.total_bytes, use_abs,
                                                              state.data_ptr<int64_t>(), block_ties.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  size_t temp_bytes = 0;
  const int tiles = static_cast<int>(t.tiles);
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, block_ties.data_ptr<int64_t>(),
                                               ties_before.data_ptr<int64_t>(), tiles, stream()));
  auto temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))}, t.table.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.data_ptr(), temp_bytes, block_ties.data_ptr<int64_t>(),
                                               ties_before.data_ptr<int64_t>(), tiles, stream()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "topk_tie_fixup", [&] {
    tie_fixup_kernel<scalar_t><<<static_cast<unsigned>(t.tiles), kThreads, 0, stream()>>>(table, t.n, t.total_bytes, use_abs,
                                                                   state.data_ptr<int64_t>(), block_ties.data_ptr<int64_t>(),
                                                                   ties_before.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor device_state(int64_t a, int64_t b, const at::Tensor& like) {
  auto host = pinned_longs({2});
  host.data_ptr<int64_t>()[0] = a;
  host.data_ptr<int64_t>()[1] = b;
  return host.to(like.device(), at::kLong, /*non_blocking=*/true);
}

// ---------------------------------------------------------------------------------------
// Ops.

at::Tensor topk_histogram_cuda(at::TensorList xs, bool use_abs, int64_t prefix, int64_t prefix_bits, int64_t digit_bits) {
  check_inputs(xs, "topk_histogram");
  check_histogram_args(prefix, prefix_bits, digit_bits);
  c10::cuda::CUDAGuard guard(xs[0].device());
  const DeviceTable t = make_table(xs, nullptr);
  auto hist = at::zeros({int64_t{1} << digit_bits}, xs[0].options().dtype(at::kLong));
  auto flag = new_flag(hist);
  launch_histogram(t, xs[0].scalar_type(), use_abs,
                   Digit::make(static_cast<uint32_t>(prefix), static_cast<int>(prefix_bits), static_cast<int>(digit_bits)),
                   static_cast<int>(digit_bits), nullptr, hist, flag);
  raise_if_flagged(flag, "topk_histogram");
  return hist;
}

std::vector<at::Tensor> topk_mask_from_threshold_cuda(at::TensorList xs, bool use_abs, int64_t threshold_key,
                                                      int64_t ties_to_keep) {
  check_inputs(xs, "topk_mask_from_threshold");
  TORCH_CHECK(threshold_key >= 0 && threshold_key <= 0xFFFFFFFFll,
              "topk_mask_from_threshold: threshold_key must be a 32-bit key in [0, 2**32), got ", threshold_key);
  TORCH_CHECK(ties_to_keep >= 0, "topk_mask_from_threshold: ties_to_keep must be >= 0, got ", ties_to_keep);
  c10::cuda::CUDAGuard guard(xs[0].device());
  {
    const DeviceTable check = make_table(xs, nullptr);
    check_finite(check, xs[0].scalar_type(), "topk_mask_from_threshold");
  }
  auto masks = new_masks(xs, /*zeroed=*/false);
  const DeviceTable t = make_table(xs, &masks);
  launch_masks(t, xs[0].scalar_type(), use_abs, device_state(threshold_key, ties_to_keep, xs[0]));
  return masks;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> topk_mask_cuda(at::TensorList xs, int64_t k, bool use_abs) {
  check_inputs(xs, "topk_mask");
  const int64_t n = total_numel(xs);
  TORCH_CHECK(k >= 0 && k <= n, "topk_mask: k must be in [0, N] with N = ", n, " elements in all xs, got k = ", k);
  c10::cuda::CUDAGuard guard(xs[0].device());
  const auto dtype = xs[0].scalar_type();
  auto masks = new_masks(xs, /*zeroed=*/k == 0);
  const DeviceTable t = make_table(xs, &masks);
  auto threshold = at::scalar_tensor(std::numeric_limits<float>::infinity(), xs[0].options().dtype(at::kFloat));
  auto state = device_state(0, k, xs[0]);
  auto flag = new_flag(threshold);
  int prefix_bits = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const int bits = kPassBits[pass];
    auto hist = at::zeros({int64_t{1} << bits}, xs[0].options().dtype(at::kLong));
    launch_histogram(t, dtype, use_abs, Digit::make(0, prefix_bits, bits), bits, state.data_ptr<int64_t>(), hist, flag);
    if (pass == 0) {
      raise_if_flagged(flag, "topk_mask");
      if (k == 0) return {masks, threshold};
    }
    select_kernel<<<1, kSelectThreads, 0, stream()>>>(
        reinterpret_cast<const unsigned long long*>(hist.data_ptr<int64_t>()), bits, 32 - prefix_bits - bits,
        state.data_ptr<int64_t>(), pass == 2 ? threshold.data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    prefix_bits += bits;
  }
  launch_masks(t, dtype, use_abs, state);
  return {masks, threshold};
}

at::Tensor topk_mask_rows_cuda(const at::Tensor& x, int64_t k, bool use_abs) {
  check_inputs({x}, "topk_mask_rows");
  TORCH_CHECK(k >= 0 && k <= x.size(-1), "topk_mask_rows: k must be in [0, ", x.size(-1),
              "] (the last dimension), got ", k);
  c10::cuda::CUDAGuard guard(x.device());
  const DeviceTable t = make_table({x}, nullptr);
  check_finite(t, x.scalar_type(), "topk_mask_rows");
  auto mask = new_masks({x}, /*zeroed=*/k == 0)[0];
  const int64_t cols = x.size(-1), rows = cols == 0 ? 0 : x.numel() / cols;
  if (rows == 0 || k == 0) return mask;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "topk_mask_rows: at most 2**31 - 1 rows, got ", rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "topk_mask_rows", [&] {
    rows_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream()>>>(
        t.xs[0].data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), cols, packed_cols(cols), k, use_abs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mask;
}

at::Tensor nm_mask_cuda(const at::Tensor& x, int64_t n, int64_t m, bool use_abs) {
  check_inputs({x}, "nm_mask");
  TORCH_CHECK(m >= 1, "nm_mask: m must be >= 1, got ", m);
  TORCH_CHECK(n >= 0 && n <= m, "nm_mask: n must be in [0, m] = [0, ", m, "], got ", n);
  TORCH_CHECK(x.size(-1) % m == 0, "nm_mask: the last dimension (", x.size(-1), ") must be divisible by m = ", m);
  c10::cuda::CUDAGuard guard(x.device());
  const DeviceTable t = make_table({x}, nullptr);
  check_finite(t, x.scalar_type(), "nm_mask");
  auto mask = new_masks({x}, /*zeroed=*/false)[0];
  const int64_t cols = x.size(-1), rows = cols == 0 ? 0 : x.numel() / cols;
  const int64_t bytes = rows * packed_cols(cols);
  if (bytes == 0) return mask;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((bytes + kThreads - 1) / kThreads, 65535 * 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nm_mask", [&] {
    nm_kernel<scalar_t><<<blocks, kThreads, 0, stream()>>>(t.xs[0].data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), rows,
                                                           cols, packed_cols(cols), n, m, use_abs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mask;
}

}  // namespace
}  // namespace sparsebert::topk

TORCH_LIBRARY_IMPL(sparsebert, CUDA, m) {
  using namespace sparsebert::topk;
  m.impl("topk_histogram", &topk_histogram_cuda);
  m.impl("topk_mask_from_threshold", &topk_mask_from_threshold_cuda);
  m.impl("topk_mask", &topk_mask_cuda);
  m.impl("topk_mask_rows", &topk_mask_rows_cuda);
  m.impl("nm_mask", &nm_mask_cuda);
}
