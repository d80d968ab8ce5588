// Shared by ext.cpp (host compiler) and the .cu files (nvcc): the argument-check macros (used in ext.cpp, which
// validates every argument before calling a launcher) and the launchers' declarations.
// Nothing here includes CUDA headers, so ext.cpp compiles with only torch's headers. The launchers take
// at::TensorBase, not at::Tensor: TensorBase.h is a fraction of Tensor.h, which roughly halves nvcc's time per
// .cu (the front end parses every header once per target architecture); ext.cpp adapts the op signatures.
#pragma once

#include <ATen/core/TensorBase.h>
#include <c10/util/Exception.h>

// Each check names the argument and says what it got, so a failing call is fixable from the message alone.
#define DAAM_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())
#define DAAM_CHECK_SAME_DEVICE(x, y)                                                                \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on one device, got ", (x).device(), \
              " and ", (y).device())
#define DAAM_CHECK_DTYPE(x, dtype) \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", (x).scalar_type())
#define DAAM_CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dims, got shape ", (x).sizes())
// The expected shape lives in a named array for the whole check (no initializer_list temporaries).
#define DAAM_CHECK_SHAPE(x, ...)                                                                                 \
  do {                                                                                                           \
    const int64_t daam_expected_[] = {__VA_ARGS__};                                                              \
    const c10::IntArrayRef daam_want_(daam_expected_);                                                           \
    TORCH_CHECK((x).sizes() == daam_want_, #x " must have shape ", daam_want_, ", got ", (x).sizes());          \
  } while (false)
#define DAAM_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous, got strides ", (x).strides())

namespace daam_fast {

// Both launchers expect arguments that ext.cpp has checked (shapes, dtypes, devices, int ranges).

// out[b, t, l] (or out[b, h, t, l] for a 4-D out) += Σ_h exp(scale · q[b,h,l]·k_sel[b,h,t] + bias[b,h,l,t] − lse[b,h,l]).
// q [B,H,L,D] and k_sel [B,H,T,D] fp16/bf16/fp32, any strides; lse [B,H,L] fp32, any strides; out fp32 [B,T,L] or
// [B,H,T,L], any non-overlapping strides; bias, when given, fp32 of shape exactly [B,H,L,T] (broadcast it with
// expand(): zero strides are fine).
// bias: nullptr for none.
void capture_from_lse_cuda(const at::TensorBase& q, const at::TensorBase& k_sel, const at::TensorBase& lse,
                           double scale, const at::TensorBase& out, const at::TensorBase* bias);

// Same, for attention calls that give no lse: computes lse[b,h,l] = logsumexp_s(scale · q·k[b,h,s] + bias) over
// all S keys first, then captures the columns token_idx. k [B,H,S,D] any strides; token_idx [T] int64
// contiguous with values in [0, S) (checked by the Python wrapper; out-of-range columns read nothing and give
// NaN); bias fp32 of shape exactly [B,H,L,S] when given.
void capture_self_normalising_cuda(const at::TensorBase& q, const at::TensorBase& k,
                                   const at::TensorBase& token_idx, double scale, const at::TensorBase& out,
                                   const at::TensorBase* bias);

}  // namespace daam_fast
