// Top-k magnitude selection on the CPU: radix select over order-preserving keys,
// computed on the fly from the tensors in place (no concatenation, no key tensor).
//
// Global top-k is two 16-bit histogram passes (the top 16 key bits, then the low 16
// bits of the keys in the selected bucket) and one mask pass. The mask pass keeps
// keys above the threshold key and counts the keys equal to it per segment; a
// prefix sum over those counts then gives every tie its rank in flat order, and a
// fix-up touches only the segments that hold ties to keep. Segments are ranges of
// one tensor whose ends fall on mask-byte boundaries, so threads never share a byte.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <limits>
#include <mutex>

#include "topk.h"

namespace sparsebert::topk {
namespace {

constexpr int64_t kSegment = int64_t{1} << 16;  // elements per work item
constexpr int kDigitBits = 16;

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

// Histogram of one segment into hist; returns whether a non-finite value was seen.
template <typename scalar_t, bool kAllMatch>
__attribute__((target_clones("avx512f", "avx2", "default")))
bool histogram_segment(const scalar_t* p, int64_t n, bool use_abs, Digit d, int64_t* hist) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = raw_bits(p[i]);
    bad |= bits_non_finite(bits);
    const uint32_t key = bits_to_key(abs_bits(bits, use_abs));
    if (kAllMatch || d.matches(key)) ++hist[d.bin(key)];
  }
  return bad != 0;
}

// Summed histogram over all segments with per-thread histograms; fails on NaN/Inf.
at::Tensor histogram(const Plan& plan, bool use_abs, Digit d, int64_t bins, const char* op) {
  auto out = at::zeros({bins}, at::TensorOptions().dtype(at::kLong));
  int64_t* total = out.data_ptr<int64_t>();
  std::mutex merge;
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dtype, "topk_histogram", [&] {
    at::parallel_for(0, static_cast<int64_t>(plan.segs.size()), 1, [&](int64_t sb, int64_t se) {
      std::vector<int64_t> local(bins, 0);
      bool local_bad = false;
      for (int64_t s = sb; s < se; ++s) {
        const Seg& seg = plan.segs[s];
        const scalar_t* p = plan.xs[seg.tensor].data_ptr<scalar_t>() + seg.begin;
        local_bad |= d.prefix_mask == 0 ? histogram_segment<scalar_t, true>(p, seg.end - seg.begin, use_abs, d, local.data())
                                        : histogram_segment<scalar_t, false>(p, seg.end - seg.begin, use_abs, d, local.data());
      }
      std::lock_guard<std::mutex> lock(merge);
      bad |= local_bad;
      for (int64_t b = 0; b < bins; ++b) total[b] += local[b];
    });
  });
  if (bad) fail_non_finite(op);
  return out;
}

template <typename scalar_t>
__attribute__((target_clones("avx512f", "avx2", "default")))
bool any_non_finite_segment(const scalar_t* p, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= bits_non_finite(raw_bits(p[i]));
  return bad != 0;
}

// A read-only pass for the ops that do not histogram first, so that they fail before writing.
void check_finite(const Plan& plan, const char* op) {
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dtype, "topk_check_finite", [&] {
    at::parallel_for(0, static_cast<int64_t>(plan.segs.size()), 1, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se && !bad.load(std::memory_order_relaxed); ++s) {
        const Seg& seg = plan.segs[s];
        if (any_non_finite_segment(plan.xs[seg.tensor].data_ptr<scalar_t>() + seg.begin, seg.end - seg.begin)) {
          bad = true;
        }
      }
    });
  });
  if (bad) fail_non_finite(op);
}

// Writes the bytes of mask row `row` covering columns [c0, c1) (c0 a multiple of 8) with
// the keys > threshold; returns how many keys equal the threshold.
template <typename scalar_t>
__attribute__((target_clones("avx512f", "avx2", "default")))
int64_t mask_row_piece(const scalar_t* x, int64_t c0, int64_t c1, bool use_abs, uint32_t threshold, uint8_t* out) {
  int64_t ties = 0;
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    uint32_t byte = 0;
    for (int j = 0; j < 8; ++j) {
      const uint32_t key = key_of(x[c + j], use_abs);
      byte |= static_cast<uint32_t>(key > threshold) << j;
      ties += key == threshold;
    }
    out[c / 8] = static_cast<uint8_t>(byte);
  }
  if (c < c1) {
    uint32_t byte = 0;
    for (int j = 0; c + j < c1; ++j) {
      const uint32_t key = key_of(x[c + j], use_abs);
      byte |= static_cast<uint32_t>(key > threshold) << j;
      ties += key == threshold;
    }
    out[c / 8] = static_cast<uint8_t>(byte);
  }
  return ties;
}

// Masks of keys > threshold_key plus the first ties_to_keep keys == threshold_key in flat order.
std::vector<at::Tensor> mask_from_threshold(const Plan& plan, bool use_abs, uint32_t threshold, int64_t ties_to_keep) {
  auto masks = new_masks(plan.xs, /*zeroed=*/false);
  const int64_t nseg = static_cast<int64_t>(plan.segs.size());
  std::vector<int64_t> ties(nseg, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dtype, "topk_mask_pass", [&] {
    // Visits the row pieces of a segment: fn(x_row, c0, c1, mask_row).
    auto for_pieces = [&](const Seg& seg, auto&& fn) {
      const int64_t cols = plan.cols(seg.tensor), pc = packed_cols(cols);
      const scalar_t* x = plan.xs[seg.tensor].data_ptr<scalar_t>();
      uint8_t* m = masks[seg.tensor].data_ptr<uint8_t>();
      for (int64_t pos = seg.begin; pos < seg.end;) {
        const int64_t row = pos / cols, c0 = pos % cols, c1 = std::min(cols, c0 + (seg.end - pos));
        fn(x + row * cols, c0, c1, m + row * pc);
        pos += c1 - c0;
      }
    };
    at::parallel_for(0, nseg, 1, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        for_pieces(plan.segs[s], [&](const scalar_t* x, int64_t c0, int64_t c1, uint8_t* m) {
          ties[s] += mask_row_piece(x, c0, c1, use_abs, threshold, m);
        });
      }
    });
    // ties[s] becomes the number of ties before segment s (exclusive prefix sum).
    std::vector<int64_t> before(nseg);
    int64_t running = 0;
    for (int64_t s = 0; s < nseg; ++s) {
      before[s] = running;
      running += ties[s];
    }
    at::parallel_for(0, nseg, 1, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        if (ties[s] == 0 || before[s] >= ties_to_keep) continue;
        int64_t rank = before[s];
        for_pieces(plan.segs[s], [&](const scalar_t* x, int64_t c0, int64_t c1, uint8_t* m) {
          for (int64_t c = c0; c < c1 && rank < ties_to_keep; ++c) {
            if (key_of(x[c], use_abs) == threshold) {
              m[c / 8] |= static_cast<uint8_t>(1u << (c % 8));
              ++rank;
            }
          }
        });
      }
    });
  });
  return masks;
}

// The bucket holding the k-th largest key (1-based k, k <= sum(hist)) and the count above it.
std::pair<uint32_t, int64_t> select_bucket(const at::Tensor& hist, int64_t k) {
  const int64_t* h = hist.data_ptr<int64_t>();
  int64_t above = 0;
  for (int64_t b = hist.numel() - 1; b >= 0; --b) {
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
  return histogram(plan, use_abs, Digit::make(static_cast<uint32_t>(prefix), prefix_bits, digit_bits),
                   int64_t{1} << digit_bits, "topk_histogram");
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
  const auto first = histogram(plan, use_abs, Digit::make(0, 0, kDigitBits), int64_t{1} << kDigitBits, "topk_mask");
  if (k == 0) {
    return {new_masks(xs, /*zeroed=*/true), at::scalar_tensor(std::numeric_limits<float>::infinity(), at::kFloat)};
  }
  const auto [high, above_high] = select_bucket(first, k);
  const auto second =
      histogram(plan, use_abs, Digit::make(high, kDigitBits, kDigitBits), int64_t{1} << kDigitBits, "topk_mask");
  const auto [low, above_low] = select_bucket(second, k - above_high);
  const uint32_t threshold = (high << kDigitBits) | low;
  auto masks = mask_from_threshold(plan, use_abs, threshold, k - above_high - above_low);
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
