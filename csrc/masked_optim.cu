// CUDA kernels of masked_adamw_ and masked_sgd_.
//
// One multi-tensor launch per pass: the tensors' pointers and shapes and the flat chunk list
// (masked_optim.h) travel in one device buffer; one block takes one chunk at a time. Before
// the update kernel, and only when asked for, come the read-only passes whose verdict the host
// needs before anything is written: the NaN/Inf check of the gradients (check_finite) and the
// popcount of every chunk of a mask (compact mode: state lengths, and each chunk's state
// offset by a scan). Each costs one device-to-host synchronization.
#include "masked_optim.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

namespace sparsebert::optim {
namespace {

constexpr int kThreads = 256;  // a multiple of 32: the compact scan ballots over full warps
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // blocks loop over the chunks beyond

struct TensorMeta {
  void* param;
  const void* grad;
  void* state[2];        // null past the op's number of state tensors
  const uint8_t* mask;   // null: dense parameter
  int64_t cols;          // last dimension (masked tensors)
  int64_t packed_cols;   // bytes per mask row
  int64_t first_chunk;   // index of the tensor's first chunk in the flat list
};
static_assert(sizeof(TensorMeta) % alignof(Chunk) == 0 && alignof(TensorMeta) == alignof(Chunk));

// Whether flat element e of tensor t is kept (t.mask is not null). When rows are whole bytes
// (cols % 8 == 0, so packed_cols * 8 == cols) the mask is one bit per flat element.
__device__ __forceinline__ bool kept(const TensorMeta& t, int64_t e) {
  if (t.packed_cols * 8 == t.cols) return (t.mask[e >> 3] >> (e & 7)) & 1;
  const int64_t row = e / t.cols;
  const int64_t col = e - row * t.cols;
  return mask_bit(t.mask + row * t.packed_cols, col);
}

// Exclusive prefix count of `flag` over the block, in thread order; `total` gets the count of
// the whole block. Every thread of the block must call it (it synchronizes).
__device__ __forceinline__ int block_exclusive_count(bool flag, int* warp_counts, int& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int rank = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int count = warp_counts[w];
    before += w < warp ? count : 0;
    total += count;
  }
  __syncthreads();  // warp_counts is rewritten by the next call
  return before + rank;
}

template <class Op, typename P, typename S>
__global__ void __launch_bounds__(kThreads)
    step_kernel(const TensorMeta* tensors, const Chunk* chunks, int64_t num_chunks, const int64_t* kept_before,
                bool compact, Op op) {
  using O = at::opmath_type<P>;
  __shared__ int warp_counts[kWarps];
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const Chunk chunk = chunks[c];
    const TensorMeta t = tensors[chunk.tensor];
    P* p = static_cast<P*>(t.param);
    const P* g = static_cast<const P*>(t.grad);
    S* s0 = static_cast<S*>(t.state[0]);
    S* s1 = static_cast<S*>(t.state[1]);
    if (compact && t.mask != nullptr) {
      // State index of the first kept weight of this chunk; pruned weights are not touched.
      int64_t next = kept_before[c] - kept_before[t.first_chunk];
      for (int64_t base = chunk.begin; base < chunk.end; base += kThreads) {
        const int64_t e = base + threadIdx.x;
        const bool keep = e < chunk.end && kept(t, e);
        int total;
        const int64_t k = next + block_exclusive_count(keep, warp_counts, total);
        if (keep) {
          O pk = static_cast<O>(p[e]);
          O s[2] = {O(0), O(0)};
          if constexpr (Op::kStates > 0) s[0] = static_cast<O>(s0[k]);
          if constexpr (Op::kStates > 1) s[1] = static_cast<O>(s1[k]);
          op(pk, static_cast<O>(g[e]), s);
          p[e] = static_cast<P>(pk);
          if constexpr (Op::kStates > 0) s0[k] = static_cast<S>(s[0]);
          if constexpr (Op::kStates > 1) s1[k] = static_cast<S>(s[1]);
        }
        next += total;
      }
    } else {
      // Dense state: pruned weights and their state are written 0, whatever the update computed
      // from their (ignored, possibly NaN) gradient.
      for (int64_t e = chunk.begin + threadIdx.x; e < chunk.end; e += kThreads) {
        const bool keep = t.mask == nullptr || kept(t, e);
        O pk = static_cast<O>(p[e]);
        O s[2] = {O(0), O(0)};
        if constexpr (Op::kStates > 0) s[0] = static_cast<O>(s0[e]);
        if constexpr (Op::kStates > 1) s[1] = static_cast<O>(s1[e]);
        op(pk, static_cast<O>(g[e]), s);
        p[e] = static_cast<P>(keep ? pk : O(0));
        if constexpr (Op::kStates > 0) s0[e] = static_cast<S>(keep ? s[0] : O(0));
        if constexpr (Op::kStates > 1) s1[e] = static_cast<S>(keep ? s[1] : O(0));
      }
    }
  }
}

// counts[c] = number of kept elements in chunk c (0 for dense tensors).
__global__ void __launch_bounds__(kThreads)
    count_kept_kernel(const TensorMeta* tensors, const Chunk* chunks, int64_t num_chunks, int64_t* counts) {
  __shared__ int warp_counts[kWarps];
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const Chunk chunk = chunks[c];
    const TensorMeta t = tensors[chunk.tensor];
    int local = 0;
    if (t.mask != nullptr) {
      if (t.packed_cols * 8 == t.cols) {
        // Chunk bounds are multiples of 8 and so is numel: whole mask bytes.
        for (int64_t b = (chunk.begin >> 3) + threadIdx.x; b < (chunk.end >> 3); b += kThreads) local += __popc(t.mask[b]);
      } else {
        for (int64_t e = chunk.begin + threadIdx.x; e < chunk.end; e += kThreads) local += kept(t, e);
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) local += __shfl_down_sync(0xffffffffu, local, offset);
    if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x >> 5] = local;
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += warp_counts[w];
      counts[c] = sum;
    }
    __syncthreads();
  }
}

// flags[i] = 1 if grads[i] holds NaN or Inf at a kept position.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    find_nonfinite_kernel(const TensorMeta* tensors, const Chunk* chunks, int64_t num_chunks, int* flags) {
  using O = at::opmath_type<P>;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const Chunk chunk = chunks[c];
    const TensorMeta t = tensors[chunk.tensor];
    const P* g = static_cast<const P*>(t.grad);
    bool bad = false;
    for (int64_t e = chunk.begin + threadIdx.x; e < chunk.end; e += kThreads) {
      bad = bad || ((t.mask == nullptr || kept(t, e)) && !isfinite(static_cast<O>(g[e])));
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(flags + chunk.tensor, 1);
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<S>{}) with the state type: float for half/bfloat16 params with float32
// state, else the params' type (check_step_args allows nothing else).
template <typename P, class F>
void with_state_type(at::ScalarType state_dtype, F&& f) {
  if constexpr (std::is_same_v<P, at::Half> || std::is_same_v<P, at::BFloat16>) {
    if (state_dtype == at::kFloat) return f(TypeTag<float>{});
  }
  f(TypeTag<P>{});
}

template <typename P, typename S, class Op>
void run_step(const char* name, const Op& op, at::TensorList params, at::TensorList grads,
              const std::vector<StateList>& states, const c10::List<std::optional<at::Tensor>>& masks, bool compact,
              bool check_finite) {
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t n = params.size();

  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = plan_chunks(params, &first_chunk);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  std::vector<TensorMeta> metas(n);
  bool any_masked = false;
  for (size_t i = 0; i < n; ++i) {
    TensorMeta& t = metas[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    for (size_t s = 0; s < 2; ++s) {
      t.state[s] = s < states.size() && !states[s].tensors.empty() ? states[s].tensors[i].data_ptr() : nullptr;
    }
    t.mask = nullptr;
    t.cols = params[i].dim() > 0 ? params[i].size(-1) : 1;
    t.packed_cols = packed_cols(t.cols);
    t.first_chunk = first_chunk[i];
    if (is_masked(masks, i)) {
      t.mask = masks.get(i)->const_data_ptr<uint8_t>();
      any_masked = true;
    }
  }
  std::vector<int64_t> kept(n, 0);
  if (num_chunks == 0) {  // only empty tensors: nothing to update, but the state lengths must be 0
    if (compact) check_compact_lengths(name, states, masks, kept);
    return;
  }

  // One pinned buffer, copied asynchronously (the caching host allocator keeps it alive until
  // the copy has run): [TensorMeta x n | Chunk x num_chunks].
  const size_t meta_bytes = n * sizeof(TensorMeta);
  const size_t chunk_bytes = chunks.size() * sizeof(Chunk);
  at::Tensor host = at::empty({static_cast<int64_t>(meta_bytes + chunk_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), metas.data(), meta_bytes);
  std::memcpy(host.data_ptr<uint8_t>() + meta_bytes, chunks.data(), chunk_bytes);
  const at::Tensor table = host.to(device, at::kByte, /*non_blocking=*/true);
  const auto* d_tensors = reinterpret_cast<const TensorMeta*>(table.const_data_ptr<uint8_t>());
  const auto* d_chunks = reinterpret_cast<const Chunk*>(table.const_data_ptr<uint8_t>() + meta_bytes);
  const int blocks = static_cast<int>(std::min(num_chunks, kMaxBlocks));

  if (check_finite) {
    const at::Tensor flags = at::zeros({static_cast<int64_t>(n)}, params[0].options().dtype(at::kInt));
    find_nonfinite_kernel<P><<<blocks, kThreads, 0, stream>>>(d_tensors, d_chunks, num_chunks, flags.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor host_flags = flags.cpu();
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(host_flags.const_data_ptr<int>()[i] == 0, name, ": grads[", i, "] contains NaN or Inf",
                  metas[i].mask != nullptr ? " at a kept position" : "", "; nothing was updated (check_finite=True)");
    }
  }

  at::Tensor kept_before;
  if (compact && any_masked) {
    const at::Tensor counts = at::empty({num_chunks}, params[0].options().dtype(at::kLong));
    count_kept_kernel<<<blocks, kThreads, 0, stream>>>(d_tensors, d_chunks, num_chunks, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor inclusive = at::cumsum(counts, 0);
    kept_before = inclusive.sub(counts);
    const at::Tensor host_inclusive = inclusive.cpu();
    const int64_t* incl = host_inclusive.const_data_ptr<int64_t>();
    for (size_t i = 0; i < n; ++i) {
      const int64_t first = first_chunk[i];
      const int64_t end = i + 1 < n ? first_chunk[i + 1] : num_chunks;
      if (end > first) kept[i] = incl[end - 1] - (first > 0 ? incl[first - 1] : 0);
    }
    check_compact_lengths(name, states, masks, kept);
  }

  step_kernel<Op, P, S><<<blocks, kThreads, 0, stream>>>(
      d_tensors, d_chunks, num_chunks, kept_before.defined() ? kept_before.const_data_ptr<int64_t>() : nullptr,
      compact, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& masks, int64_t step,
                       double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize,
                       bool compact, bool check_finite) {
  const char* name = "masked_adamw_";
  const std::vector<StateList> states =
      checked_adamw_states(params, grads, exp_avgs, exp_avg_sqs, masks, step, compact, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, true);
  if (params.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "masked_adamw_cuda", [&] {
    using P = scalar_t;
    using O = at::opmath_type<P>;
    with_state_type<P>(exp_avgs[0].scalar_type(), [&](auto tag) {
      using S = typename decltype(tag)::type;
      run_step<P, S>(name, make_adamw<O>(step, lr, beta1, beta2, eps, weight_decay, maximize), params, grads, states,
                     masks, compact, check_finite);
    });
  });
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     const c10::List<std::optional<at::Tensor>>& masks, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool first_step, bool maximize, bool compact,
                     bool check_finite) {
  const char* name = "masked_sgd_";
  const bool has_momentum = momentum != 0.0;
  const std::vector<StateList> states =
      checked_sgd_states(params, grads, momentum_buffers, masks, momentum, compact, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, true);
  if (params.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "masked_sgd_cuda", [&] {
    using P = scalar_t;
    using O = at::opmath_type<P>;
    if (has_momentum) {
      with_state_type<P>(momentum_buffers[0].scalar_type(), [&](auto tag) {
        using S = typename decltype(tag)::type;
        run_step<P, S>(name, make_sgd<O, true>(lr, momentum, dampening, weight_decay, nesterov, first_step, maximize),
                       params, grads, states, masks, compact, check_finite);
      });
    } else {
      run_step<P, P>(name, make_sgd<O, false>(lr, momentum, dampening, weight_decay, nesterov, first_step, maximize),
                     params, grads, {}, masks, compact, check_finite);
    }
  });
}

}  // namespace
}  // namespace sparsebert::optim

TORCH_LIBRARY_IMPL(sparsebert, CUDA, m) {
  m.impl("masked_adamw_", &sparsebert::optim::masked_adamw_cuda);
  m.impl("masked_sgd_", &sparsebert::optim::masked_sgd_cuda);
}
