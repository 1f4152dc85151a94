#pragma once
// CUDA on the CPU: what nvcc makes available to every .cu file, for g++. The build force-includes
// this header (-include cuda_runtime.h), as nvcc implicitly includes the real one.
//
// Every CUDA thread runs as a fiber of the runtime (runtime.cpp); a fiber gives up the CPU only at
// a block barrier or a warp collective, where the runtime checks the arrival rules and picks the
// next fiber by the schedule. Sites (std::source_location) point at the .cu line that called.
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
typedef enum cudaError cudaError_t;

const char* cudaGetErrorString(cudaError_t error);
// The error of the last launch on this host thread (a bad launch configuration), then cleared.
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
// Kernels run to completion inside their launch: there is never anything to wait for.
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

constexpr int warpSize = 32;

namespace emu {

using Loc = std::source_location;

// A kernel error: raised inside a CUDA thread, reported with the thread, block and launch.
[[noreturn]] void fault(const std::string& what, Loc loc);

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
// x + y * blockDim.x + z * blockDim.x * blockDim.y: lane = linear % 32, warp = linear / 32.
int linear_thread();

enum class BarrierKind { kSync, kOr, kAnd, kCount };
// Waits until every thread of the block is at this barrier (same site); returns the reduction
// of the predicates for the _or/_and/_count kinds.
int barrier(BarrierKind kind, int predicate, Loc loc);

// A warp collective: every lane named in `mask` arrives with the same `op` and mask; the last to
// arrive runs combine(ins, outs, mask, loc) for all of them, ins/outs indexed by lane (null
// outside mask). Each lane's `in` and `out` stay valid: the lanes wait inside this call.
using Combine = void (*)(const void* const* ins, void* const* outs, unsigned mask, Loc loc);
void warp_collective(const char* op, unsigned mask, const void* in, void* out, Combine combine, Loc loc);

// The launch's dynamic shared memory (extern __shared__), garbage at the start of every block.
void* dynamic_shared();
// Called where a static __shared__ variable is declared: the first thread of a block to pass
// it fills it with garbage and counts it against the block's shared-memory limit.
void shared_variable(void* address, size_t bytes, Loc loc = Loc::current());

struct LaunchSite {
  const char* kernel;  // the launch expression, as written
  Loc loc;
};
void run_grid(const LaunchSite& site, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
              const std::function<void()>& thread_body);

// Kernel parameters are converted as a call would (implicitly), and every thread gets a copy.
template <class T>
T implicit(T value) {
  return value;
}

template <class... P>
class Launcher {
 public:
  Launcher(LaunchSite site, void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream)
      : site_(site), kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes), stream_(stream) {}

  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    const std::tuple<P...> params(implicit<P>(std::forward<A>(args))...);
    run_grid(site_, grid_, block_, shared_bytes_, stream_, [&] {
      std::tuple<P...> mine = params;
      std::apply(kernel_, mine);
    });
  }

 private:
  LaunchSite site_;
  void (*kernel_)(P...);
  dim3 grid_, block_;
  size_t shared_bytes_;
  cudaStream_t stream_;
};

// kernel<<<grid, block, shared, stream>>>(args) is rewritten to launch(...)(args).
template <class... P>
Launcher<P...> launch(const char* name, Loc loc, void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes = 0,
                      cudaStream_t stream = nullptr) {
  return Launcher<P...>(LaunchSite{name, loc}, kernel, grid, block, shared_bytes, stream);
}

template <class T>
T* dynamic_shared_as() {
  return static_cast<T*>(dynamic_shared());
}

namespace detail {

enum class Shfl { kIdx, kUp, kDown, kXor };

template <class T>
struct ShflIn {
  T value;
  int arg;  // source lane, delta or lane mask
  int width;
};

template <class T, Shfl kMode>
void shfl_combine(const void* const* ins, void* const* outs, unsigned mask, Loc loc) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    const auto& in = *static_cast<const ShflIn<T>*>(ins[lane]);
    const int w = in.width;
    if (w < 1 || w > 32 || (w & (w - 1)) != 0) fault("shuffle width " + std::to_string(w) + " is not a power of 2 in [1, 32]", loc);
    const int first = lane & ~(w - 1);
    int src = lane;
    switch (kMode) {
      case Shfl::kIdx: src = first + (in.arg & (w - 1)); break;
      case Shfl::kUp: src = lane - in.arg >= first ? lane - in.arg : lane; break;
      case Shfl::kDown: src = lane + in.arg < first + w ? lane + in.arg : lane; break;
      case Shfl::kXor: src = (lane ^ in.arg) >= first && (lane ^ in.arg) < first + w ? lane ^ in.arg : lane; break;
    }
    if (!(mask >> src & 1u)) {
      fault("lane " + std::to_string(lane) + " shuffles from lane " + std::to_string(src) +
                ", which is not in the mask (the value would be undefined)",
            loc);
    }
    *static_cast<T*>(outs[lane]) = static_cast<const ShflIn<T>*>(ins[src])->value;
  }
}

template <class T, Shfl kMode>
T shfl(const char* op, unsigned mask, T var, int arg, int width, Loc loc) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  const ShflIn<T> in{var, arg, width};
  T out{};
  warp_collective(op, mask, &in, &out, &shfl_combine<T, kMode>, loc);
  return out;
}

void vote(const char* op, unsigned mask, int predicate, Loc loc, unsigned* ballot);

}  // namespace detail
}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads(emu::Loc loc = emu::Loc::current()) { emu::barrier(emu::BarrierKind::kSync, 0, loc); }
inline int __syncthreads_or(int p, emu::Loc loc = emu::Loc::current()) { return emu::barrier(emu::BarrierKind::kOr, p, loc); }
inline int __syncthreads_and(int p, emu::Loc loc = emu::Loc::current()) { return emu::barrier(emu::BarrierKind::kAnd, p, loc); }
inline int __syncthreads_count(int p, emu::Loc loc = emu::Loc::current()) {
  return emu::barrier(emu::BarrierKind::kCount, p, loc);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, emu::Loc loc = emu::Loc::current()) {
  emu::detail::vote("__syncwarp", mask, 0, loc, nullptr);
}
inline unsigned __ballot_sync(unsigned mask, int p, emu::Loc loc = emu::Loc::current()) {
  unsigned ballot = 0;
  emu::detail::vote("__ballot_sync", mask, p, loc, &ballot);
  return ballot;
}
inline int __any_sync(unsigned mask, int p, emu::Loc loc = emu::Loc::current()) {
  unsigned ballot = 0;
  emu::detail::vote("__any_sync", mask, p, loc, &ballot);
  return ballot != 0;
}
inline int __all_sync(unsigned mask, int p, emu::Loc loc = emu::Loc::current()) {
  unsigned ballot = 0;
  emu::detail::vote("__all_sync", mask, p, loc, &ballot);
  return ballot == mask;
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, emu::Loc loc = emu::Loc::current()) {
  return emu::detail::shfl<T, emu::detail::Shfl::kIdx>("__shfl_sync", mask, var, src_lane, width, loc);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, emu::Loc loc = emu::Loc::current()) {
  return emu::detail::shfl<T, emu::detail::Shfl::kUp>("__shfl_up_sync", mask, var, static_cast<int>(delta), width, loc);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, emu::Loc loc = emu::Loc::current()) {
  return emu::detail::shfl<T, emu::detail::Shfl::kDown>("__shfl_down_sync", mask, var, static_cast<int>(delta), width,
                                                         loc);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, emu::Loc loc = emu::Loc::current()) {
  return emu::detail::shfl<T, emu::detail::Shfl::kXor>("__shfl_xor_sync", mask, var, lane_mask, width, loc);
}

// Atomics: CUDA's overload set. One fiber runs at a time, so a read-modify-write is atomic.
#define EMU_ATOMIC(name, T, expr)    \
  inline T name(T* address, T val) { \
    const T old = *address;          \
    *address = (expr);               \
    return old;                      \
  }
EMU_ATOMIC(atomicAdd, int, old + val)
EMU_ATOMIC(atomicAdd, unsigned int, old + val)
EMU_ATOMIC(atomicAdd, unsigned long long, old + val)
EMU_ATOMIC(atomicAdd, float, old + val)
EMU_ATOMIC(atomicAdd, double, old + val)
EMU_ATOMIC(atomicSub, int, old - val)
EMU_ATOMIC(atomicSub, unsigned int, old - val)
EMU_ATOMIC(atomicOr, int, old | val)
EMU_ATOMIC(atomicOr, unsigned int, old | val)
EMU_ATOMIC(atomicOr, unsigned long long, old | val)
EMU_ATOMIC(atomicAnd, int, old & val)
EMU_ATOMIC(atomicAnd, unsigned int, old & val)
EMU_ATOMIC(atomicAnd, unsigned long long, old & val)
EMU_ATOMIC(atomicXor, int, old ^ val)
EMU_ATOMIC(atomicXor, unsigned int, old ^ val)
EMU_ATOMIC(atomicXor, unsigned long long, old ^ val)
EMU_ATOMIC(atomicMax, int, old < val ? val : old)
EMU_ATOMIC(atomicMax, unsigned int, old < val ? val : old)
EMU_ATOMIC(atomicMax, long long, old < val ? val : old)
EMU_ATOMIC(atomicMax, unsigned long long, old < val ? val : old)
EMU_ATOMIC(atomicMin, int, val < old ? val : old)
EMU_ATOMIC(atomicMin, unsigned int, val < old ? val : old)
EMU_ATOMIC(atomicMin, long long, val < old ? val : old)
EMU_ATOMIC(atomicMin, unsigned long long, val < old ? val : old)
EMU_ATOMIC(atomicExch, int, val)
EMU_ATOMIC(atomicExch, unsigned int, val)
EMU_ATOMIC(atomicExch, unsigned long long, val)
EMU_ATOMIC(atomicExch, float, val)
#undef EMU_ATOMIC

#define EMU_ATOMIC_CAS(T)                                  \
  inline T atomicCAS(T* address, T compare, T val) {       \
    const T old = *address;                                \
    if (old == compare) *address = val;                    \
    return old;                                            \
  }
EMU_ATOMIC_CAS(int)
EMU_ATOMIC_CAS(unsigned int)
EMU_ATOMIC_CAS(unsigned long long)
EMU_ATOMIC_CAS(unsigned short)
#undef EMU_ATOMIC_CAS

// Only one fiber runs at a time and memory is the host's: fences have nothing to order.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

[[noreturn]] inline void __trap(emu::Loc loc = emu::Loc::current()) { emu::fault("__trap()", loc); }
// CUDA_KERNEL_ASSERT, as the rewrite renames it: a GPU reports "device-side assert triggered".
#define EMU_KERNEL_ASSERT(cond) \
  if (!(cond)) ::emu::fault("device-side assert CUDA_KERNEL_ASSERT(" #cond ") failed", ::emu::Loc::current())

template <class T>
T __ldg(const T* p) {
  return *p;
}

inline int __popc(unsigned int x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}

inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

// Device code calls the math functions unqualified, as C does.
using std::isfinite;
using std::isinf;
using std::isnan;
