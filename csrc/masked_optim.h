#pragma once
// Shared by the CPU and CUDA kernels of masked_adamw_ / masked_sgd_: the per-element update
// rules (defined once, so both devices compute the same thing), the argument checks and the
// chunk plan of the multi-tensor launch.
#include "common.h"

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace sparsebert::optim {

SPARSEBERT_HOST_DEVICE float opmath_sqrt(float x) { return sqrtf(x); }
SPARSEBERT_HOST_DEVICE double opmath_sqrt(double x) { return sqrt(x); }

// torch.optim.AdamW (decoupled weight decay), operation for operation in the order of its
// single-tensor path, so that results agree with it to the rounding of fused multiply-adds.
// T is the math type (float for float/half/bfloat16 parameters, double for double). The
// rules are templates over the value type V, T or (CPU) a vector of T whose operations act
// lane by lane, so that a vector loop computes bit for bit what a scalar loop does.
template <typename T>
struct AdamWUpdate {
  static constexpr int kStates = 2;  // exp_avg, exp_avg_sq
  T grad_sign, decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;

  template <typename V>
  SPARSEBERT_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    g = g * grad_sign;
    p = p * decay;
    s[0] = s[0] + one_minus_beta1 * (g - s[0]);    // exp_avg.lerp_(grad, 1 - beta1)
    s[1] = s[1] * beta2 + one_minus_beta2 * g * g;  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    const V denom = opmath_sqrt(s[1]) / bias_correction2_sqrt + eps;
    p = p + neg_step_size * s[0] / denom;  // param.addcdiv_(exp_avg, denom, -step_size)
  }
};

template <typename T>
inline AdamWUpdate<T> make_adamw(int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                                 bool maximize) {
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return AdamWUpdate<T>{static_cast<T>(maximize ? -1.0 : 1.0),
                        static_cast<T>(1.0 - lr * weight_decay),
                        static_cast<T>(1.0 - beta1),
                        static_cast<T>(beta2),
                        static_cast<T>(1.0 - beta2),
                        static_cast<T>(std::sqrt(bias_correction2)),
                        static_cast<T>(eps),
                        static_cast<T>(-(lr / bias_correction1))};
}

// torch.optim.SGD, operation for operation. Without momentum there is no buffer (kStates 0).
template <typename T, bool kMomentum>
struct SgdUpdate {
  static constexpr int kStates = kMomentum ? 1 : 0;  // momentum_buffer
  T grad_sign, weight_decay, momentum, one_minus_dampening, neg_lr;
  bool nesterov, first_step;

  template <typename V>
  SPARSEBERT_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    g = g * grad_sign;
    if (weight_decay != T(0)) g = g + weight_decay * p;  // grad.add(param, alpha=weight_decay)
    if constexpr (kMomentum) {
      // torch clones the (decayed) gradient into a new buffer on the first step.
      s[0] = first_step ? g : s[0] * momentum + one_minus_dampening * g;
      g = nesterov ? g + momentum * s[0] : s[0];
    }
    p = p + neg_lr * g;
  }
};

template <typename T, bool kMomentum>
inline SgdUpdate<T, kMomentum> make_sgd(double lr, double momentum, double dampening, double weight_decay,
                                        bool nesterov, bool first_step, bool maximize) {
  return SgdUpdate<T, kMomentum>{static_cast<T>(maximize ? -1.0 : 1.0), static_cast<T>(weight_decay),
                                 static_cast<T>(momentum),         static_cast<T>(1.0 - dampening),
                                 static_cast<T>(-lr),              nesterov,
                                 first_step};
}

// Elements per work item of the multi-tensor launch (a multiple of 8). Every tensor is cut
// into chunks of this many elements, and all chunks of all tensors form one flat work list,
// so that a list of small tensors (biases, LayerNorm) does not serialize.
constexpr int64_t kChunkElems = 16384;

struct Chunk {
  int64_t tensor;
  int64_t begin;  // flat element range [begin, end) of that tensor
  int64_t end;
};

inline std::vector<Chunk> plan_chunks(at::TensorList params, std::vector<int64_t>* first_chunk = nullptr) {
  std::vector<Chunk> chunks;
  if (first_chunk != nullptr) first_chunk->assign(params.size(), 0);
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (first_chunk != nullptr) (*first_chunk)[i] = static_cast<int64_t>(chunks.size());
    for (int64_t b = 0; b < numel; b += kChunkElems) {
      chunks.push_back({static_cast<int64_t>(i), b, std::min(b + kChunkElems, numel)});
    }
  }
  return chunks;
}

// Every check that can be made without reading tensor data, all before any write. The
// state lists are given with their argument names; a state list may be empty only where
// `optional_state` says so (SGD without momentum). Compact state lengths are checked by the
// kernels' callers once the masks are counted (also before any write).
struct StateList {
  const char* name;
  at::TensorList tensors;
};

inline void check_step_args(const char* op, at::TensorList params, at::TensorList grads,
                            c10::ArrayRef<StateList> states, bool states_may_be_empty,
                            const c10::List<std::optional<at::Tensor>>& masks, bool compact,
                            std::initializer_list<at::ScalarType> param_dtypes, bool allow_float_state) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(masks.size() == n, op, ": got ", n, " params but ", masks.size(), " masks (use None for a dense parameter)");
  for (const StateList& s : states) {
    TORCH_CHECK(s.tensors.size() == n || (states_may_be_empty && s.tensors.empty()), op, ": got ", n, " params but ",
                s.tensors.size(), " ", s.name);
  }
  if (n == 0) return;
  TORCH_CHECK(params[0].defined(), op, ": params[0] is undefined");
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  bool dtype_ok = false;
  for (at::ScalarType t : param_dtypes) dtype_ok = dtype_ok || t == dtype;
  TORCH_CHECK(dtype_ok, op, ": params of dtype ", dtype, " are not supported on ", device.type(),
              " (supported: ", c10::ArrayRef<at::ScalarType>(param_dtypes), ")");
  std::optional<at::ScalarType> state_dtype;
  for (const StateList& s : states) {
    if (!s.tensors.empty()) {
      TORCH_CHECK(s.tensors[0].defined(), op, ": ", s.name, "[0] is undefined");
      state_dtype = s.tensors[0].scalar_type();
      break;
    }
  }
  if (state_dtype) {
    const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
    TORCH_CHECK(*state_dtype == dtype || (allow_float_state && reduced && *state_dtype == at::kFloat), op,
                ": optimizer state of dtype ", *state_dtype, " does not fit params of dtype ", dtype,
                allow_float_state ? " (expected the params' dtype, or float32 for half/bfloat16 params)"
                                  : " (expected the params' dtype)");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(), " but params[0] is on ", device);
    TORCH_CHECK(p.scalar_type() == dtype, op, ": params[", i, "] has dtype ", p.scalar_type(), " but params[0] has ",
                dtype, " (call once per dtype)");
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined");
    TORCH_CHECK(g.device() == device, op, ": grads[", i, "] is on ", g.device(), " but params[", i, "] is on ", device);
    TORCH_CHECK(g.scalar_type() == dtype, op, ": grads[", i, "] has dtype ", g.scalar_type(), " but params[", i,
                "] has ", dtype);
    TORCH_CHECK(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(), " but params[", i,
                "] has shape ", p.sizes());
    TORCH_CHECK(g.is_contiguous(), op, ": grads[", i, "] must be contiguous");
    const std::optional<at::Tensor> mask = masks.get(i);
    const bool masked = mask.has_value() && mask->defined();
    if (masked) {
      const std::string name = std::string(op) + ": masks[" + std::to_string(i) + "]";
      check_packed_mask(*mask, p, name.c_str());
    }
    for (const StateList& s : states) {
      if (s.tensors.empty()) continue;
      const at::Tensor& t = s.tensors[i];
      TORCH_CHECK(t.defined(), op, ": ", s.name, "[", i, "] is undefined");
      TORCH_CHECK(t.device() == device, op, ": ", s.name, "[", i, "] is on ", t.device(), " but params[", i,
                  "] is on ", device);
      TORCH_CHECK(t.scalar_type() == *state_dtype, op, ": ", s.name, "[", i, "] has dtype ", t.scalar_type(),
                  " but the other optimizer state has ", *state_dtype);
      TORCH_CHECK(t.is_contiguous(), op, ": ", s.name, "[", i, "] must be contiguous");
      if (masked && compact) {
        TORCH_CHECK(t.dim() == 1, op, ": compact state ", s.name, "[", i,
                    "] must be 1-D (one entry per kept weight), got shape ", t.sizes());
      } else {
        TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", s.name, "[", i, "] has shape ", t.sizes(), " but params[", i,
                    "] has shape ", p.sizes(), masked ? "" : " (a dense parameter keeps dense state, also in compact mode)");
      }
    }
  }
}

inline bool is_masked(const c10::List<std::optional<at::Tensor>>& masks, size_t i) {
  const std::optional<at::Tensor> m = masks.get(i);
  return m.has_value() && m->defined();
}

// After counting the kept weights of every masked parameter: the compact state must have
// exactly one entry per kept weight. `kept[i]` is ignored for dense parameters.
inline void check_compact_lengths(const char* op, c10::ArrayRef<StateList> states,
                                  const c10::List<std::optional<at::Tensor>>& masks, const std::vector<int64_t>& kept) {
  for (size_t i = 0; i < masks.size(); ++i) {
    if (!is_masked(masks, i)) continue;
    for (const StateList& s : states) {
      if (s.tensors.empty()) continue;
      TORCH_CHECK(s.tensors[i].numel() == kept[i], op, ": compact state ", s.name, "[", i, "] has ",
                  s.tensors[i].numel(), " entries but masks[", i, "] keeps ", kept[i],
                  " weights (did the mask change after the state was compacted?)");
    }
  }
}

// The checks of each op's arguments, shared by the backends, which differ only in the param
// dtypes they implement and whether half/bf16 params may keep float32 state. Return the state
// lists for run_step.
inline std::vector<StateList> checked_adamw_states(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                                   at::TensorList exp_avg_sqs,
                                                   const c10::List<std::optional<at::Tensor>>& masks, int64_t step,
                                                   bool compact, std::initializer_list<at::ScalarType> param_dtypes,
                                                   bool allow_float_state) {
  std::vector<StateList> states = {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  check_step_args("masked_adamw_", params, grads, states, /*states_may_be_empty=*/false, masks, compact, param_dtypes,
                  allow_float_state);
  TORCH_CHECK(step >= 1, "masked_adamw_: step counts from 1, got ", step);
  return states;
}

inline std::vector<StateList> checked_sgd_states(at::TensorList params, at::TensorList grads,
                                                 at::TensorList momentum_buffers,
                                                 const c10::List<std::optional<at::Tensor>>& masks, double momentum,
                                                 bool compact, std::initializer_list<at::ScalarType> param_dtypes,
                                                 bool allow_float_state) {
  const bool has_momentum = momentum != 0.0;
  std::vector<StateList> states = {{"momentum_buffers", momentum_buffers}};
  check_step_args("masked_sgd_", params, grads, states, /*states_may_be_empty=*/!has_momentum, masks, compact,
                  param_dtypes, allow_float_state);
  TORCH_CHECK(has_momentum || momentum_buffers.empty(),
              "masked_sgd_: momentum is 0, so momentum_buffers must be empty (got ", momentum_buffers.size(), ")");
  return states;
}

}  // namespace sparsebert::optim
