// Host side of the capture ops: argument checks, parameter packing and launches on the current stream. The
// kernels are in capture_kernels.cuh.
#include <ATen/Dispatch.h>
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

void copy_strides(const at::TensorBase& t, int64_t* dst) {
  for (int64_t i = 0; i < t.dim(); ++i) dst[i] = t.stride(i);
}

// Packs pointers, strides and sizes of arguments that ext.cpp has already validated, int ranges included. The
// argument checks live there, in code only the host compiler sees: on the first GPU run (H200, torch 2.11 JIT
// build) a failing shape check thrown from this nvcc-compiled file crashed the process instead of raising.
Params pack(const at::TensorBase& q, const at::TensorBase& k, int64_t n_cols, double scale, const at::TensorBase& out,
            const at::TensorBase* bias) {
  const int64_t H = q.size(1), L = q.size(2), D = q.size(3);
  const bool per_head = out.dim() == 4;
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
    p.bias = bias->const_data_ptr<float>();
    copy_strides(*bias, p.bias_stride);
  }
  p.H = static_cast<int>(H);
  p.L = static_cast<int>(L);
  p.D = static_cast<int>(D);
  p.T = static_cast<int>(n_cols);
  p.S = static_cast<int>(k.size(2));
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
  Params p = pack(q, k_sel, k_sel.size(2), scale, out, bias);
  p.lse = lse.const_data_ptr<float>();
  copy_strides(lse, p.lse_stride);
  if (out.numel() == 0 || p.H == 0) return;  // nothing to add (and a zero-sized grid is a launch error)
  const c10::cuda::CUDAGuard guard(q.device());
  launch_capture(p, q.size(0), q.scalar_type(), c10::cuda::getCurrentCUDAStream());
}

void capture_self_normalising_cuda(const at::TensorBase& q, const at::TensorBase& k,
                                   const at::TensorBase& token_idx, double scale, const at::TensorBase& out,
                                   const at::TensorBase* bias) {
  Params p = pack(q, k, token_idx.size(0), scale, out, bias);
  if (out.numel() == 0 || p.H == 0) return;
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
