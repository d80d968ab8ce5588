// Host side of the capture ops: argument checks, parameter packing and launches on the current stream. The
// kernels are in capture_kernels.cuh.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/TensorBase.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "capture_kernels.cuh"
#include "common.h"

namespace daam_fast {
namespace {

using kernels::capture_kernel;
using kernels::kMaxGridYZ;
using kernels::kThreads;
using kernels::Params;
using kernels::row_lse_kernel;

// Adds the three dtypes the kernels are instantiated for; anything else is rejected before dispatch.
#define DAAM_DISPATCH_INPUT_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), what, " = ", v, " does not fit the kernel's int range");
  return static_cast<int>(v);
}

void copy_strides(const at::TensorBase& t, int64_t* dst) {
  for (int64_t i = 0; i < t.dim(); ++i) dst[i] = t.stride(i);
}

// Checks shared by both ops; returns the Params with q, k, out and bias filled in.
Params check_and_pack(const at::TensorBase& q, const at::TensorBase& k, const char* k_name, int64_t n_cols,
                      double scale, const at::TensorBase& out, const at::TensorBase* bias) {
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
  const bool per_head = out.dim() == 4;
  if (per_head) {
    DAAM_CHECK_SHAPE(out, B, H, n_cols, L);
  } else {
    DAAM_CHECK_SHAPE(out, B, n_cols, L);
  }
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "out must not have overlapping elements (e.g. an expanded tensor), got strides ", out.strides());

  Params p{};
  p.q = q.const_data_ptr();
  copy_strides(q, p.q_stride);
  p.k = k.const_data_ptr();
  copy_strides(k, p.k_stride);
  p.out = out.mutable_data_ptr<float>();
  if (per_head) {
    copy_strides(out, p.out_stride);
  } else {
    p.out_stride[0] = out.stride(0);
    p.out_stride[1] = 0;
    p.out_stride[2] = out.stride(1);
    p.out_stride[3] = out.stride(2);
  }
  if (bias != nullptr) {
    const at::TensorBase& bb = *bias;
    DAAM_CHECK_SAME_DEVICE(q, bb);
    DAAM_CHECK_DTYPE(bb, at::kFloat);
    DAAM_CHECK_SHAPE(bb, B, H, L, k.size(2));
    p.bias = bb.const_data_ptr<float>();
    copy_strides(bb, p.bias_stride);
  }
  p.H = checked_int(H, "H");
  p.L = checked_int(L, "L");
  p.D = checked_int(D, "D");
  p.T = checked_int(n_cols, "T");
  p.S = checked_int(k.size(2), "S");
  p.heads_per_block = per_head ? 1 : p.H;
  p.scale = static_cast<float>(scale);
  return p;
}

dim3 checked_grid(const kernels::Grid& g, const char* kernel) {
  TORCH_CHECK(g.x <= std::numeric_limits<int>::max() && g.y <= kMaxGridYZ && g.z <= kMaxGridYZ, kernel,
              ": grid (", g.x, ", ", g.y, ", ", g.z, ") exceeds CUDA's limits (y and z at most ", kMaxGridYZ,
              "): too many token tiles or batch × heads");
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

void launch_capture(const Params& p, int64_t B, at::ScalarType dtype, cudaStream_t stream) {
  const dim3 grid = checked_grid(kernels::capture_grid(p, B), "capture_kernel");
  DAAM_DISPATCH_INPUT_TYPES(dtype, "daam_fast::capture", [&] {
    capture_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void capture_from_lse_cuda(const at::TensorBase& q, const at::TensorBase& k_sel, const at::TensorBase& lse,
                           double scale, const at::TensorBase& out, const at::TensorBase* bias) {
  Params p = check_and_pack(q, k_sel, "k_sel", k_sel.dim() == 4 ? k_sel.size(2) : 0, scale, out, bias);
  DAAM_CHECK_SAME_DEVICE(q, lse);
  DAAM_CHECK_DTYPE(lse, at::kFloat);
  DAAM_CHECK_SHAPE(lse, q.size(0), q.size(1), q.size(2));
  p.lse = lse.const_data_ptr<float>();
  copy_strides(lse, p.lse_stride);
  if (out.numel() == 0 || p.H == 0) return;  // nothing to add (and a zero-sized grid is a launch error)
  const c10::cuda::CUDAGuard guard(q.device());
  launch_capture(p, q.size(0), q.scalar_type(), c10::cuda::getCurrentCUDAStream());
}

void capture_self_normalising_cuda(const at::TensorBase& q, const at::TensorBase& k,
                                   const at::TensorBase& token_idx, double scale, const at::TensorBase& out,
                                   const at::TensorBase* bias) {
  DAAM_CHECK_SAME_DEVICE(q, token_idx);
  DAAM_CHECK_DTYPE(token_idx, at::kLong);
  DAAM_CHECK_DIM(token_idx, 1);
  DAAM_CHECK_CONTIGUOUS(token_idx);
  Params p = check_and_pack(q, k, "k", token_idx.size(0), scale, out, bias);
  if (out.numel() == 0 || p.H == 0) return;
  TORCH_CHECK(p.S > 0, "k has no keys (S = 0): the softmax is undefined");
  const dim3 grid = checked_grid(kernels::row_lse_grid(p, q.size(0)), "row_lse_kernel");
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // B·H·L floats from the caching allocator, used on the current stream only.
  const at::TensorBase lse = at::detail::empty_cuda({q.size(0), p.H, p.L}, at::kFloat, q.device(), std::nullopt);
  DAAM_DISPATCH_INPUT_TYPES(q.scalar_type(), "daam_fast::row_lse", [&] {
    row_lse_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p, lse.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  p.lse = lse.const_data_ptr<float>();
  p.lse_stride[0] = static_cast<int64_t>(p.H) * p.L;
  p.lse_stride[1] = p.L;
  p.lse_stride[2] = 1;
  p.token_idx = token_idx.const_data_ptr<int64_t>();
  launch_capture(p, q.size(0), q.scalar_type(), stream);
}

}  // namespace daam_fast
