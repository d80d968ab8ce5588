// The one registration of the daam_fast:: ops. The schemas are mirrored in daam_fast/kernels/cuda_build.py
// (SCHEMAS); tests/test_cuda_binding.py checks that both say the same. Fake (meta) kernels are registered
// from Python with torch.library.register_fake (daam_fast/kernels/cuda.py).
#include <Python.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "common.h"

namespace {

void check_int_range(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), what, " = ", v, " does not fit the kernel's int range");
}

// Every argument check of both ops (the launchers in capture.cu trust them). k is k_sel [B,H,T,D] for
// capture_from_lse and all keys [B,H,S,D] for capture_self_normalising; n_cols is the number of output columns.
void check_common(const at::Tensor& q, const at::Tensor& k, const char* k_name, int64_t n_cols, const at::Tensor& out,
                  const std::optional<at::Tensor>& bias) {
  DAAM_CHECK_CUDA(q);
  DAAM_CHECK_SAME_DEVICE(q, k);
  DAAM_CHECK_SAME_DEVICE(q, out);
  DAAM_CHECK_DIM(q, 4);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), k_name, " dtype ", k.scalar_type(), " differs from q dtype ",
              q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D, k_name,
              " must be [B, H, *, D] matching q ", q.sizes(), ", got ", k.sizes());
  DAAM_CHECK_DTYPE(out, at::kFloat);
  if (out.dim() == 4) {
    DAAM_CHECK_SHAPE(out, B, H, n_cols, L);
  } else {
    DAAM_CHECK_SHAPE(out, B, n_cols, L);
  }
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "out must not have overlapping elements (e.g. an expanded tensor), got strides ", out.strides());
  if (bias.has_value()) {
    const at::Tensor& bb = *bias;
    DAAM_CHECK_SAME_DEVICE(q, bb);
    DAAM_CHECK_DTYPE(bb, at::kFloat);
    DAAM_CHECK_SHAPE(bb, B, H, L, k.size(2));
  }
  check_int_range(H, "H");
  check_int_range(L, "L");
  check_int_range(D, "D");
  check_int_range(n_cols, "T");
  check_int_range(k.size(2), "S");
}

// The op signatures the schemas below imply (Tensor? -> std::optional<at::Tensor>, float -> double), adapted
// to the launchers in the .cu files.
void capture_from_lse(const at::Tensor& q, const at::Tensor& k_sel, const at::Tensor& lse, double scale,
                      at::Tensor& out, const std::optional<at::Tensor>& bias) {
  check_common(q, k_sel, "k_sel", k_sel.dim() == 4 ? k_sel.size(2) : 0, out, bias);
  DAAM_CHECK_SAME_DEVICE(q, lse);
  DAAM_CHECK_DTYPE(lse, at::kFloat);
  DAAM_CHECK_SHAPE(lse, q.size(0), q.size(1), q.size(2));
  daam_fast::capture_from_lse_cuda(q, k_sel, lse, scale, out, bias.has_value() ? &*bias : nullptr);
}

void capture_self_normalising(const at::Tensor& q, const at::Tensor& k, const at::Tensor& token_idx, double scale,
                              at::Tensor& out, const std::optional<at::Tensor>& bias) {
  DAAM_CHECK_SAME_DEVICE(q, token_idx);
  DAAM_CHECK_DTYPE(token_idx, at::kLong);
  DAAM_CHECK_DIM(token_idx, 1);
  DAAM_CHECK_CONTIGUOUS(token_idx);
  check_common(q, k, "k", token_idx.size(0), out, bias);
  TORCH_CHECK(out.numel() == 0 || q.size(1) == 0 || k.size(2) > 0, "k has no keys (S = 0): the softmax is undefined");
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
