// CPU kernels of masked_adamw_ and masked_sgd_.
//
// Every tensor is cut into chunks of kChunkElems elements; the chunks of all tensors form one
// flat work list that the threads of at::parallel_for take from a shared counter. Up to three
// read-only passes come before any write: the NaN/Inf check of the gradients (check_finite),
// the popcount of every chunk of a mask (compact mode: the state offset of each chunk, and the
// state lengths to check), then the update pass. Dense-state chunks run a vectorized loop
// (masked ones then zero their pruned elements); compact chunks compact their kept weights
// into buffers and run the same loop on those.

// No fused multiply-adds: every operation rounds as in torch's own kernels, and the compact
// and dense loops (vectorized differently) agree bit for bit.
#pragma GCC optimize("fp-contract=off")

#include "masked_optim.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSEBERT_X86 1
// The update loops are compiled for each ISA and picked at load time.
#define SPARSEBERT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPARSEBERT_X86 0
#define SPARSEBERT_CLONES
#endif

namespace sparsebert::optim {
namespace {

constexpr int64_t kTile = 256;  // elements whose lane masks are expanded at a time (a stack buffer)

// Lane masks: the mask bits of a tile expanded to one all-ones (kept) or all-zeros (pruned)
// word per element, as wide as the element, so that keeping or zeroing a value is a bitwise AND.
// They are read from a table rather than computed from the bits: GCC recognizes a computed
// 0/-1 mask as a select, sinks the update into a branch under it and, floating point being
// allowed to trap, then does not vectorize the loop.
template <typename T>
using LaneBits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

template <typename Bits>
constexpr std::array<std::array<Bits, 8>, 256> make_lane_masks() {
  std::array<std::array<Bits, 8>, 256> table{};
  for (int b = 0; b < 256; ++b) {
    for (int k = 0; k < 8; ++k) table[b][k] = ((b >> k) & 1) ? ~Bits(0) : Bits(0);
  }
  return table;
}
template <typename Bits>
constexpr std::array<std::array<Bits, 8>, 256> kLaneMasks = make_lane_masks<Bits>();

// The lane masks of bits [c0, c0 + n) of a mask row, n <= kTile; `buf` holds kTile + 8
// words. The returned pointer is element c0.
template <typename Bits>
const Bits* expand_bits(const uint8_t* mask_row, int64_t c0, int64_t n, Bits* buf) {
  const uint8_t* bytes = mask_row + (c0 >> 3);
  const int64_t skip = c0 & 7;
  const int64_t count = (skip + n + 7) >> 3;
  for (int64_t b = 0; b < count; ++b) std::memcpy(buf + 8 * b, kLaneMasks<Bits>[bytes[b]].data(), 8 * sizeof(Bits));
  return buf + skip;
}

template <typename T>
T and_bits(T value, LaneBits<T> mask) {
  LaneBits<T> bits;
  std::memcpy(&bits, &value, sizeof(T));
  bits &= mask;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// Number of set bits among bits [c0, c0 + n) of a mask row.
#if SPARSEBERT_X86
__attribute__((target_clones("popcnt", "default")))  // else std::popcount is a libgcc call
#endif
int64_t count_bits(const uint8_t* mask_row, int64_t c0, int64_t n) {
  int64_t total = 0;
  int64_t j = c0;
  const int64_t stop = c0 + n;
  while (j < stop && (j & 63) != 0) {  // to a 64-element (8-byte) boundary
    const int64_t span = std::min<int64_t>(8 - (j & 7), stop - j);
    total += std::popcount(static_cast<unsigned>((mask_row[j >> 3] >> (j & 7)) & ((1u << span) - 1)));
    j += span;
  }
  for (; j + 64 <= stop; j += 64) {
    uint64_t word;
    std::memcpy(&word, mask_row + (j >> 3), 8);
    total += std::popcount(word);
  }
  while (j < stop) {
    const int64_t span = std::min<int64_t>(8, stop - j);
    total += std::popcount(static_cast<unsigned>(mask_row[j >> 3] & ((1u << span) - 1)));
    j += span;
  }
  return total;
}

template <typename T>
struct TensorPtrs {
  T* param;
  const T* grad;
  T* state[2];            // null past the op's number of state tensors
  const uint8_t* mask;    // null: dense parameter
  int64_t cols;           // last dimension (masked tensors)
  int64_t packed_cols;    // bytes per mask row
};

template <typename T>
T* advance(T* ptr, int64_t by) {
  return ptr == nullptr ? nullptr : ptr + by;
}

// Calls f(mask_row, c0, n, flat) for each piece of the flat range [begin, end) that lies in
// one row: elements [c0, c0 + n) of that row, starting at flat index `flat`.
template <typename T, class F>
void for_each_row_segment(const TensorPtrs<T>& t, int64_t begin, int64_t end, F&& f) {
  int64_t row = begin / t.cols;
  int64_t c0 = begin - row * t.cols;
  for (int64_t flat = begin; flat < end; ++row, c0 = 0) {
    const int64_t n = std::min(t.cols - c0, end - flat);
    f(t.mask + row * t.packed_cols, c0, n, flat);
    flat += n;
  }
}

// Dense-state update of n consecutive elements. kMasked: keep[k] is the lane mask
// of element k; pruned elements and their state are written 0 (the select also drops
// whatever a NaN gradient at a pruned position computed).
template <class Op, typename T, bool kMasked>
SPARSEBERT_CLONES void update_tile(const Op op, T* __restrict p, const T* __restrict g, T* __restrict s0,
                                   T* __restrict s1, const LaneBits<T>* __restrict keep, int64_t n) {
  auto load_state = [&](int64_t k, T* s) {
    if constexpr (Op::kStates > 0) s[0] = s0[k];
    if constexpr (Op::kStates > 1) s[1] = s1[k];
  };
  auto select = [&](int64_t k, T value) {
    if constexpr (kMasked) value = and_bits(value, keep[k]);  // 0 where pruned, also for NaN
    return value;
  };
  auto store_state = [&](int64_t k, const T* s) {
    if constexpr (Op::kStates > 0) s0[k] = select(k, s[0]);
    if constexpr (Op::kStates > 1) s1[k] = select(k, s[1]);
  };
  // One pass: with -fno-math-errno (CMakeLists.txt) GCC vectorizes the square root inline.
  for (int64_t k = 0; k < n; ++k) {
    T pk = p[k];
    T s[2] = {T(0), T(0)};
    load_state(k, s);
    op(pk, g[k], s);
    p[k] = select(k, pk);
    store_state(k, s);
  }
}

// Bits [j, j + len) of a mask row, len <= 16, reading only the bytes they lie in.
inline uint32_t mask_bits(const uint8_t* mask_row, int64_t j, int64_t len) {
  if (len == 16 && (j & 7) == 0) return mask_row[j >> 3] | static_cast<uint32_t>(mask_row[(j >> 3) + 1]) << 8;
  const int64_t first = j >> 3;
  const int64_t last = (j + len - 1) >> 3;
  uint32_t word = 0;
  for (int64_t b = first; b <= last; ++b) word |= static_cast<uint32_t>(mask_row[b]) << (8 * (b - first));
  return (word >> (j & 7)) & ((1u << len) - 1);
}

// A run of up to 16 consecutive elements of a chunk with at least one kept weight: its first
// element (relative to the chunk) and its mask bits.
struct Group {
  int32_t offset;
  uint32_t bits;
};

// Appends the kept elements among p[0, m), g[0, m) (mask bits [c0, c0 + m) of the row) to the
// output buffers, which need 16 elements of slack, and the groups of 16 that hold them (the
// first at chunk offset `offset`) to `groups`. Returns how many were kept. Branch-free within
// a group: it stores every element and advances past kept ones.
template <typename T>
int64_t compact_kept_scalar(const T* p, const T* g, const uint8_t* mask_row, int64_t c0, int64_t m, int32_t offset,
                            T* p_out, T* g_out, Group*& groups) {
  int64_t c = 0;
  for (int64_t k0 = 0; k0 < m; k0 += 16) {
    const int64_t len = std::min<int64_t>(16, m - k0);
    const uint32_t bits = mask_bits(mask_row, c0 + k0, len);
    if (bits == 0) continue;
    *groups++ = {offset + static_cast<int32_t>(k0), bits};
    for (int64_t k = 0; k < len; ++k) {
      p_out[c] = p[k0 + k];
      g_out[c] = g[k0 + k];
      c += (bits >> k) & 1;
    }
  }
  return c;
}

// Writes the updated kept weights p_buf[0, ...) back to their positions in `param`.
template <typename T>
void scatter_kept_scalar(const T* p_buf, const Group* groups, int64_t num_groups, T* param) {
  for (int64_t i = 0; i < num_groups; ++i) {
    for (uint32_t bits = groups[i].bits; bits != 0; bits &= bits - 1) {
      param[groups[i].offset + std::countr_zero(bits)] = *p_buf++;
    }
  }
}

#if SPARSEBERT_X86
constexpr int64_t kPrefetchAhead = 1024;  // elements: 4 KiB, 64 lines of each of p and g

// The same with AVX-512 register compression and expansion, 16 floats at a time.
__attribute__((target("avx512f,popcnt"))) int64_t compact_kept_avx512(const float* p, const float* g,
                                                                      const uint8_t* mask_row, int64_t c0, int64_t m,
                                                                      int32_t offset, float* p_out, float* g_out,
                                                                      Group*& groups) {
  int64_t c = 0;
  Group* out = groups;  // a local copy: stores through the reference would alias the buffers
  for (int64_t k = 0; k < m; k += 16) {
    // The lines without a kept weight (a fifth at 90% sparsity) are skipped, and the gaps
    // defeat the hardware prefetcher: the loads stalled on memory. Lines are fetched ahead
    // instead, all of them (a missed line costs more than a useless one).
    _mm_prefetch(reinterpret_cast<const char*>(p + k + kPrefetchAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(g + k + kPrefetchAhead), _MM_HINT_T0);
    const int64_t len = std::min<int64_t>(16, m - k);
    const __mmask16 kept = static_cast<__mmask16>(mask_bits(mask_row, c0 + k, len));
    if (kept == 0) continue;
    *out++ = {offset + static_cast<int32_t>(k), kept};
    // Whole-vector loads where the tile allows (masked loads are slow on some CPUs).
    const __m512 pv = len == 16 ? _mm512_loadu_ps(p + k) : _mm512_maskz_loadu_ps(kept, p + k);
    const __m512 gv = len == 16 ? _mm512_loadu_ps(g + k) : _mm512_maskz_loadu_ps(kept, g + k);
    _mm512_storeu_ps(p_out + c, _mm512_maskz_compress_ps(kept, pv));
    _mm512_storeu_ps(g_out + c, _mm512_maskz_compress_ps(kept, gv));
    c += std::popcount(static_cast<unsigned>(kept));
  }
  groups = out;
  return c;
}

// Masked stores write the kept lanes only: pruned weights are never written in compact mode.
__attribute__((target("avx512f,popcnt"))) void scatter_kept_avx512(const float* p_buf, const Group* groups,
                                                                   int64_t num_groups, float* param) {
  for (int64_t i = 0; i < num_groups; ++i) {
    const __mmask16 kept = static_cast<__mmask16>(groups[i].bits);
    _mm512_mask_storeu_ps(param + groups[i].offset, kept, _mm512_maskz_expand_ps(kept, _mm512_loadu_ps(p_buf)));
    p_buf += std::popcount(static_cast<unsigned>(kept));
  }
}

constexpr int64_t kL1Tile = 1024;  // elements: 16 KiB of weights, gradients and moments

// Zeroes the pruned ones among elements [0, n) of p, s0 and s1 (null: no such state), whose
// mask bits are [c0, c0 + n) of a mask row.
__attribute__((target("avx512f"))) void zero_pruned_avx512(const uint8_t* mask_row, int64_t c0, int64_t n, float* p,
                                                           float* s0, float* s1) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const int64_t len = std::min<int64_t>(16, n - k);
    const __mmask16 pruned = static_cast<__mmask16>(~mask_bits(mask_row, c0 + k, len) & ((1u << len) - 1));
    if (pruned == 0) continue;
    _mm512_mask_storeu_ps(p + k, pruned, zero);
    if (s0 != nullptr) _mm512_mask_storeu_ps(s0 + k, pruned, zero);
    if (s1 != nullptr) _mm512_mask_storeu_ps(s1 + k, pruned, zero);
  }
}

inline bool has_avx512() {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt");
  return avx512;
}
#endif

template <typename T>
int64_t compact_kept(const T* p, const T* g, const uint8_t* mask_row, int64_t c0, int64_t m, int32_t offset, T* p_out,
                     T* g_out, Group*& groups) {
#if SPARSEBERT_X86
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) return compact_kept_avx512(p, g, mask_row, c0, m, offset, p_out, g_out, groups);
  }
#endif
  return compact_kept_scalar(p, g, mask_row, c0, m, offset, p_out, g_out, groups);
}

template <typename T>
void scatter_kept(const T* p_buf, const Group* groups, int64_t num_groups, T* param) {
#if SPARSEBERT_X86
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) return scatter_kept_avx512(p_buf, groups, num_groups, param);
  }
#endif
  scatter_kept_scalar(p_buf, groups, num_groups, param);
}

// Dense-state update of a chunk. With AVX-512 (float), a masked row is updated tile by tile as
// if dense, then its pruned elements are zeroed with masked stores while the tile is in L1:
// expanding the mask bits to lane masks and ANDing every store (the portable path) made the
// masked step 1.3x slower than the unmasked one.
template <class Op, typename T>
void update_chunk_dense(const Op& op, const TensorPtrs<T>& t, int64_t begin, int64_t end) {
  if (t.mask == nullptr) {
    update_tile<Op, T, false>(op, t.param + begin, t.grad + begin, advance(t.state[0], begin),
                              advance(t.state[1], begin), nullptr, end - begin);
    return;
  }
#if SPARSEBERT_X86
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) {
      for_each_row_segment(t, begin, end, [&](const uint8_t* mask_row, int64_t c0, int64_t n, int64_t flat) {
        for (int64_t k = 0; k < n; k += kL1Tile) {
          const int64_t m = std::min(kL1Tile, n - k);
          const int64_t at = flat + k;
          T* s0 = advance(t.state[0], at);
          T* s1 = advance(t.state[1], at);
          update_tile<Op, T, false>(op, t.param + at, t.grad + at, s0, s1, nullptr, m);
          zero_pruned_avx512(mask_row, c0 + k, m, t.param + at, s0, s1);
        }
      });
      return;
    }
  }
#endif
  for_each_row_segment(t, begin, end, [&](const uint8_t* mask_row, int64_t c0, int64_t n, int64_t flat) {
    alignas(64) LaneBits<T> keep_buf[kTile + 8];
    for (int64_t k = 0; k < n; k += kTile) {
      const int64_t m = std::min(kTile, n - k);
      const LaneBits<T>* keep = expand_bits(mask_row, c0 + k, m, keep_buf);
      const int64_t at = flat + k;
      update_tile<Op, T, true>(op, t.param + at, t.grad + at, advance(t.state[0], at), advance(t.state[1], at), keep, m);
    }
  });
}

// Compact state: the kept weights of a chunk, in order, use consecutive state entries from
// `kept` on. The chunk is streamed a tile at a time: the kept weights and gradients are
// compacted into contiguous buffers (sequential reads, which the hardware prefetches; walking
// the set bits with scattered loads was 3x slower), the same vector loop as for dense
// parameters updates them with the contiguous state (so compact and dense state agree bit for
// bit), and the weights go back to their positions, expanded group by group. Pruned weights
// are not written.
template <class Op, typename T>
void update_chunk_compact(const Op& op, const TensorPtrs<T>& t, int64_t begin, int64_t end, int64_t kept) {
  constexpr int64_t kBuffer = 4 * kTile;
  constexpr int64_t kGroups = kBuffer;      // a tile adds at most kTile / 16 groups (+1 at a row's end)
  alignas(64) T p_buf[kBuffer + 16];        // the slack: whole-vector loads and stores
  alignas(64) T g_buf[kBuffer + 16];
  Group groups[kGroups];
  int64_t count = 0;
  Group* next_group = groups;
  T* const param = t.param + begin;
  const T* const grad = t.grad + begin;
  auto flush = [&] {
    update_tile<Op, T, false>(op, p_buf, g_buf, advance(t.state[0], kept), advance(t.state[1], kept), nullptr, count);
    scatter_kept(p_buf, groups, next_group - groups, param);
    kept += count;
    count = 0;
    next_group = groups;
  };
  for_each_row_segment(t, begin, end, [&](const uint8_t* mask_row, int64_t c0, int64_t n, int64_t flat) {
    for (int64_t k0 = 0; k0 < n; k0 += kTile) {
      const int64_t m = std::min(kTile, n - k0);
      const int32_t offset = static_cast<int32_t>(flat + k0 - begin);
      if (count + m > kBuffer || (next_group - groups) + kTile / 16 + 1 > kGroups) flush();
      count += compact_kept(param + offset, grad + offset, mask_row, c0 + k0, m, offset, p_buf + count, g_buf + count,
                            next_group);
    }
  });
  if (count > 0) flush();
}

// Whether any of n gradients (only kept ones when kMasked) is NaN or Inf: an all-ones exponent.
template <typename T, bool kMasked>
SPARSEBERT_CLONES bool any_nonfinite(const T* __restrict g, const LaneBits<T>* __restrict keep, int64_t n) {
  using Bits = LaneBits<T>;
  constexpr Bits kExponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  Bits bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    Bits bits;
    std::memcpy(&bits, g + k, sizeof(T));
    const Bits nonfinite = (bits & kExponent) == kExponent;
    bad |= kMasked ? nonfinite & keep[k] : nonfinite;
  }
  return bad != 0;
}

template <typename T>
bool chunk_nonfinite(const TensorPtrs<T>& t, int64_t begin, int64_t end) {
  // NaN/Inf being rare, the cheap unmasked scan decides almost always; the mask is only
  // consulted for a chunk that has one somewhere.
  if (!any_nonfinite<T, false>(t.grad + begin, nullptr, end - begin)) return false;
  if (t.mask == nullptr) return true;
  bool bad = false;
  for_each_row_segment(t, begin, end, [&](const uint8_t* mask_row, int64_t c0, int64_t n, int64_t flat) {
    alignas(64) LaneBits<T> keep_buf[kTile + 8];
    for (int64_t k = 0; k < n && !bad; k += kTile) {
      const int64_t m = std::min(kTile, n - k);
      bad = any_nonfinite<T, true>(t.grad + flat + k, expand_bits(mask_row, c0 + k, m, keep_buf), m);
    }
  });
  return bad;
}

// f(c) for every chunk, in parallel. The threads take chunks from a shared counter instead of
// a fixed half each: on a shared machine a descheduled thread then delays the pass by its
// current chunk, not by its whole share (static halves made one step vary up to 2x).
template <class F>
void for_each_chunk(int64_t num_chunks, F&& f) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_chunks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < num_chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      f(c);
    }
  });
}

template <class Op, typename T>
void run_step(const char* name, const Op& op, at::TensorList params, at::TensorList grads,
              const std::vector<StateList>& states, const c10::List<std::optional<at::Tensor>>& masks, bool compact,
              bool check_finite) {
  std::vector<TensorPtrs<T>> tensors(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TensorPtrs<T>& t = tensors[i];
    t.param = params[i].data_ptr<T>();
    t.grad = grads[i].const_data_ptr<T>();
    for (size_t s = 0; s < 2; ++s) {
      t.state[s] = s < states.size() && !states[s].tensors.empty() ? states[s].tensors[i].data_ptr<T>() : nullptr;
    }
    t.mask = nullptr;
    if (is_masked(masks, i)) {
      const at::Tensor mask = *masks.get(i);
      t.mask = mask.const_data_ptr<uint8_t>();
      t.cols = params[i].size(-1);
      t.packed_cols = mask.size(-1);
    }
  }
  const std::vector<Chunk> chunks = plan_chunks(params);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());

  if (check_finite) {
    std::vector<uint8_t> bad(chunks.size(), 0);
    for_each_chunk(num_chunks, [&](int64_t c) {
      bad[c] = chunk_nonfinite(tensors[chunks[c].tensor], chunks[c].begin, chunks[c].end);
    });
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t i = chunks[c].tensor;
      TORCH_CHECK(!bad[c], name, ": grads[", i, "] contains NaN or Inf",
                  tensors[i].mask != nullptr ? " at a kept position" : "",
                  "; nothing was updated (check_finite=True)");
    }
  }

  // Compact mode: kept_before[c] is the state index of the first kept weight of chunk c.
  std::vector<int64_t> kept_before;
  if (compact) {
    kept_before.assign(chunks.size(), 0);
    for_each_chunk(num_chunks, [&](int64_t c) {
      const TensorPtrs<T>& t = tensors[chunks[c].tensor];
      if (t.mask == nullptr) return;
      int64_t count = 0;
      for_each_row_segment(t, chunks[c].begin, chunks[c].end,
                           [&](const uint8_t* mask_row, int64_t c0, int64_t n, int64_t) { count += count_bits(mask_row, c0, n); });
      kept_before[c] = count;
    });
    std::vector<int64_t> kept(params.size(), 0);
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t count = kept_before[c];
      kept_before[c] = kept[chunks[c].tensor];
      kept[chunks[c].tensor] += count;
    }
    check_compact_lengths(name, states, masks, kept);
  }

  for_each_chunk(num_chunks, [&](int64_t c) {
    const TensorPtrs<T>& t = tensors[chunks[c].tensor];
    if (compact && t.mask != nullptr) {
      update_chunk_compact(op, t, chunks[c].begin, chunks[c].end, kept_before[c]);
    } else {
      update_chunk_dense(op, t, chunks[c].begin, chunks[c].end);
    }
  });
}

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      const c10::List<std::optional<at::Tensor>>& masks, int64_t step, double lr, double beta1,
                      double beta2, double eps, double weight_decay, bool maximize, bool compact, bool check_finite) {
  const char* name = "masked_adamw_";
  const std::vector<StateList> states =
      checked_adamw_states(params, grads, exp_avgs, exp_avg_sqs, masks, step, compact, {at::kFloat, at::kDouble}, false);
  if (params.empty()) return;
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "masked_adamw_cpu", [&] {
    run_step<AdamWUpdate<scalar_t>, scalar_t>(name, make_adamw<scalar_t>(step, lr, beta1, beta2, eps, weight_decay, maximize),
                                              params, grads, states, masks, compact, check_finite);
  });
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const c10::List<std::optional<at::Tensor>>& masks, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool first_step, bool maximize, bool compact,
                    bool check_finite) {
  const char* name = "masked_sgd_";
  const bool has_momentum = momentum != 0.0;
  const std::vector<StateList> states =
      checked_sgd_states(params, grads, momentum_buffers, masks, momentum, compact, {at::kFloat, at::kDouble}, false);
  if (params.empty()) return;
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "masked_sgd_cpu", [&] {
    if (has_momentum) {
      run_step<SgdUpdate<scalar_t, true>, scalar_t>(
          name, make_sgd<scalar_t, true>(lr, momentum, dampening, weight_decay, nesterov, first_step, maximize), params,
          grads, states, masks, compact, check_finite);
    } else {
      run_step<SgdUpdate<scalar_t, false>, scalar_t>(
          name, make_sgd<scalar_t, false>(lr, momentum, dampening, weight_decay, nesterov, first_step, maximize), params,
          grads, {}, masks, compact, check_finite);
    }
  });
}

}  // namespace
}  // namespace sparsebert::optim

TORCH_LIBRARY_IMPL(sparsebert, CPU, m) {
  m.impl("masked_adamw_", &sparsebert::optim::masked_adamw_cpu);
  m.impl("masked_sgd_", &sparsebert::optim::masked_sgd_cpu);
}
