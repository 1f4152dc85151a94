// Top-k magnitude selection on the CPU: radix select over order-preserving keys,
// computed on the fly from the tensors in place (no concatenation, no key tensor).
//
// Global top-k starts with a histogram of the top 16 key bits, which fixes every key
// outside the bucket that holds the k-th largest. Usually that bucket is small (for
// normal weights at 90% sparsity, ~0.1% of them), and one mask pass both writes the
// decided bits and collects the bucket's keys with their flat positions; the best ones
// by (key, position) are then set from that short list: two passes over the weights.
// When the bucket is crowded (many equal values, e.g. zeros) a second histogram over
// the low 16 bits gives the exact threshold key instead, and the mask pass keeps the
// keys above it and counts the keys equal to it per segment; a prefix sum over those
// counts gives every tie its rank in flat order, and a fix-up touches only the
// segments holding ties to keep. Segments are ranges of one tensor whose ends fall on
// mask-byte boundaries, so threads never share a byte, and the results do not depend
// on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "topk.h"

namespace sparsebert::topk {
namespace {

constexpr int64_t kSegment = int64_t{1} << 16;  // elements per work item
constexpr int64_t kGrain = 4;  // segments: smaller inputs run on the calling thread
constexpr int kDigitBits = 16;
// The one-histogram path buffers the undecided bucket's keys (12 bytes each) when it holds
// at most 1/kCandidateFraction of the elements: under 1.2% of float32 weights' size.
constexpr int64_t kCandidateFraction = 256;

struct Seg {
  int tensor;
  int64_t begin, end;  // flat element range inside the tensor
};

// The inputs, contiguous, and their split into segments in flat order.
struct Plan {
  std::vector<at::Tensor> xs;
  std::vector<Seg> segs;
  at::ScalarType dtype;

  int64_t cols(int t) const { return xs[t].size(-1); }
};

// Smallest position >= pos that starts a mask byte: a column multiple of 8, or a row start.
int64_t byte_aligned(int64_t pos, int64_t cols, int64_t numel) {
  if (pos >= numel) return numel;
  const int64_t row = pos / cols, col = pos % cols;
  const int64_t up = (col + 7) / 8 * 8;
  return up >= cols ? std::min((row + 1) * cols, numel) : row * cols + up;
}

Plan make_plan(at::TensorList inputs) {
  Plan plan;
  plan.dtype = inputs[0].scalar_type();
  for (size_t t = 0; t < inputs.size(); ++t) {
    plan.xs.push_back(inputs[t].contiguous());
    const int64_t n = inputs[t].numel(), cols = inputs[t].size(-1);
    for (int64_t begin = 0; begin < n;) {
      const int64_t end = byte_aligned(begin + kSegment, cols, n);
      plan.segs.push_back({static_cast<int>(t), begin, end});
      begin = end;
    }
  }
  return plan;
}

template <typename scalar_t>
inline uint32_t raw_bits(scalar_t v) {
  return float_bits(static_cast<float>(v));
}

template <typename scalar_t>
inline uint32_t key_of(scalar_t v, bool use_abs) {
  return bits_to_key(abs_bits(raw_bits(v), use_abs));
}

// Keys of p[0, n) into keys (a vectorizable loop); returns whether a value is NaN/Inf.
template <typename scalar_t>
__attribute__((target_clones("avx512f", "avx2", "default")))
bool load_keys(const scalar_t* p, int64_t n, bool use_abs, uint32_t* keys) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = raw_bits(p[i]);
    bad |= bits_non_finite(bits);
    keys[i] = bits_to_key(abs_bits(bits, use_abs));
  }
  return bad != 0;
}

// Keys are converted a block at a time into a thread-local buffer that stays in L1, so the
// conversion vectorizes and the consumers (histogram, packing) loop over plain uint32 keys.
constexpr int64_t kBlock = 1024;  // a multiple of 8: blocks start on mask-byte boundaries

// Calls fn(keys, n, row, col0) for the blocks of a segment; each block is part of one row.
// Returns whether a value is NaN/Inf.
template <typename scalar_t, typename Fn>
bool visit_keys(const Plan& plan, const Seg& seg, bool use_abs, uint32_t* buffer, Fn&& fn) {
  const int64_t cols = plan.cols(seg.tensor);
  const scalar_t* x = plan.xs[seg.tensor].data_ptr<scalar_t>();
  bool bad = false;
  for (int64_t pos = seg.begin; pos < seg.end;) {
    const int64_t row = pos / cols, col0 = pos - row * cols;
    const int64_t n = std::min({kBlock, cols - col0, seg.end - pos});
    bad |= load_keys(x + pos, n, use_abs, buffer);
    fn(static_cast<const uint32_t*>(buffer), n, row, col0);
    pos += n;
  }
  return bad;
}

template <bool kAllMatch>
void histogram_block(const uint32_t* keys, int64_t n, Digit d, int64_t* hist) {
  for (int64_t i = 0; i < n; ++i) {
    if (kAllMatch || d.matches(keys[i])) ++hist[d.bin(keys[i])];
  }
}

// Zeroed per-thread histogram storage, kept across calls: allocating and freeing half a MiB
// per call costs page faults and TLB shootdowns across the pool's threads, which on a busy
// machine made small calls 30x slower. `Tag` separates the caller's total from the locals
// (the calling thread also runs a share of the parallel loop).
template <typename Tag>
int64_t* thread_histogram(int64_t bins) {
  thread_local std::vector<int64_t> storage;
  if (static_cast<int64_t>(storage.size()) < bins) storage.resize(bins);
  std::fill_n(storage.begin(), bins, 0);
  return storage.data();
}
struct LocalTag {};
struct TotalTag {};

// Summed histogram over all segments into total[bins] (zeroed here) from per-thread
// histograms; fails on NaN/Inf.
void histogram(const Plan& plan, bool use_abs, Digit d, int64_t bins, int64_t* total, const char* op) {
  std::fill_n(total, bins, 0);
  std::mutex merge;
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dtype, "topk_histogram", [&] {
    at::parallel_for(0, static_cast<int64_t>(plan.segs.size()), kGrain, [&](int64_t sb, int64_t se) {
      int64_t* local = thread_histogram<LocalTag>(bins);
      uint32_t buffer[kBlock];
      bool local_bad = false;
      for (int64_t s = sb; s < se; ++s) {
        local_bad |= visit_keys<scalar_t>(plan, plan.segs[s], use_abs, buffer, [&](const uint32_t* keys, int64_t n, int64_t, int64_t) {
          if (d.prefix_mask == 0) {
            histogram_block<true>(keys, n, d, local);
          } else {
            histogram_block<false>(keys, n, d, local);
          }
        });
      }
      std::lock_guard<std::mutex> lock(merge);
      bad |= local_bad;
      for (int64_t b = 0; b < bins; ++b) total[b] += local[b];
    });
  });
  if (bad) fail_non_finite(op);
}

// A read-only pass for the ops that do not histogram first, so that they fail before writing.
void check_finite(const Plan& plan, const char* op) {
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dtype, "topk_check_finite", [&] {
    at::parallel_for(0, static_cast<int64_t>(plan.segs.size()), kGrain, [&](int64_t sb, int64_t se) {
      uint32_t buffer[kBlock];
      for (int64_t s = sb; s < se && !bad.load(std::memory_order_relaxed); ++s) {
        if (visit_keys<scalar_t>(plan, plan.segs[s], /*use_abs=*/false, buffer, [](const uint32_t*, int64_t, int64_t, int64_t) {})) {
          bad = true;
        }
      }
    });
  });
  if (bad) fail_non_finite(op);
}

// Packs a byte-aligned run of keys into mask bytes: bit set where (key >> shift) > cut.
// Returns how many keys have (key >> shift) == cut: exact ties for shift 0, the keys of the
// undecided bucket for shift 16.
int64_t pack_block_scalar(const uint32_t* keys, int64_t n, uint32_t shift, uint32_t cut, uint8_t* out) {
  int64_t ties = 0;
  for (int64_t i = 0; i < n; i += 8) {
    uint32_t byte = 0;
    for (int64_t j = 0; j < 8 && i + j < n; ++j) {
      const uint32_t v = keys[i + j] >> shift;
      byte |= static_cast<uint32_t>(v > cut) << j;
      ties += v == cut;
    }
    out[i / 8] = static_cast<uint8_t>(byte);
  }
  return ties;
}

#if defined(__x86_64__)
// The compiler does not turn the bit packing into mask registers by itself: one unsigned
// compare gives the 16 bits of two mask bytes directly.
__attribute__((target("avx512f")))
int64_t pack_block_avx512(const uint32_t* keys, int64_t n, uint32_t shift, uint32_t cut, uint8_t* out) {
  const __m512i vcut = _mm512_set1_epi32(static_cast<int>(cut));
  const __m128i vshift = _mm_cvtsi32_si128(static_cast<int>(shift));
  int64_t ties = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i v = _mm512_srl_epi32(_mm512_loadu_si512(keys + i), vshift);
    const uint16_t above = _mm512_cmpgt_epu32_mask(v, vcut);
    ties += __builtin_popcount(_mm512_cmpeq_epu32_mask(v, vcut));
    std::memcpy(out + i / 8, &above, sizeof(above));  // little endian: element i + j is bit j
  }
  return ties + pack_block_scalar(keys + i, n - i, shift, cut, out + i / 8);
}
#endif

int64_t pack_block(const uint32_t* keys, int64_t n, uint32_t shift, uint32_t cut, uint8_t* out) {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return pack_block_avx512(keys, n, shift, cut, out);
#endif
  return pack_block_scalar(keys, n, shift, cut, out);
}

uint8_t* mask_row(std::vector<at::Tensor>& masks, const Plan& plan, int tensor, int64_t row) {
  return masks[tensor].data_ptr<uint8_t>() + row * packed_cols(plan.cols(tensor));
}

// Masks of keys > threshold_key plus the first ties_to_keep keys == threshold_key in flat order.
std::vector<at::Tensor> mask_from_threshold(const Plan& plan, bool use_abs, uint32_t threshold, int64_t ties_to_keep) {
  auto masks = new_masks(plan.xs, /*zeroed=*/false);
  const int64_t nseg = static_cast<int64_t>(plan.segs.size());
  std::vector<int64_t> ties(nseg, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dtype, "topk_mask_pass", [&] {
    at::parallel_for(0, nseg, kGrain, [&](int64_t sb, int64_t se) {
      uint32_t buffer[kBlock];
      for (int64_t s = sb; s < se; ++s) {
        const Seg& seg = plan.segs[s];
        visit_keys<scalar_t>(plan, seg, use_abs, buffer, [&](const uint32_t* keys, int64_t n, int64_t row, int64_t col0) {
          ties[s] += pack_block(keys, n, 0, threshold, mask_row(masks, plan, seg.tensor, row) + col0 / 8);
        });
      }
    });
    // Ties before each segment in flat order; only segments holding ties to keep are revisited.
    std::vector<std::pair<int64_t, int64_t>> fixups;  // (segment, rank of its first tie)
    int64_t before = 0;
    for (int64_t s = 0; s < nseg && before < ties_to_keep; ++s) {
      if (ties[s] > 0) fixups.emplace_back(s, before);
      before += ties[s];
    }
    at::parallel_for(0, static_cast<int64_t>(fixups.size()), 1, [&](int64_t fb, int64_t fe) {
      uint32_t buffer[kBlock];
      for (int64_t f = fb; f < fe; ++f) {
        const Seg& seg = plan.segs[fixups[f].first];
        int64_t rank = fixups[f].second;
        visit_keys<scalar_t>(plan, seg, use_abs, buffer, [&](const uint32_t* keys, int64_t n, int64_t row, int64_t col0) {
          uint8_t* m = mask_row(masks, plan, seg.tensor, row);
          for (int64_t i = 0; i < n && rank < ties_to_keep; ++i) {
            if (keys[i] == threshold) {
              m[(col0 + i) / 8] |= static_cast<uint8_t>(1u << ((col0 + i) % 8));
              ++rank;
            }
          }
        });
      }
    });
  });
  return masks;
}

// A key of the undecided bucket and where it is: segment and offset in it (flat order).
struct Candidate {
  uint32_t key, seg, offset;
};

// Global top-k from the first histogram alone: one mask pass keeps the buckets above
// `bucket` and collects the keys of `bucket` itself (count of them, known from the
// histogram) as candidates; the best `rank` candidates (key, then flat position) are then
// set one by one. Returns the masks and the threshold key.
std::pair<std::vector<at::Tensor>, uint32_t> mask_from_bucket(const Plan& plan, bool use_abs, uint32_t bucket,
                                                              int64_t count, int64_t rank) {
  auto masks = new_masks(plan.xs, /*zeroed=*/false);
  std::vector<Candidate> candidates(count);
  std::atomic<int64_t> cursor{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dtype, "topk_mask_pass", [&] {
    at::parallel_for(0, static_cast<int64_t>(plan.segs.size()), kGrain, [&](int64_t sb, int64_t se) {
      uint32_t buffer[kBlock];
      for (int64_t s = sb; s < se; ++s) {
        const Seg& seg = plan.segs[s];
        visit_keys<scalar_t>(plan, seg, use_abs, buffer, [&](const uint32_t* keys, int64_t n, int64_t row, int64_t col0) {
          if (pack_block(keys, n, kDigitBits, bucket, mask_row(masks, plan, seg.tensor, row) + col0 / 8) == 0) return;
          const int64_t offset = row * plan.cols(seg.tensor) + col0 - seg.begin;
          for (int64_t i = 0; i < n; ++i) {
            if ((keys[i] >> kDigitBits) == bucket) {
              const int64_t slot = cursor.fetch_add(1, std::memory_order_relaxed);
              if (slot < count) {  // only an input changed under us could overflow; checked below
                candidates[slot] = {keys[i], static_cast<uint32_t>(s), static_cast<uint32_t>(offset + i)};
              }
            }
          }
        });
      }
    });
  });
  TORCH_CHECK(cursor.load() == count, "topk_mask: internal error, the bucket count changed between passes");
  // The order is the selection order itself: larger key first, then lower flat position.
  const auto better = [](const Candidate& a, const Candidate& b) {
    return a.key != b.key ? a.key > b.key : (a.seg != b.seg ? a.seg < b.seg : a.offset < b.offset);
  };
  std::nth_element(candidates.begin(), candidates.begin() + (rank - 1), candidates.end(), better);
  for (int64_t i = 0; i < rank; ++i) {
    const Seg& seg = plan.segs[candidates[i].seg];
    const int64_t pos = seg.begin + candidates[i].offset, cols = plan.cols(seg.tensor);
    const int64_t col = pos % cols;
    mask_row(masks, plan, seg.tensor, pos / cols)[col / 8] |= static_cast<uint8_t>(1u << (col % 8));
  }
  return {std::move(masks), candidates[rank - 1].key};
}

// The bucket holding the k-th largest key (1-based k, k <= sum(hist)) and the count above it.
std::pair<uint32_t, int64_t> select_bucket(const int64_t* h, int64_t bins, int64_t k) {
  int64_t above = 0;
  for (int64_t b = bins - 1; b >= 0; --b) {
    if (above + h[b] >= k) return {static_cast<uint32_t>(b), above};
    above += h[b];
  }
  TORCH_CHECK(false, "topk: internal error, k exceeds the histogram total");
}

// Row view of a tensor: rows x cols, contiguous.
struct Rows {
  at::Tensor x;
  int64_t rows, cols;
  explicit Rows(const at::Tensor& t) : x(t.contiguous()), cols(t.size(-1)) { rows = cols == 0 ? 0 : t.numel() / cols; }
};

// ---------------------------------------------------------------------------------------
// Ops.

at::Tensor topk_histogram_cpu(at::TensorList xs, bool use_abs, int64_t prefix, int64_t prefix_bits, int64_t digit_bits) {
  check_inputs(xs, "topk_histogram");
  check_histogram_args(prefix, prefix_bits, digit_bits);
  const Plan plan = make_plan(xs);
  auto out = at::empty({int64_t{1} << digit_bits}, at::TensorOptions().dtype(at::kLong));
  histogram(plan, use_abs, Digit::make(static_cast<uint32_t>(prefix), prefix_bits, digit_bits), out.numel(),
            out.data_ptr<int64_t>(), "topk_histogram");
  return out;
}

std::vector<at::Tensor> topk_mask_from_threshold_cpu(at::TensorList xs, bool use_abs, int64_t threshold_key,
                                                     int64_t ties_to_keep) {
  check_inputs(xs, "topk_mask_from_threshold");
  TORCH_CHECK(threshold_key >= 0 && threshold_key <= 0xFFFFFFFFll,
              "topk_mask_from_threshold: threshold_key must be a 32-bit key in [0, 2**32), got ", threshold_key);
  TORCH_CHECK(ties_to_keep >= 0, "topk_mask_from_threshold: ties_to_keep must be >= 0, got ", ties_to_keep);
  const Plan plan = make_plan(xs);
  check_finite(plan, "topk_mask_from_threshold");
  return mask_from_threshold(plan, use_abs, static_cast<uint32_t>(threshold_key), ties_to_keep);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> topk_mask_cpu(at::TensorList xs, int64_t k, bool use_abs) {
  check_inputs(xs, "topk_mask");
  const int64_t n = total_numel(xs);
  TORCH_CHECK(k >= 0 && k <= n, "topk_mask: k must be in [0, N] with N = ", n, " elements in all xs, got k = ", k);
  const Plan plan = make_plan(xs);
  constexpr int64_t bins = int64_t{1} << kDigitBits;
  int64_t* hist = thread_histogram<TotalTag>(bins);
  histogram(plan, use_abs, Digit::make(0, 0, kDigitBits), bins, hist, "topk_mask");
  if (k == 0) {
    return {new_masks(xs, /*zeroed=*/true), at::scalar_tensor(std::numeric_limits<float>::infinity(), at::kFloat)};
  }
  const auto [high, above_high] = select_bucket(hist, bins, k);
  const int64_t in_bucket = hist[high];
  uint32_t threshold;
  std::vector<at::Tensor> masks;
  if (in_bucket <= std::max(kSegment, n / kCandidateFraction)) {
    std::tie(masks, threshold) = mask_from_bucket(plan, use_abs, high, in_bucket, k - above_high);
  } else {
    // A crowded bucket (many equal values, e.g. zeros): narrow it with a second histogram.
    histogram(plan, use_abs, Digit::make(high, kDigitBits, kDigitBits), bins, hist, "topk_mask");
    const auto [low, above_low] = select_bucket(hist, bins, k - above_high);
    threshold = (high << kDigitBits) | low;
    masks = mask_from_threshold(plan, use_abs, threshold, k - above_high - above_low);
  }
  return {std::move(masks), at::scalar_tensor(key_to_float(threshold), at::kFloat)};
}

at::Tensor topk_mask_rows_cpu(const at::Tensor& x, int64_t k, bool use_abs) {
  check_inputs({x}, "topk_mask_rows");
  TORCH_CHECK(k >= 0 && k <= x.size(-1), "topk_mask_rows: k must be in [0, ", x.size(-1),
              "] (the last dimension), got ", k);
  check_finite(make_plan({x}), "topk_mask_rows");
  const Rows r(x);
  auto mask = new_masks({x}, /*zeroed=*/true)[0];
  const int64_t pc = packed_cols(r.cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "topk_mask_rows", [&] {
    at::parallel_for(0, r.rows, std::max<int64_t>(1, kSegment / std::max<int64_t>(r.cols, 1)), [&](int64_t rb, int64_t re) {
      std::vector<uint32_t> keys(r.cols);
      for (int64_t row = rb; row < re && k > 0; ++row) {
        const scalar_t* p = r.x.data_ptr<scalar_t>() + row * r.cols;
        for (int64_t c = 0; c < r.cols; ++c) keys[c] = key_of(p[c], use_abs);
        std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint32_t>());
        const uint32_t threshold = keys[k - 1];
        int64_t ties = k;
        for (int64_t c = 0; c < r.cols; ++c) ties -= key_of(p[c], use_abs) > threshold;
        uint8_t* m = mask.data_ptr<uint8_t>() + row * pc;
        for (int64_t c = 0; c < r.cols; ++c) {
          const uint32_t key = key_of(p[c], use_abs);
          const bool keep = key > threshold || (key == threshold && ties-- > 0);
          m[c / 8] |= static_cast<uint8_t>(keep) << (c % 8);
        }
      }
    });
  });
  return mask;
}

at::Tensor nm_mask_cpu(const at::Tensor& x, int64_t n, int64_t m, bool use_abs) {
  check_inputs({x}, "nm_mask");
  TORCH_CHECK(m >= 1, "nm_mask: m must be >= 1, got ", m);
  TORCH_CHECK(n >= 0 && n <= m, "nm_mask: n must be in [0, m] = [0, ", m, "], got ", n);
  TORCH_CHECK(x.size(-1) % m == 0, "nm_mask: the last dimension (", x.size(-1), ") must be divisible by m = ", m);
  check_finite(make_plan({x}), "nm_mask");
  const Rows r(x);
  auto mask = new_masks({x}, /*zeroed=*/true)[0];
  const int64_t pc = packed_cols(r.cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nm_mask", [&] {
    at::parallel_for(0, r.rows, std::max<int64_t>(1, kSegment / std::max<int64_t>(r.cols, 1)), [&](int64_t rb, int64_t re) {
      std::vector<uint32_t> keys(r.cols);
      for (int64_t row = rb; row < re; ++row) {
        const scalar_t* p = r.x.data_ptr<scalar_t>() + row * r.cols;
        for (int64_t c = 0; c < r.cols; ++c) keys[c] = key_of(p[c], use_abs);
        uint8_t* out = mask.data_ptr<uint8_t>() + row * pc;
        for (int64_t g = 0; g < r.cols; g += m) {
          // Rank inside the group: larger keys, then equal keys at lower columns, come first.
          for (int64_t i = g; i < g + m; ++i) {
            int64_t rank = 0;
            for (int64_t j = g; j < g + m; ++j) rank += keys[j] > keys[i] || (keys[j] == keys[i] && j < i);
            out[i / 8] |= static_cast<uint8_t>(rank < n) << (i % 8);
          }
        }
      }
    });
  });
  return mask;
}

}  // namespace
}  // namespace sparsebert::topk

TORCH_LIBRARY_IMPL(sparsebert, CPU, m) {
  using namespace sparsebert::topk;
  m.impl("topk_histogram", &topk_histogram_cpu);
  m.impl("topk_mask_from_threshold", &topk_mask_from_threshold_cpu);
  m.impl("topk_mask", &topk_mask_cpu);
  m.impl("topk_mask_rows", &topk_mask_rows_cpu);
  m.impl("nm_mask", &nm_mask_cpu);
}
