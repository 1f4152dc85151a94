// The memory traffic of an optimizer step with no arithmetic to speak of, for bench_optim.py --floor:
// what this machine's memory system allows a kernel that moves those bytes. AVX-512, float32, one flat
// tensor whose length is a multiple of 16; the mask packed as by sparsebert.ops.pack_mask (bit i of
// the 16-bit group j: element 16 j + i kept).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

namespace {

constexpr int64_t kGroups = 1024;  // groups of 16 per work item (16384 weights, as the real kernels)

// Keeps a loaded vector alive without any instruction.
inline void use(__m512& v) { asm volatile("" : "+v"(v)); }

const uint16_t* groups_of(const torch::Tensor& bits) { return reinterpret_cast<const uint16_t*>(bits.data_ptr<uint8_t>()); }

// Fused AdamW's bytes: weight, gradient and both moments read, weight and moments written.
void fused_traffic(torch::Tensor w, torch::Tensor g, torch::Tensor m, torch::Tensor v) {
  float *W = w.data_ptr<float>(), *G = g.data_ptr<float>(), *M = m.data_ptr<float>(), *V = v.data_ptr<float>();
  at::parallel_for(0, w.numel() / 16, kGroups, [&](int64_t begin, int64_t end) {
    for (int64_t i = 16 * begin; i < 16 * end; i += 16) {
      __m512 gi = _mm512_loadu_ps(G + i);
      _mm512_storeu_ps(M + i, _mm512_add_ps(_mm512_loadu_ps(M + i), gi));
      _mm512_storeu_ps(V + i, _mm512_add_ps(_mm512_loadu_ps(V + i), gi));
      _mm512_storeu_ps(W + i, _mm512_sub_ps(_mm512_loadu_ps(W + i), gi));
    }
  });
}

// The offset of each work item's first kept weight in compact state.
torch::Tensor compact_starts(torch::Tensor bits) {
  const uint16_t* B = groups_of(bits);
  int64_t items = bits.numel() / 2 / kGroups;
  torch::Tensor starts = torch::empty({items}, torch::kLong);
  int64_t* S = starts.data_ptr<int64_t>();
  int64_t at = 0;
  for (int64_t t = 0; t < items; ++t) {
    S[t] = at;
    for (int64_t j = t * kGroups; j < (t + 1) * kGroups; ++j) at += __builtin_popcount(B[j]);
  }
  return starts;
}

// A compact-state step's bytes: the weight and gradient lines read whole (only_kept: only the lines
// holding a kept weight), the kept weights stored (masked), and with state, both compact moments read
// and written in order.
void compact_traffic(torch::Tensor w, torch::Tensor g, torch::Tensor bits, torch::Tensor starts, torch::Tensor m,
                     torch::Tensor v, bool state, bool only_kept) {
  float *W = w.data_ptr<float>(), *G = g.data_ptr<float>(), *M = m.data_ptr<float>(), *V = v.data_ptr<float>();
  const uint16_t* B = groups_of(bits);
  const int64_t* S = starts.data_ptr<int64_t>();
  at::parallel_for(0, starts.numel(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t at = S[t];
      for (int64_t j = t * kGroups; j < (t + 1) * kGroups; ++j) {
        __mmask16 k = B[j];
        if (only_kept && !k) continue;
        __m512 wj = _mm512_loadu_ps(W + 16 * j), gj = _mm512_loadu_ps(G + 16 * j);
        use(wj);
        use(gj);
        if (state) {
          _mm512_storeu_ps(M + at, _mm512_add_ps(_mm512_loadu_ps(M + at), gj));
          _mm512_storeu_ps(V + at, _mm512_add_ps(_mm512_loadu_ps(V + at), gj));
          at += __builtin_popcount(k);
        }
        _mm512_mask_storeu_ps(W + 16 * j, k, _mm512_sub_ps(wj, gj));
      }
    }
  });
}

// Only the weight and gradient lines read.
void read_traffic(torch::Tensor w, torch::Tensor g) {
  const float *W = w.data_ptr<float>(), *G = g.data_ptr<float>();
  at::parallel_for(0, w.numel() / 16, kGroups, [&](int64_t begin, int64_t end) {
    for (int64_t i = 16 * begin; i < 16 * end; i += 16) {
      __m512 wi = _mm512_loadu_ps(W + i), gi = _mm512_loadu_ps(G + i);
      use(wi);
      use(gi);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_traffic", &fused_traffic);
  m.def("compact_starts", &compact_starts);
  m.def("compact_traffic", &compact_traffic);
  m.def("read_traffic", &read_traffic);
}
