// The one registration of the daam_fast:: ops. The schemas are mirrored in daam_fast/kernels/cuda_build.py
// (SCHEMAS); tests/test_cuda_binding.py checks that both say the same. Fake (meta) kernels are registered
// from Python with torch.library.register_fake (daam_fast/kernels/cuda.py).
#include <Python.h>
#include <torch/library.h>

#include <optional>

#include "common.h"

namespace {

// The op signatures the schemas below imply (Tensor? -> std::optional<at::Tensor>, float -> double), adapted
// to the launchers in the .cu files.
void capture_from_lse(const at::Tensor& q, const at::Tensor& k_sel, const at::Tensor& lse, double scale,
                      at::Tensor& out, const std::optional<at::Tensor>& bias) {
  daam_fast::capture_from_lse_cuda(q, k_sel, lse, scale, out, bias.has_value() ? &*bias : nullptr);
}

void capture_self_normalising(const at::Tensor& q, const at::Tensor& k, const at::Tensor& token_idx, double scale,
                              at::Tensor& out, const std::optional<at::Tensor>& bias) {
  daam_fast::capture_self_normalising_cuda(q, k, token_idx, scale, out, bias.has_value() ? &*bias : nullptr);
}

}  // namespace

// `import daam_fast._C` needs a module init function. The module itself is empty: importing it loads this
// shared library, whose static initialisers (TORCH_LIBRARY below) register the ops with the dispatcher.
// PyMODINIT_FUNC gives it C linkage and default visibility.
PyMODINIT_FUNC PyInit__C(void) {
  // name, doc, size (-1: no per-module state), methods, slots, traverse, clear, free
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(daam_fast, m) {
  m.def(
      "cuda_capture_from_lse(Tensor q, Tensor k_sel, Tensor lse, float scale, Tensor(a!) out, Tensor? bias=None) "
      "-> ()");
  m.def(
      "cuda_capture_self_normalising(Tensor q, Tensor k, Tensor token_idx, float scale, Tensor(a!) out, "
      "Tensor? bias=None) -> ()");
}

TORCH_LIBRARY_IMPL(daam_fast, CUDA, m) {
  m.impl("cuda_capture_from_lse", &capture_from_lse);
  m.impl("cuda_capture_self_normalising", &capture_self_normalising);
}
