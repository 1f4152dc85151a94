// Every sparsebert op schema, declared once. The kernels live in one CPU file and
// one CUDA file per op family, each ending in its TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A Python module, so that `from sparsebert import _C` loads the library (and
// runs the registrations below) through the normal import machinery.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    PyModule_AddIntConstant(module, "with_cuda", SPARSEBERT_WITH_CUDA);
    PyModule_AddIntConstant(module, "with_openmp", SPARSEBERT_WITH_OPENMP);
  }
  return module;
}
}

TORCH_LIBRARY(sparsebert, m) {
  // Masks are bit-packed uint8 tensors of shape [*shape[:-1], ceil(shape[-1] / 8)]:
  // bit (j % 8) of byte (j / 8) in a row is element j of that row; padding bits are 0.

  // y = x @ (W * M)^T + b. weight_is_masked promises W is already 0 where M is 0.
  m.def("masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias, bool weight_is_masked=False) -> Tensor");
  // Same forward; takes the movement scores so that autograd can give them grad_S.
  m.def("movement_linear(Tensor x, Tensor weight, Tensor scores, Tensor mask, Tensor? bias) -> Tensor");
  // grad_x = grad_out @ (W * M)
  m.def("masked_linear_grad_input(Tensor grad_out, Tensor weight, Tensor mask, bool weight_is_masked=False) -> Tensor");
  // grad_W = (grad_out^T @ x) * M
  m.def("masked_linear_grad_weight(Tensor grad_out, Tensor x, Tensor mask) -> Tensor");
  // (grad_W, grad_S) = (G * M, G * W) with G = grad_out^T @ x, from one pass over G.
  m.def("movement_linear_grad_weight(Tensor grad_out, Tensor x, Tensor weight, Tensor mask) -> (Tensor, Tensor)");

  // y = x @ W^T + b, W packed as R x 1 blocks (values [nblocks, R], columns [nblocks] int16/int32,
  // row_offsets [out / R + 1] int32); see csrc/sparse_linear.h. Inference only: no autograd.
  m.def("sparse_linear(Tensor x, Tensor values, Tensor columns, Tensor row_offsets, Tensor? bias) -> Tensor");

  // Radix select over order-preserving 32-bit keys of the values (|values| when
  // use_abs). Histogram of key bits [32 - prefix_bits - digit_bits, 32 - prefix_bits)
  // over the keys whose top prefix_bits bits equal prefix: int64[2 ** digit_bits].
  m.def("topk_histogram(Tensor[] xs, bool use_abs, int prefix, int prefix_bits, int digit_bits) -> Tensor");
  // Keeps keys > threshold_key, and the first ties_to_keep keys == threshold_key in
  // flat order (list order, then row-major).
  m.def("topk_mask_from_threshold(Tensor[] xs, bool use_abs, int threshold_key, int ties_to_keep) -> Tensor[]");
  // Exactly the k largest over all xs; returns the masks and the k-th largest value.
  m.def("topk_mask(Tensor[] xs, int k, bool use_abs) -> (Tensor[], Tensor)");
  // Exactly the k largest in every row (last dimension).
  m.def("topk_mask_rows(Tensor x, int k, bool use_abs) -> Tensor");
  // The n largest of every m consecutive elements along the last dimension.
  m.def("nm_mask(Tensor x, int n, int m, bool use_abs) -> Tensor");

  // Fused multi-tensor steps that keep pruned weights and their state at exactly 0.
  // masks[i] None means a dense parameter. compact: the state of a masked parameter is
  // 1-D, one entry per kept weight in row-major order.
  m.def(
      "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor?[] masks, int step, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool maximize, bool compact, bool check_finite) -> ()");
  m.def(
      "masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] masks, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool first_step, "
      "bool maximize, bool compact, bool check_finite) -> ()");
}
