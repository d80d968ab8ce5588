// C entry points around the emulated kernels of csrc/capture_kernels.cuh, called through ctypes by
// tests/test_cuda_kernels_emulated.py. The grid comes from the same helpers capture.cu uses.
#include "cuda_emu.h"  // must come first: it defines the CUDA keywords the kernels use

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "capture_kernels.cuh"

using daam_fast::kernels::Grid;
using daam_fast::kernels::kThreads;
using daam_fast::kernels::Params;

namespace {

template <typename F>
int with_dtype(int dtype, F f) {
  switch (dtype) {
    case 0: f(float{}); return 0;
    case 1: f(c10::Half{}); return 0;
    case 2: f(c10::BFloat16{}); return 0;
    default: return 1;
  }
}

}  // namespace

extern "C" {

int64_t emu_params_size() { return sizeof(Params); }

// dtype: 0 float32, 1 float16, 2 bfloat16. Returns 0 on success.
int emu_capture(const Params* p, int64_t B, int dtype) {
  const Grid g = daam_fast::kernels::capture_grid(*p, B);
  const Params params = *p;
  return with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    emu_launch(g.x, g.y, g.z, kThreads, [&] { daam_fast::kernels::capture_kernel<scalar_t>(params); });
  });
}

int emu_row_lse(const Params* p, int64_t B, int dtype, float* lse_out) {
  const Grid g = daam_fast::kernels::row_lse_grid(*p, B);
  const Params params = *p;
  return with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    emu_launch(g.x, g.y, g.z, kThreads, [&] { daam_fast::kernels::row_lse_kernel<scalar_t>(params, lse_out); });
  });
}

}  // extern "C"
