// sparse_linear on the CPU: y = x W^T + b with W packed as R x 1 blocks (see sparse_linear.h).
//
// Sparse register tiling over tokens: x is cut into tiles of up to 64 tokens, and each tile is
// transposed into an fp32 panel P[k][t] (one 256-byte row per input feature). For one block row,
// every nonzero block (k, w[0..R)) then costs one load of P[k] (four 16-float vectors) feeding
// 4 R fused multiply-adds into registers that hold the block row's outputs for the whole tile:
// a nonzero weight is read once per 64 tokens, and the activation it meets comes from L1/L2 in
// contiguous vectors. 16 finished output rows are transposed back into y's [tokens, out] layout.
//
// The AVX-512 path is chosen at run time when torch's own CPU capability is AVX512 (so
// ATEN_CPU_CAPABILITY=avx2/default also selects the portable path); the portable path is the same
// tiling in plain loops, vectorised by the compiler for AVX2 or the baseline ISA.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "sparse_linear.h"

namespace sparsebert {
namespace {

constexpr int kTile = 64;     // tokens per panel: 4 AVX-512 vectors of fp32
constexpr int kOutRows = 16;  // output rows transposed back together

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The work of one task: tokens [t0, t0 + tokens) of x against output rows [n0, n1).
template <typename T, typename Idx>
struct Problem {
  const T* x;
  int64_t ldx;
  const T* values;
  const Idx* columns;
  const int32_t* row_offsets;
  const T* bias;
  T* y;
  int64_t in_features, out_features;
};

// ---------------------------------------------------------------------------------------------
// AVX-512

#define SPARSEBERT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

namespace avx512 {

template <typename T>
SPARSEBERT_AVX512 inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

template <typename T>
SPARSEBERT_AVX512 inline void store16(T* p, __m512 v, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    // Round to nearest even, NaN to the quiet NaN 0x7FC0: c10::BFloat16's conversion.
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
  } else {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// In place: r[i][j] <- r[j][i]. Pairs, then quads within 128-bit lanes, then the lanes.
SPARSEBERT_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // r[4q + c] now holds rows 4q..4q+3 of columns c, c + 4, c + 8, c + 12 in its four lanes.
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0x88);
    t[c + 4] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0xDD);
    t[c + 8] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0xDD);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xDD);
    r[c + 4] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0xDD);
  }
}

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// panel[k * 16 V + t] = x[t][k] for t < tokens, 0 for tokens <= t < 16 V.
template <int V, typename T>
SPARSEBERT_AVX512 void pack_panel(const T* x, int64_t ldx, int64_t tokens, int64_t in_features, float* panel) {
  constexpr int W = 16 * V;
  for (int t0 = 0; t0 < W; t0 += 16) {
    for (int64_t k0 = 0; k0 < in_features; k0 += 16) {
      const __mmask16 m = first_lanes(in_features - k0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = t0 + i < tokens ? load16(x + (t0 + i) * ldx + k0, m) : _mm512_setzero_ps();
      }
      transpose16(r);
      const int64_t kn = std::min<int64_t>(16, in_features - k0);
      for (int j = 0; j < kn; ++j) _mm512_store_ps(panel + (k0 + j) * W + t0, r[j]);
    }
  }
}

// acc[r][0..V) += values[b][r] * panel[columns[b]][0..16 V)
template <int R, int V, typename T, typename Idx>
SPARSEBERT_AVX512 __attribute__((always_inline)) inline void accumulate(__m512 (&acc)[R][V], const float* panel,
                                                                        const T* values, const Idx* columns,
                                                                        int64_t b) {
  const float* xp = panel + static_cast<int64_t>(columns[b]) * (16 * V);
  __m512 xv[V];
  for (int v = 0; v < V; ++v) xv[v] = _mm512_load_ps(xp + 16 * v);
  for (int r = 0; r < R; ++r) {
    const __m512 w = _mm512_set1_ps(static_cast<float>(values[b * R + r]));
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(w, xv[v], acc[r][v]);
  }
}

// out[r][0..16 V) = sum over the blocks [b0, b1) of values[b][r] * panel[columns[b]][0..16 V).
// FMA latency needs about 4 independent accumulators: small tiles run several block streams.
template <int R, int V, typename T, typename Idx>
SPARSEBERT_AVX512 void block_row(const float* panel, const T* values, const Idx* columns, int64_t b0, int64_t b1,
                                 float* out) {
  constexpr int W = 16 * V;
  constexpr int S = R * V >= 4 ? 1 : 4 / (R * V);
  __m512 acc[S][R][V];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[s][r][v] = _mm512_setzero_ps();
  int64_t b = b0;
  for (; b + S <= b1; b += S) {
    for (int s = 0; s < S; ++s) accumulate<R, V>(acc[s], panel, values, columns, b + s);
  }
  for (; b < b1; ++b) accumulate<R, V>(acc[0], panel, values, columns, b);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      __m512 a = acc[0][r][v];
      for (int s = 1; s < S; ++s) a = _mm512_add_ps(a, acc[s][r][v]);
      _mm512_store_ps(out + r * W + 16 * v, a);
    }
  }
}

// y[t][n0 + r] = rows[r][t] + bias[n0 + r] for r < nrows, t < tokens; rows is [16][16 V].
template <int V, typename T>
SPARSEBERT_AVX512 void store_rows(const float* rows, int64_t nrows, int64_t tokens, const T* bias, T* y,
                                  int64_t ldy) {
  constexpr int W = 16 * V;
  const __mmask16 m = first_lanes(nrows);
  const __m512 b = bias != nullptr ? load16(bias, m) : _mm512_setzero_ps();
  for (int t0 = 0; t0 < tokens; t0 += 16) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(rows + i * W + t0);
    transpose16(r);
    const int64_t tn = std::min<int64_t>(16, tokens - t0);
    for (int j = 0; j < tn; ++j) store16(y + (t0 + j) * ldy, _mm512_add_ps(r[j], b), m);
  }
}

template <int R, int V, typename T, typename Idx>
SPARSEBERT_AVX512 void tile(const Problem<T, Idx>& p, int64_t t0, int64_t tokens, int64_t n0, int64_t n1,
                            float* panel, bool pack, float* rows) {
  constexpr int W = 16 * V;
  if (pack) pack_panel<V>(p.x + t0 * p.ldx, p.ldx, tokens, p.in_features, panel);
  for (int64_t n = n0; n < n1; n += kOutRows) {
    const int64_t nrows = std::min<int64_t>(kOutRows, n1 - n);
    for (int64_t g = n / R; g < ceil_div(n + nrows, R); ++g) {
      block_row<R, V>(panel, p.values, p.columns, p.row_offsets[g], p.row_offsets[g + 1], rows + (g * R - n) * W);
    }
    store_rows<V>(rows, nrows, tokens, p.bias != nullptr ? p.bias + n : nullptr, p.y + t0 * p.out_features + n,
                  p.out_features);
  }
}

template <int R, typename T, typename Idx>
void run_tile(const Problem<T, Idx>& p, int64_t t0, int64_t tokens, int64_t n0, int64_t n1, float* panel, bool pack,
              float* rows) {
  switch (ceil_div(tokens, 16)) {
    case 1: return tile<R, 1>(p, t0, tokens, n0, n1, panel, pack, rows);
    case 2: return tile<R, 2>(p, t0, tokens, n0, n1, panel, pack, rows);
    case 3: return tile<R, 3>(p, t0, tokens, n0, n1, panel, pack, rows);
    default: return tile<R, 4>(p, t0, tokens, n0, n1, panel, pack, rows);
  }
}

}  // namespace avx512

// ---------------------------------------------------------------------------------------------
// Portable: the same tiling; the compiler vectorises the loops over the tile's tokens.

namespace portable {

template <int R, typename T, typename Idx>
__attribute__((target_clones("avx2", "default")))
void run_tile(const Problem<T, Idx>& p, int64_t t0, int64_t tokens, int64_t n0, int64_t n1, float* panel, bool pack,
              float* rows) {
  for (int64_t k = 0; pack && k < p.in_features; ++k) {
    for (int t = 0; t < kTile; ++t) {
      panel[k * kTile + t] = t < tokens ? static_cast<float>(p.x[(t0 + t) * p.ldx + k]) : 0.0f;
    }
  }
  for (int64_t g = n0 / R; g < n1 / R; ++g) {
    float* acc = rows;
    std::fill(acc, acc + R * kTile, 0.0f);
    for (int64_t b = p.row_offsets[g]; b < p.row_offsets[g + 1]; ++b) {
      const float* xp = panel + static_cast<int64_t>(p.columns[b]) * kTile;
      for (int r = 0; r < R; ++r) {
        const float w = static_cast<float>(p.values[b * R + r]);
        for (int t = 0; t < kTile; ++t) acc[r * kTile + t] += w * xp[t];
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t n = g * R + r;
      const float bias = p.bias != nullptr ? static_cast<float>(p.bias[n]) : 0.0f;
      for (int64_t t = 0; t < tokens; ++t) {
        p.y[(t0 + t) * p.out_features + n] = static_cast<T>(acc[r * kTile + t] + bias);
      }
    }
  }
}

}  // namespace portable

// ---------------------------------------------------------------------------------------------

bool use_avx512() {
  static const bool avx512 = at::get_cpu_capability() == "AVX512" && __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512dq");
  return avx512;
}

// The index arrays against x's in_features: a corrupt packed weight must not read out of bounds.
template <typename Idx>
__attribute__((target_clones("avx2", "default")))
void check_indices(const Idx* columns, int64_t nblocks, const int32_t* row_offsets, int64_t groups,
                   int64_t in_features) {
  TORCH_CHECK(row_offsets[0] == 0 && row_offsets[groups] == nblocks, "sparse_linear: row_offsets must run from 0 ",
              "to nblocks = ", nblocks, ", got ", row_offsets[0], " to ", row_offsets[groups]);
  bool monotone = true;
  for (int64_t g = 0; g < groups; ++g) monotone &= row_offsets[g] <= row_offsets[g + 1];
  TORCH_CHECK(monotone, "sparse_linear: row_offsets must be nondecreasing");
  Idx lo = 0, hi = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    lo = std::min(lo, columns[b]);
    hi = std::max(hi, columns[b]);
  }
  TORCH_CHECK(lo >= 0 && (nblocks == 0 || hi < in_features), "sparse_linear: columns must lie in [0, in_features = ",
              in_features, "), got values in [", static_cast<int64_t>(lo), ", ", static_cast<int64_t>(hi), "]");
}

// Tasks are (token tile, 128 output rows), taken in that order from a shared counter: a thread that starts
// late (a loaded machine) or meets denser rows leaves the rest to the others, and a thread repacks its
// panel only when its next task lies in another tile.
template <int R, typename T, typename Idx>
void sparse_linear_kernel(const Problem<T, Idx>& p, int64_t tokens) {
  constexpr int64_t kTaskRows = 8 * kOutRows;
  const int64_t chunks = ceil_div(p.out_features, kTaskRows);
  const int64_t tasks = ceil_div(tokens, kTile) * chunks;
  const bool avx512 = use_avx512();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    // One panel and one block of finished rows per thread, 64-byte aligned by the CPU allocator.
    const at::Tensor scratch = at::zeros({(p.in_features + kOutRows) * kTile}, at::kFloat);
    float* panel = scratch.mutable_data_ptr<float>();
    float* rows = panel + p.in_features * kTile;
    int64_t packed = -1;
    for (int64_t i = next++; i < tasks; i = next++) {
      const int64_t tile = i / chunks, n0 = i % chunks * kTaskRows;
      const int64_t t0 = tile * kTile, n_tokens = std::min<int64_t>(kTile, tokens - t0);
      const int64_t n1 = std::min(p.out_features, n0 + kTaskRows);
      if (avx512) {
        avx512::run_tile<R>(p, t0, n_tokens, n0, n1, panel, tile != packed, rows);
      } else {
        portable::run_tile<R>(p, t0, n_tokens, n0, n1, panel, tile != packed, rows);
      }
      packed = tile;
    }
  });
}

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& columns,
                             const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias) {
  const int64_t out_features = check_sparse_linear(x, values, columns, row_offsets, bias);
  const int64_t in_features = x.size(-1);
  const int64_t tokens = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  at::Tensor x2 = x.reshape({tokens, in_features});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor y = at::empty(shape, x.options());
  const auto run = [&](auto value_tag, auto index_tag) {
    using T = decltype(value_tag);
    using Idx = decltype(index_tag);
    const Problem<T, Idx> p{x2.const_data_ptr<T>(), x2.stride(0), values.const_data_ptr<T>(),
                            columns.const_data_ptr<Idx>(), row_offsets.const_data_ptr<int32_t>(),
                            b.defined() ? b.const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), in_features,
                            out_features};
    check_indices(p.columns, columns.numel(), p.row_offsets, row_offsets.numel() - 1, in_features);
    if (tokens == 0 || out_features == 0) return;
    if (sparse_block_rows(values) == 1) {
      sparse_linear_kernel<1>(p, tokens);
    } else {
      sparse_linear_kernel<4>(p, tokens);
    }
  };
  dispatch_sparse_types(x, columns, run);
  return y;
}

}  // namespace
}  // namespace sparsebert

TORCH_LIBRARY_IMPL(sparsebert, CPU, m) { m.impl("sparse_linear", &sparsebert::sparse_linear_cpu); }
