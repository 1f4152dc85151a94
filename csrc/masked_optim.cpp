// CPU kernels of masked_adamw_ and masked_sgd_.
//
// Every tensor is cut into chunks of kChunkElems elements; the chunks of all tensors form one
// flat work list that the threads of at::parallel_for take from a shared counter. A step is
// memory-bound, so the passes are laid out to move as few bytes as they can:
//  1. count (compact mode): the kept weights of every chunk, from the masks alone (1/32 of the
//     weights' bytes);
//  2. check (check_finite): a scan of the gradients for NaN/Inf, at kept positions of masked
//     tensors, before anything is written. With compact state a sparse masked chunk (at most a
//     quarter kept) also copies its kept gradients, in order, to a workspace: the update pass
//     then reads those bytes (a tenth at 90% sparsity) instead of every gradient line again;
//  3. update. Masked chunks use only the kept lanes of the gradients (and, in compact mode, of
//     the weights); pruned weights of compact chunks are not written.
// Loads are whole vectors: a masked load reads the same cache lines (the prefetcher streams
// them all), and on AMD Zen 4/5 it keeps the prefetcher from running ahead (see Avx512::whole).
// Per float32 element of a random 90% mask (81.5% of the 64-byte lines hold a kept weight),
// torch's fused AdamW moves 28 bytes; dense state 28 (32 with the check), compact state about
// 13 (14 with the check): see docs/CPU_KERNELS.md.
// The loops run over groups of W consecutive elements (one vector register) with their W mask
// bits. The update rules of masked_optim.h run on a whole group (Lanes) as on a scalar, and
// compact state turns the mask into a list of kept offsets first, so that it runs the rules on
// full vectors of gathered kept weights. Two instruction sets implement the group loads and
// stores: AVX-512 (whole loads, masked loads only at a chunk's end, masked stores, register
// compress, gather and scatter) and a portable one, compiled for AVX2 and for baseline x86-64 /
// other CPUs and picked at load time. AVX-512 is used where the CPU has it and torch uses it
// (ATEN_CPU_CAPABILITY=avx2 or default selects the portable one, as for torch's own kernels).

// No fused multiply-adds: every operation rounds as in torch's own kernels, and the scalar,
// portable and AVX-512 loops agree bit for bit.
#pragma GCC optimize("fp-contract=off")
// Vector arguments and results of the helpers below never cross a call boundary: they are all
// inlined into the entry points, so GCC's note on their calling convention does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "masked_optim.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSEBERT_X86 1
#define SPARSEBERT_PORTABLE __attribute__((target_clones("avx2", "default"), flatten))
#else
#define SPARSEBERT_X86 0
#define SPARSEBERT_PORTABLE __attribute__((flatten))
#endif

namespace sparsebert::optim {
namespace {

// W values of T, one vector register: arithmetic acts lane by lane (GCC vector extensions),
// in the instruction set of the function it is inlined into.
template <typename T, int W>
struct Lanes {
  typedef T V __attribute__((vector_size(sizeof(T) * W)));  // (a using-alias drops the attribute)
  V v;

#define SPARSEBERT_LANES_OP(op)                                                   \
  friend Lanes operator op(Lanes a, Lanes b) { return {a.v op b.v}; }             \
  friend Lanes operator op(Lanes a, T b) { return {a.v op b}; }                   \
  friend Lanes operator op(T a, Lanes b) { return {a op b.v}; }
  SPARSEBERT_LANES_OP(+)
  SPARSEBERT_LANES_OP(-)
  SPARSEBERT_LANES_OP(*)
  SPARSEBERT_LANES_OP(/)
#undef SPARSEBERT_LANES_OP

  // Found by the update rules through argument-dependent lookup. GCC vectorizes the loop.
  friend Lanes opmath_sqrt(Lanes a) {
    for (int i = 0; i < W; ++i) a.v[i] = std::sqrt(a.v[i]);
    return a;
  }
};

constexpr int64_t kMaxLanes = 16;  // the widest group (Isa::W)

// The low n bits set (n <= 16).
inline uint32_t low_bits(int64_t n) { return (1u << n) - 1; }

// Bits [j, j + len) of a mask row, len <= 16, reading only the bytes they lie in.
inline uint32_t mask_bits(const uint8_t* mask_row, int64_t j, int64_t len) {
  if ((j & 7) == 0) {
    if (len == 16) return mask_row[j >> 3] | static_cast<uint32_t>(mask_row[(j >> 3) + 1]) << 8;
    if (len == 8) return mask_row[j >> 3];
  }
  const int64_t first = j >> 3;
  const int64_t last = (j + len - 1) >> 3;
  uint32_t word = 0;
  for (int64_t b = first; b <= last; ++b) word |= static_cast<uint32_t>(mask_row[b]) << (8 * (b - first));
  return (word >> (j & 7)) & low_bits(len);
}

// Group loads and stores. `lanes` selects lanes (bit i: lane i); `avail` is how many elements
// from the pointer on belong to the chunk or buffer (a whole group may be read or written only
// where avail >= W). Loads give 0 in the lanes not selected; stores leave the memory of the
// lanes not selected as it is. compress(dst, lanes, v) puts the selected lanes of v into dst[0],
// dst[1], ..., and kept_indices(dst, bits, first) the indices first + i of the set bits i; both
// may write W places from dst on (the buffers they fill have W places of slack). gather and
// scatter load and store the selected lanes i at base[idx[i]].
//
// Portable: whole-vector copies and bitwise selects. A store with avail >= W rewrites the
// lanes not selected with the values they hold.
template <typename T>
struct Portable {
  static constexpr int W = 32 / sizeof(T);
  using Vec = Lanes<T, W>;
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  typedef Bits BitVec __attribute__((vector_size(sizeof(T) * W)));
  typedef typename Vec::V V;

  // All ones in the selected lanes, zeros elsewhere.
  static BitVec lane_mask(uint32_t lanes) {
    BitVec select;
    for (int i = 0; i < W; ++i) select[i] = Bits(1) << i;
    return (BitVec)((lanes & select) != 0);
  }
  static Vec zero_unless(uint32_t lanes, Vec v) { return {(V)((BitVec)v.v & lane_mask(lanes))}; }
  static Vec load(const T* p, uint32_t lanes, int64_t avail) {
    Vec r{};
    if (avail >= W) {
      std::memcpy(&r.v, p, sizeof(r.v));
      return zero_unless(lanes, r);
    }
    for (int i = 0; i < avail; ++i) {
      if ((lanes >> i) & 1) r.v[i] = p[i];
    }
    return r;
  }
  static void store(T* p, uint32_t lanes, Vec v, int64_t avail) {
    if (avail >= W) {
      if (lanes != low_bits(W)) {
        Vec old;
        std::memcpy(&old.v, p, sizeof(old.v));
        const BitVec keep = lane_mask(lanes);
        v.v = (V)(((BitVec)v.v & keep) | ((BitVec)old.v & ~keep));
      }
      std::memcpy(p, &v.v, sizeof(v.v));
      return;
    }
    for (int i = 0; i < avail; ++i) {
      if ((lanes >> i) & 1) p[i] = v.v[i];
    }
  }
  static bool any_nonfinite(Vec v) {
    constexpr Bits kExponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
    const BitVec exponent = (BitVec)v.v & kExponent;
    bool bad = false;
    for (int i = 0; i < W; ++i) bad |= exponent[i] == kExponent;
    return bad;
  }
  // Branch-free: every lane writes, and the count advances by its bit.
  static void kept_indices(int32_t* dst, uint32_t bits, int32_t first) {
    int c = 0;
    for (int i = 0; i < W; ++i) {
      dst[c] = first + i;
      c += (bits >> i) & 1;
    }
  }
  static Vec gather(const T* base, const int32_t* idx, uint32_t lanes) {
    Vec r{};
    for (int i = 0; i < W; ++i) {
      if ((lanes >> i) & 1) r.v[i] = base[idx[i]];
    }
    return r;
  }
  static void scatter(T* base, const int32_t* idx, uint32_t lanes, Vec v) {
    for (int i = 0; i < W; ++i) {
      if ((lanes >> i) & 1) base[idx[i]] = v.v[i];
    }
  }
  static void compress(T* dst, uint32_t lanes, Vec v) {
    int c = 0;
    for (int i = 0; i < W; ++i) {
      dst[c] = v.v[i];
      c += (lanes >> i) & 1;
    }
  }
};

#if SPARSEBERT_X86
// AVX-512: masked loads (at a chunk's end) skip the memory of unselected lanes; masked stores
// leave it untouched. Only ever inlined into the target("avx512f") entry points below.
#define SPARSEBERT_AVX512 __attribute__((target("avx512f"))) static inline

template <typename T>
struct Avx512 {
  static constexpr bool kFloat = std::is_same_v<T, float>;
  static_assert(kFloat || std::is_same_v<T, double>);
  static constexpr int W = 64 / sizeof(T);
  using Vec = Lanes<T, W>;

  // A whole, unmasked load, hidden from GCC, which would fold it with the register mask that uses
  // it into a masked load: on AMD Zen 5 a stream of masked loads kept the prefetcher from running
  // ahead (compact step 2.2x slower at one thread).
  SPARSEBERT_AVX512 Vec whole(const T* p) {
    Vec v;
    if constexpr (kFloat) v = {_mm512_loadu_ps(p)};
    else v = {_mm512_loadu_pd(p)};
    asm("" : "+v"(v.v));
    return v;
  }
  SPARSEBERT_AVX512 Vec load(const T* p, uint32_t lanes, int64_t avail) {
    if (avail >= W) return zero_unless(lanes, whole(p));
    if constexpr (kFloat) return {_mm512_maskz_loadu_ps(lanes, p)};
    else return {_mm512_maskz_loadu_pd(lanes, p)};
  }
  SPARSEBERT_AVX512 void store(T* p, uint32_t lanes, Vec v, int64_t) {
    if constexpr (kFloat) _mm512_mask_storeu_ps(p, lanes, v.v);
    else _mm512_mask_storeu_pd(p, lanes, v.v);
  }
  SPARSEBERT_AVX512 Vec zero_unless(uint32_t lanes, Vec v) {
    if constexpr (kFloat) return {_mm512_maskz_mov_ps(lanes, v.v)};
    else return {_mm512_maskz_mov_pd(lanes, v.v)};
  }
  SPARSEBERT_AVX512 bool any_nonfinite(Vec v) {
    const __m512i bits = reinterpret_cast<__m512i>(v.v);
    if constexpr (kFloat) {
      const __m512i exponent = _mm512_set1_epi32(0x7f800000);
      return _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exponent), exponent) != 0;
    } else {
      const __m512i exponent = _mm512_set1_epi64(0x7ff0000000000000ll);
      return _mm512_cmpeq_epi64_mask(_mm512_and_si512(bits, exponent), exponent) != 0;
    }
  }
  // The indices first + i of the set bits i, in order, as a whole store (W places of slack).
  SPARSEBERT_AVX512 void kept_indices(int32_t* dst, uint32_t bits, int32_t first) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    _mm512_storeu_si512(dst, _mm512_maskz_compress_epi32(bits, _mm512_add_epi32(iota, _mm512_set1_epi32(first))));
  }
  SPARSEBERT_AVX512 Vec gather(const T* base, const int32_t* idx, uint32_t lanes) {
    if constexpr (kFloat) {
      return {_mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, _mm512_loadu_si512(idx), base, 4)};
    } else {
      const __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
      return {_mm512_mask_i32gather_pd(_mm512_setzero_pd(), lanes, i, base, 8)};
    }
  }
  SPARSEBERT_AVX512 void scatter(T* base, const int32_t* idx, uint32_t lanes, Vec v) {
    if constexpr (kFloat) {
      _mm512_mask_i32scatter_ps(base, lanes, _mm512_loadu_si512(idx), v.v, 4);
    } else {
      _mm512_mask_i32scatter_pd(base, lanes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), v.v, 8);
    }
  }
  // A register compress and a whole store: the compress-to-memory instruction is slow on some
  // CPUs (microcoded on AMD Zen 4), and a load that overlaps a masked store waits for it.
  SPARSEBERT_AVX512 void compress(T* dst, uint32_t lanes, Vec v) {
    if constexpr (kFloat) _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(lanes, v.v));
    else _mm512_storeu_pd(dst, _mm512_maskz_compress_pd(lanes, v.v));
  }
};
#undef SPARSEBERT_AVX512
#endif

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
    total += std::popcount(static_cast<unsigned>((mask_row[j >> 3] >> (j & 7)) & low_bits(span)));
    j += span;
  }
  for (; j + 64 <= stop; j += 64) {
    uint64_t word;
    std::memcpy(&word, mask_row + (j >> 3), 8);
    total += std::popcount(word);
  }
  while (j < stop) {
    const int64_t span = std::min<int64_t>(8, stop - j);
    total += std::popcount(static_cast<unsigned>(mask_row[j >> 3] & low_bits(span)));
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

// The pieces of the flat range [begin, end) of a masked tensor that lie in one row: elements
// [c0, c0 + n) of that row, from flat index `flat` on. (An iterator rather than a callback:
// the hot loops then keep their pointers and counters in registers.)
struct Segment {
  const uint8_t* mask_row;
  int64_t c0;
  int64_t n;
  int64_t flat;
};

template <typename T>
class RowSegments {
 public:
  RowSegments(const TensorPtrs<T>& t, int64_t begin, int64_t end)
      : t_(t), end_(end), row_(begin / t.cols), c0_(begin - row_ * t.cols), flat_(begin) {}

  bool next(Segment& s) {
    if (flat_ >= end_) return false;
    s = {t_.mask + row_ * t_.packed_cols, c0_, std::min(t_.cols - c0_, end_ - flat_), flat_};
    flat_ += s.n;
    ++row_;
    c0_ = 0;
    return true;
  }

 private:
  const TensorPtrs<T>& t_;
  int64_t end_, row_, c0_, flat_;
};

template <typename T>
T* advance(T* ptr, int64_t by) {
  return ptr == nullptr ? nullptr : ptr + by;
}

// The lanes of a group with `avail` (> 0) elements left.
template <class Isa>
uint32_t group_lanes(int64_t avail) {
  return avail >= Isa::W ? low_bits(Isa::W) : low_bits(avail);
}

// The hot loops below are functions of local pointers and counters, and nothing they update
// is captured by reference: else the compiler keeps it in memory and reloads it after every
// store (a masked store may alias any memory whose address was taken).

// ----------------------------------------------------------------------------- check pass
// Whether g[0, n) holds NaN/Inf.
template <class Isa, typename T>
bool any_nonfinite(const T* g, int64_t n) {
  bool bad = false;
  for (int64_t k = 0; k < n; k += Isa::W) bad |= Isa::any_nonfinite(Isa::load(g + k, group_lanes<Isa>(n - k), n - k));
  return bad;
}

// The same over the kept ones among g[0, n) (mask bits [c0, c0 + n) of a row; `avail`
// elements from g on belong to the chunk); with gc != nullptr they are also copied there, in
// order. Returns the advanced gc.
template <class Isa, typename T>
T* check_kept(const T* g, const uint8_t* mask_row, int64_t c0, int64_t n, int64_t avail, T* gc, bool& bad) {
  bool found = false;
  const auto group = [&](int64_t k, int64_t len) {
    const uint32_t kept = mask_bits(mask_row, c0 + k, len);
    const typename Isa::Vec gv = Isa::load(g + k, kept, avail - k);
    found |= Isa::any_nonfinite(gv);
    if (gc != nullptr) {
      Isa::compress(gc, kept, gv);
      gc += std::popcount(kept);
    }
  };
  int64_t k = 0;
  for (; k + Isa::W <= n; k += Isa::W) group(k, Isa::W);
  if (k < n) group(k, n - k);
  bad |= found;
  return gc;
}

template <class Isa, typename T>
bool check_chunk(const TensorPtrs<T>& t, int64_t begin, int64_t end, T* gc) {
  static_assert(Isa::W <= kMaxLanes);
  if (t.mask == nullptr) return any_nonfinite<Isa>(t.grad + begin, end - begin);
  bool bad = false;
  RowSegments<T> segments(t, begin, end);
  for (Segment s; segments.next(s);) gc = check_kept<Isa>(t.grad + s.flat, s.mask_row, s.c0, s.n, end - s.flat, gc, bad);
  return bad;
}

// ----------------------------------------------------------------------------- update pass
// Group k (elements [k, k + W)) of p, g and the state s0, s1 (those past Op::kStates unused):
// `lanes` are its elements, `avail` elements from k on belong to the chunk or buffer.
template <class Isa, class Op, typename T>
void update_dense_group(const Op& op, T* p, const T* g, T* s0, T* s1, int64_t k, uint32_t lanes, int64_t avail) {
  using Vec = typename Isa::Vec;
  Vec pv = Isa::load(p + k, lanes, avail);
  Vec s[2] = {};
  if constexpr (Op::kStates > 0) s[0] = Isa::load(s0 + k, lanes, avail);
  if constexpr (Op::kStates > 1) s[1] = Isa::load(s1 + k, lanes, avail);
  op(pv, Isa::load(g + k, lanes, avail), s);
  Isa::store(p + k, lanes, pv, avail);
  if constexpr (Op::kStates > 0) Isa::store(s0 + k, lanes, s[0], avail);
  if constexpr (Op::kStates > 1) Isa::store(s1 + k, lanes, s[1], avail);
}

// Every element of p[0, n).
template <class Isa, class Op, typename T>
void update_dense(const Op& op, T* p, const T* g, T* s0, T* s1, int64_t n) {
  int64_t k = 0;
  for (; k + Isa::W <= n; k += Isa::W) update_dense_group<Isa>(op, p, g, s0, s1, k, low_bits(Isa::W), n - k);
  if (k < n) update_dense_group<Isa>(op, p, g, s0, s1, k, low_bits(n - k), n - k);
}

// Group k (elements [k, k + W)) of a masked row segment with dense state: `lanes` are its
// elements, `kept` the kept ones, g their gradients (0 elsewhere), `avail` elements from k on
// belong to the chunk. Kept elements are updated, pruned ones and their state written 0.
template <class Isa, class Op, typename T>
void update_masked_group(const Op& op, T* p, T* s0, T* s1, int64_t k, typename Isa::Vec g, uint32_t lanes,
                         uint32_t kept, int64_t avail) {
  using Vec = typename Isa::Vec;
  Vec pv = Isa::load(p + k, lanes, avail);
  Vec s[2] = {};
  if constexpr (Op::kStates > 0) s[0] = Isa::load(s0 + k, lanes, avail);
  if constexpr (Op::kStates > 1) s[1] = Isa::load(s1 + k, lanes, avail);
  op(pv, g, s);
  Isa::store(p + k, lanes, Isa::zero_unless(kept, pv), avail);
  if constexpr (Op::kStates > 0) Isa::store(s0 + k, lanes, Isa::zero_unless(kept, s[0]), avail);
  if constexpr (Op::kStates > 1) Isa::store(s1 + k, lanes, Isa::zero_unless(kept, s[1]), avail);
}

// A masked row segment with dense state, elements [0, n) of p and g (mask bits [c0, c0 + n)
// of the row; `avail` elements from p on belong to the chunk).
template <class Isa, class Op, typename T>
void update_masked(const Op& op, T* p, const T* g, T* s0, T* s1, const uint8_t* mask_row, int64_t c0, int64_t n,
                   int64_t avail) {
  int64_t k = 0;
  for (; k + Isa::W <= n; k += Isa::W) {  // whole groups: constant lanes
    const uint32_t kept = mask_bits(mask_row, c0 + k, Isa::W);
    update_masked_group<Isa>(op, p, s0, s1, k, Isa::load(g + k, kept, avail - k), low_bits(Isa::W), kept, avail - k);
  }
  if (k < n) {
    const uint32_t kept = mask_bits(mask_row, c0 + k, n - k);
    update_masked_group<Isa>(op, p, s0, s1, k, Isa::load(g + k, kept, avail - k), low_bits(n - k), kept, avail - k);
  }
}

// The kept weights idx[0, n) of a chunk (offsets from param and grad) with the consecutive state
// entries s0, s1: weights and gradients gathered (gradients from gc where the check pass copied
// them, in the same order), the rules run on full vectors, the weights scattered back.
template <class Isa, class Op, typename T>
void update_kept(const Op& op, T* param, const T* grad, const T* gc, T* s0, T* s1, const int32_t* idx, int64_t n) {
  using Vec = typename Isa::Vec;
  for (int64_t k = 0; k < n; k += Isa::W) {
    const uint32_t lanes = group_lanes<Isa>(n - k);
    // W consecutive kept weights (a dense stretch of the mask): whole loads and stores.
    const bool run = n - k >= Isa::W && idx[k + Isa::W - 1] - idx[k] == Isa::W - 1;
    T* const p = param + idx[k];
    Vec pv = run ? Isa::load(p, lanes, Isa::W) : Isa::gather(param, idx + k, lanes);
    Vec gv;
    if (gc != nullptr) gv = Isa::load(gc + k, lanes, n - k);
    else gv = run ? Isa::load(grad + idx[k], lanes, Isa::W) : Isa::gather(grad, idx + k, lanes);
    Vec s[2] = {};
    if constexpr (Op::kStates > 0) s[0] = Isa::load(s0 + k, lanes, n - k);
    if constexpr (Op::kStates > 1) s[1] = Isa::load(s1 + k, lanes, n - k);
    op(pv, gv, s);
    if (run) Isa::store(p, lanes, pv, Isa::W);
    else Isa::scatter(param, idx + k, lanes, pv);
    if constexpr (Op::kStates > 0) Isa::store(s0 + k, lanes, s[0], n - k);
    if constexpr (Op::kStates > 1) Isa::store(s1 + k, lanes, s[1], n - k);
  }
}

// A masked parameter with compact state: the kept weights of the chunk, in order, use
// consecutive state entries from `kept` on. The chunk's mask is turned into a list of the kept
// offsets (one compress per group), and update_kept works through it a vector at a time, kLag
// offsets behind the listing: a pruned weight costs a bit of the mask, only kept ones are loaded
// and stored, and pruned weights are not written. The lines of a group are prefetched as its
// offsets are listed: gathers do not train the hardware prefetcher (without it the step was 1.9x
// fused AdamW, Zen 5, one thread, loaded). Updating at the pace of the listing keeps the memory
// busy all along; listing a buffer and then updating it left the memory idle in the second phase.
// A lag of 128 kept weights (about 80 lines of each array at 90%) measured best (64 and 512 slower).
template <class Isa, class Op, typename T>
void update_compact(const Op& op, const TensorPtrs<T>& t, int64_t begin, int64_t end, int64_t kept, const T* gc) {
  constexpr int64_t W = Isa::W;
  constexpr int64_t kLag = 128;  // kept offsets listed ahead of the one updated
  constexpr int64_t kBuffer = 4 * kLag;  // moved to the front when full
  alignas(64) int32_t idx[kBuffer + kMaxLanes];  // + the slack of kept_indices
  int64_t listed = 0, done = 0;
  T* const param = t.param + begin;
  const T* const grad = t.grad + begin;
  T* s0 = advance(t.state[0], kept);
  T* s1 = advance(t.state[1], kept);
  RowSegments<T> segments(t, begin, end);
  for (Segment s; segments.next(s);) {
    const int32_t offset = static_cast<int32_t>(s.flat - begin);
    for (int64_t k = 0; k < s.n; k += W) {
      if (listed + W > kBuffer) {  // the offsets not yet updated to the front
        std::memmove(idx, idx + done, (listed - done) * sizeof(int32_t));
        listed -= done;
        done = 0;
      }
      const uint32_t bits = mask_bits(s.mask_row, s.c0 + k, std::min<int64_t>(W, s.n - k));
      __builtin_prefetch(param + offset + k, 1);
      if (gc == nullptr) __builtin_prefetch(grad + offset + k);
      Isa::kept_indices(idx + listed, bits, offset + static_cast<int32_t>(k));
      listed += std::popcount(bits);
      if (listed - done >= kLag + W) {
        update_kept<Isa>(op, param, grad, gc, s0, s1, idx + done, W);
        done += W;
        s0 = advance(s0, W);
        s1 = advance(s1, W);
        gc = advance(gc, W);
      }
    }
  }
  update_kept<Isa>(op, param, grad, gc, s0, s1, idx + done, listed - done);
}

template <class Isa, class Op, typename T>
void update_chunk(const Op& op, const TensorPtrs<T>& t, int64_t begin, int64_t end, bool compact, int64_t kept,
                  const T* gc) {
  static_assert(Isa::W <= kMaxLanes);
  if (t.mask == nullptr) {
    update_dense<Isa>(op, t.param + begin, t.grad + begin, advance(t.state[0], begin), advance(t.state[1], begin),
                      end - begin);
  } else if (compact) {
    update_compact<Isa>(op, t, begin, end, kept, gc);
  } else {
    RowSegments<T> segments(t, begin, end);
    for (Segment s; segments.next(s);) {
      update_masked<Isa>(op, t.param + s.flat, t.grad + s.flat, advance(t.state[0], s.flat),
                         advance(t.state[1], s.flat), s.mask_row, s.c0, s.n, end - s.flat);
    }
  }
}

// The entry points, one per instruction set: everything above is inlined into them (flatten),
// so that it is compiled for that instruction set.
template <typename T>
SPARSEBERT_PORTABLE bool check_chunk_portable(const TensorPtrs<T>& t, int64_t begin, int64_t end, T* gc) {
  return check_chunk<Portable<T>>(t, begin, end, gc);
}
template <class Op, typename T>
SPARSEBERT_PORTABLE void update_chunk_portable(const Op& op, const TensorPtrs<T>& t, int64_t begin, int64_t end,
                                               bool compact, int64_t kept, const T* gc) {
  update_chunk<Portable<T>>(op, t, begin, end, compact, kept, gc);
}
#if SPARSEBERT_X86
template <typename T>
__attribute__((target("avx512f"), flatten)) bool check_chunk_avx512(const TensorPtrs<T>& t, int64_t begin, int64_t end,
                                                                    T* gc) {
  return check_chunk<Avx512<T>>(t, begin, end, gc);
}
template <class Op, typename T>
__attribute__((target("avx512f"), flatten)) void update_chunk_avx512(const Op& op, const TensorPtrs<T>& t,
                                                                     int64_t begin, int64_t end, bool compact,
                                                                     int64_t kept, const T* gc) {
  update_chunk<Avx512<T>>(op, t, begin, end, compact, kept, gc);
}
#endif

bool use_avx512() {
#if SPARSEBERT_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
  return avx512;
#else
  return false;
#endif
}

// The check pass's copies of the kept gradients: per calling thread, kept across steps (a
// fresh allocation of this size would be page-faulted in at every step), grown as needed.
template <typename T>
T* gradient_workspace(int64_t n) {
  thread_local std::unique_ptr<T[]> buffer;
  thread_local int64_t capacity = 0;
  if (n > capacity) {
    buffer.reset();
    buffer.reset(new T[n]);
    capacity = n;
  }
  return buffer.get();
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
    t.state[0] = t.state[1] = nullptr;
    for (size_t s = 0; s < std::min<size_t>(states.size(), 2); ++s) {
      if (!states[s].tensors.empty()) t.state[s] = states[s].tensors[i].data_ptr<T>();
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

  // Kept weights per chunk; then, in compact mode, the state index of each chunk's first one.
  std::vector<int64_t> kept(chunks.size(), 0);
  if (compact) {
    for_each_chunk(num_chunks, [&](int64_t c) {
      const TensorPtrs<T>& t = tensors[chunks[c].tensor];
      if (t.mask == nullptr) return;
      int64_t count = 0;
      RowSegments<T> segments(t, chunks[c].begin, chunks[c].end);
      for (Segment s; segments.next(s);) count += count_bits(s.mask_row, s.c0, s.n);
      kept[c] = count;
    });
  }
  std::vector<int64_t> state_at(chunks.size(), 0);
  if (compact) {
    std::vector<int64_t> total(params.size(), 0);
    for (int64_t c = 0; c < num_chunks; ++c) {
      state_at[c] = total[chunks[c].tensor];
      total[chunks[c].tensor] += kept[c];
    }
    check_compact_lengths(name, states, masks, total);
  }

  // Where the check pass copies the kept gradients of a sparse masked chunk with compact state
  // (-1: it does not). Copying costs about three times their bytes (write, its
  // read-for-ownership, read back); it saves re-reading every gradient line that holds a kept
  // one: at most a quarter kept, most lines do. With dense state the update pass reads every
  // line of the weights and state anyway, and expanding the copies back into full vectors made
  // it slower than reading the gradients again (2.4x vs 1.3x fused AdamW at one thread, Zen 5).
  std::vector<int64_t> gc_at(chunks.size(), -1);
  T* gc = nullptr;
  if (check_finite && compact) {
    int64_t total = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      if (tensors[chunks[c].tensor].mask != nullptr && 4 * kept[c] <= chunks[c].end - chunks[c].begin) {
        gc_at[c] = total;
        total += kept[c] + kMaxLanes;  // the slack of compress, so chunks do not overlap
      }
    }
    gc = gradient_workspace<T>(total);
  }
  const auto gc_of = [&](int64_t c) { return gc_at[c] >= 0 ? gc + gc_at[c] : nullptr; };
  const bool avx512 = use_avx512();

  if (check_finite) {
    std::vector<uint8_t> bad(chunks.size(), 0);
    for_each_chunk(num_chunks, [&](int64_t c) {
      const Chunk& chunk = chunks[c];
      const TensorPtrs<T>& t = tensors[chunk.tensor];
#if SPARSEBERT_X86
      if (avx512) {
        bad[c] = check_chunk_avx512(t, chunk.begin, chunk.end, gc_of(c));
        return;
      }
#endif
      bad[c] = check_chunk_portable(t, chunk.begin, chunk.end, gc_of(c));
    });
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t i = chunks[c].tensor;
      TORCH_CHECK(!bad[c], name, ": grads[", i, "] contains NaN or Inf",
                  tensors[i].mask != nullptr ? " at a kept position" : "",
                  "; nothing was updated (check_finite=True)");
    }
  }

  for_each_chunk(num_chunks, [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const TensorPtrs<T>& t = tensors[chunk.tensor];
#if SPARSEBERT_X86
    if (avx512) {
      update_chunk_avx512(op, t, chunk.begin, chunk.end, compact, state_at[c], gc_of(c));
      return;
    }
#endif
    update_chunk_portable(op, t, chunk.begin, chunk.end, compact, state_at[c], gc_of(c));
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
