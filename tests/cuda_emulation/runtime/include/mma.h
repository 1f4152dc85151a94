#pragma once
// nvcuda::wmma for the m16n16k16 shape: __half / __nv_bfloat16 matrix_a and matrix_b fragments
// and float accumulators. A fragment is per-thread; which tile elements a lane holds is left open
// by CUDA and is here element 32 e + lane (row-major) for e < num_elements, so code that assumes
// the hardware's mapping is caught. load/store/mma are warp collectives of all 32 lanes with the
// same arguments; pointers must be 256-bit aligned and ldm a multiple of 16 bytes, as in CUDA.
// mma_sync multiplies exactly (products of 16-bit floats fit float32) and accumulates in float32
// in k order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulated wmma has the m16n16k16 shape only");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                 : std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "the emulated wmma multiplies __half or __nv_bfloat16 into float accumulators");
  static_assert(std::is_same_v<Use, accumulator> == std::is_void_v<Layout>,
                "matrix_a / matrix_b fragments take row_major or col_major, accumulators no layout");

 public:
  static constexpr int num_elements = 8;
  T x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& value) {
  for (T& v : f.x) v = value;
}

namespace detail {

constexpr unsigned kWarp = 0xffffffffu;

// Tile element of lane `lane`'s fragment element e, and its offset in memory.
inline int tile_index(int lane, int e) { return 32 * e + lane; }
inline int64_t offset(int index, unsigned ldm, bool col_major) {
  const int r = index / 16, c = index % 16;
  return col_major ? r + static_cast<int64_t>(c) * ldm : static_cast<int64_t>(r) * ldm + c;
}

template <class T>
struct MemIn {
  T* memory;
  T* frag;
  unsigned ldm;
  bool col_major;
};

template <class T, bool kStore>
void mem_combine(const void* const* ins, void* const*, unsigned, emu::Loc loc) {
  const auto& first = *static_cast<const MemIn<T>*>(ins[0]);
  const char* op = kStore ? "wmma::store_matrix_sync" : "wmma::load_matrix_sync";
  for (int lane = 1; lane < 32; ++lane) {
    const auto& in = *static_cast<const MemIn<T>*>(ins[lane]);
    if (in.memory != first.memory || in.ldm != first.ldm || in.col_major != first.col_major) {
      emu::fault(std::string(op) + ": the lanes of a warp pass different pointers, ldm or layouts", loc);
    }
  }
  if (reinterpret_cast<uintptr_t>(first.memory) % 32 != 0) {
    emu::fault(std::string(op) + ": the pointer is not 256-bit aligned", loc);
  }
  if (first.ldm * sizeof(T) % 16 != 0) {
    emu::fault(std::string(op) + ": ldm = " + std::to_string(first.ldm) + " elements is not a multiple of 16 bytes",
               loc);
  }
  for (int lane = 0; lane < 32; ++lane) {
    T* frag = static_cast<const MemIn<T>*>(ins[lane])->frag;
    for (int e = 0; e < 8; ++e) {
      T& m = first.memory[offset(tile_index(lane, e), first.ldm, first.col_major)];
      if (kStore) {
        m = frag[e];
      } else {
        frag[e] = m;
      }
    }
  }
}

template <class T>
void load(T* frag, const T* memory, unsigned ldm, bool col_major, emu::Loc loc) {
  const MemIn<T> in{const_cast<T*>(memory), frag, ldm, col_major};
  emu::warp_collective("wmma::load_matrix_sync", kWarp, &in, nullptr, &mem_combine<T, false>, loc);
}

template <class T>
struct MmaIn {
  const T* a;
  const T* b;
  const float* c;
  float* d;
};

template <class T>
void mma_combine(const void* const* ins, void* const*, unsigned, emu::Loc) {
  float a[256], b[256], c[256];
  for (int lane = 0; lane < 32; ++lane) {
    const auto& in = *static_cast<const MmaIn<T>*>(ins[lane]);
    for (int e = 0; e < 8; ++e) {
      const int i = tile_index(lane, e);
      a[i] = static_cast<float>(in.a[e]);
      b[i] = static_cast<float>(in.b[e]);
      c[i] = in.c[e];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const auto& in = *static_cast<const MmaIn<T>*>(ins[lane]);
    for (int e = 0; e < 8; ++e) {
      const int i = tile_index(lane, e), r = i / 16, col = i % 16;
      float acc = c[i];
      for (int k = 0; k < 16; ++k) acc += a[r * 16 + k] * b[k * 16 + col];
      in.d[e] = acc;
    }
  }
}

}  // namespace detail

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm,
                      emu::Loc loc = emu::Loc::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators load with a layout_t");
  detail::load(f.x, p, ldm, std::is_same_v<Layout, col_major>, loc);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout, emu::Loc loc = emu::Loc::current()) {
  detail::load(f.x, p, ldm, layout == mem_col_major, loc);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout, emu::Loc loc = emu::Loc::current()) {
  const detail::MemIn<float> in{p, const_cast<float*>(f.x), ldm, layout == mem_col_major};
  emu::warp_collective("wmma::store_matrix_sync", detail::kWarp, &in, nullptr, &detail::mem_combine<float, true>, loc);
}

template <class T, class LayoutA, class LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
              emu::Loc loc = emu::Loc::current()) {
  const detail::MmaIn<T> in{a.x, b.x, c.x, d.x};
  emu::warp_collective("wmma::mma_sync", detail::kWarp, &in, nullptr, &detail::mma_combine<T>, loc);
}

}  // namespace nvcuda::wmma
