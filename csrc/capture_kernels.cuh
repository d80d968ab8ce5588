// The capture kernels themselves, free of torch and of host-only CUDA APIs: capture.cu launches them, and
// tests/cuda_emu/ compiles this same file for the CPU (one std::thread per CUDA thread, std::barrier for
// __syncthreads) so the index arithmetic, tiling and reductions are checked without a GPU.
//
// out[b, t, l] += Σ_h exp(scale · q[b,h,l]·k[b,h,t] + bias − lse[b,h,l]) for the selected key columns t only,
// fp32 accumulation whatever the input dtype. The PyTorch twin (and test oracle) is
// daam_fast/kernels/reference.py.
//
// Determinism: every output cell is owned by exactly one thread of one block, which sums the heads in a fixed
// order and does a single read-modify-write of the cell; there are no atomics, so results are bitwise
// reproducible. The self-normalising variant first computes lse with its own kernel (one block per tile of
// query rows of one (b, h), reduced in a fixed order), then runs the same capture kernel.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace daam_fast {
namespace kernels {

// Block tile: kBlockL query rows × kBlockT key columns, 256 threads in a 16 × 16 grid; each thread owns
// kRows × kCols cells (rows tl + 16·i, columns tt + 16·j), which keeps the shared-memory reads conflict-free:
// within a warp the 16 row indices hit 16 banks (row pitch 33 floats) and the column reads are broadcasts.
// 80 columns hold SD/SDXL's 77 text tokens in one tile, so q is read once per head.
constexpr int kThreadsL = 16;
constexpr int kThreadsT = 16;
constexpr int kThreads = kThreadsL * kThreadsT;
constexpr int kRows = 4;
constexpr int kCols = 5;
constexpr int kBlockL = kThreadsL * kRows;
constexpr int kBlockT = kThreadsT * kCols;
constexpr int kChunkD = 32;        // head-dim slice staged in shared memory per step; any D works
constexpr int kPitch = kChunkD + 1;  // +1 float: rows start in different banks
constexpr int kMaxGridYZ = 65535;
// __launch_bounds__'s blocks-per-SM hint: with the thread count alone, ptxas (CUDA 13) gives the fp16/bf16 capture
// kernel 64 registers and 100 B of spills on sm_90; asking for 3 resident blocks (≤ 85 registers per thread) it
// fits in 80 with no spill on sm_75 … sm_90, and 3 × 256 threads keep more loads in flight than 2 would.
// Registers and spills per architecture: `make kernel-report` (docs/PERFORMANCE.md).
constexpr int kMinBlocksPerSM = 3;

struct Params {
  const void* q;  // [B, H, L, D]
  int64_t q_stride[4];
  const void* k;  // [B, H, S, D]: the T selected keys (from-lse, S == T) or all keys (self-normalising)
  int64_t k_stride[4];
  const float* lse;  // [B, H, L]
  int64_t lse_stride[3];
  const float* bias;  // [B, H, L, S] or nullptr
  int64_t bias_stride[4];
  const int64_t* token_idx;  // [T]: column t reads key row token_idx[t]; nullptr: key row t
  float* out;                // [B, H or 1, T, L]; out_stride[1] is 0 when heads are summed
  int64_t out_stride[4];
  int H, L, D, T, S;
  int heads_per_block;  // H (sum over heads) or 1 (per-head output)
  float scale;
};

// The column of key/bias that output column t reads, or -1 when token_idx points outside [0, S).
__device__ __forceinline__ int64_t key_row(const Params& p, int t) {
  const int64_t row = p.token_idx != nullptr ? p.token_idx[t] : t;
  return (row >= 0 && row < p.S) ? row : -1;
}

// dot[i][j] = q[b,h,l0 + tl + 16i] · k[b,h,key(c0 + tt + 16j)] in fp32 (0 outside the valid range), staging
// D in kChunkD slices through shared memory. `gather` selects key rows through token_idx; n_cols bounds c.
// Every thread of the block must call this (it synchronises).
template <typename scalar_t>
__device__ __forceinline__ void score_tile(const Params& p, int b, int h, int l0, int c0, int n_cols, bool gather,
                                           float (*q_s)[kPitch], float (*k_s)[kPitch], float (&dot)[kRows][kCols]) {
  const int tl = threadIdx.x % kThreadsL;
  const int tt = threadIdx.x / kThreadsL;
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) dot[i][j] = 0.f;
  }
  for (int d0 = 0; d0 < p.D; d0 += kChunkD) {
    __syncthreads();  // the previous slice (or the previous call's last slice) has been read by everyone
    // Consecutive threads load consecutive d of one row: coalesced when the head dim has stride 1.
    for (int idx = threadIdx.x; idx < kBlockL * kChunkD; idx += kThreads) {
      const int r = idx / kChunkD, c = idx % kChunkD;
      const int l = l0 + r, d = d0 + c;
      q_s[r][c] = (l < p.L && d < p.D) ? static_cast<float>(q[l * p.q_stride[2] + d * p.q_stride[3]]) : 0.f;
    }
    for (int idx = threadIdx.x; idx < kBlockT * kChunkD; idx += kThreads) {
      const int r = idx / kChunkD, c = idx % kChunkD;
      const int col = c0 + r, d = d0 + c;
      float v = 0.f;
      if (col < n_cols && d < p.D) {
        const int64_t row = gather ? key_row(p, col) : col;
        if (row >= 0) v = static_cast<float>(k[row * p.k_stride[2] + d * p.k_stride[3]]);
      }
      k_s[r][c] = v;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kChunkD; ++c) {
      float qv[kRows], kv[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) qv[i] = q_s[tl + i * kThreadsL][c];
#pragma unroll
      for (int j = 0; j < kCols; ++j) kv[j] = k_s[tt + j * kThreadsT][c];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
#pragma unroll
        for (int j = 0; j < kCols; ++j) dot[i][j] = fmaf(qv[i], kv[j], dot[i][j]);
      }
    }
  }
}

// Grid: x = query tiles, y = column tiles, z = B · (H / heads_per_block). One block owns out cells
// [b, head group, t0 : t0 + kBlockT, l0 : l0 + kBlockL] and sums its heads in order h = h0, h0 + 1, ...
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) capture_kernel(const Params p) {
  __shared__ float q_s[kBlockL][kPitch];
  __shared__ float k_s[kBlockT][kPitch];
  const int l0 = blockIdx.x * kBlockL;
  const int t0 = blockIdx.y * kBlockT;
  const int groups = p.H / p.heads_per_block;
  const int b = blockIdx.z / groups;
  const int h0 = (blockIdx.z % groups) * p.heads_per_block;
  const int tl = threadIdx.x % kThreadsL;
  const int tt = threadIdx.x / kThreadsL;

  float acc[kRows][kCols];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[i][j] = 0.f;
  }
  for (int h = h0; h < h0 + p.heads_per_block; ++h) {
    float dot[kRows][kCols];
    score_tile<scalar_t>(p, b, h, l0, t0, p.T, p.token_idx != nullptr, q_s, k_s, dot);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int l = l0 + tl + i * kThreadsL;
      if (l >= p.L) continue;
      const float lse = p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + l * p.lse_stride[2]];
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int t = t0 + tt + j * kThreadsT;
        if (t >= p.T) continue;
        float s = dot[i][j] * p.scale - lse;
        if (p.bias != nullptr || p.token_idx != nullptr) {
          const int64_t col = key_row(p, t);
          if (col < 0) {
            s = NAN;  // an out-of-range token index: make it visible instead of reading out of bounds
          } else if (p.bias != nullptr) {
            s += p.bias[b * p.bias_stride[0] + h * p.bias_stride[1] + l * p.bias_stride[2] + col * p.bias_stride[3]];
          }
        }
        acc[i][j] += expf(s);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int l = l0 + tl + i * kThreadsL;
    if (l >= p.L) continue;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int t = t0 + tt + j * kThreadsT;
      if (t >= p.T) continue;
      p.out[b * p.out_stride[0] + h0 * p.out_stride[1] + t * p.out_stride[2] + l * p.out_stride[3]] += acc[i][j];
    }
  }
}

// lse_out[(b·H + h)·L + l] = logsumexp_s(scale · q[b,h,l]·k[b,h,s] + bias[b,h,l,s]) over all S keys.
// Grid: x = query tiles, y = B · H. Each thread keeps an online (max, sum) per row over its own columns; the
// 16 partial results of a row are then combined by one thread in a fixed order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) row_lse_kernel(const Params p, float* lse_out) {
  __shared__ float q_s[kBlockL][kPitch];
  __shared__ float k_s[kBlockT][kPitch];
  __shared__ float part_max[kThreadsT][kBlockL];
  __shared__ float part_sum[kThreadsT][kBlockL];
  const int l0 = blockIdx.x * kBlockL;
  const int b = blockIdx.y / p.H;
  const int h = blockIdx.y % p.H;
  const int tl = threadIdx.x % kThreadsL;
  const int tt = threadIdx.x / kThreadsL;
  const float neg_inf = -INFINITY;

  float row_max[kRows], row_sum[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    row_max[i] = neg_inf;
    row_sum[i] = 0.f;
  }
  for (int s0 = 0; s0 < p.S; s0 += kBlockT) {
    float dot[kRows][kCols];
    score_tile<scalar_t>(p, b, h, l0, s0, p.S, false, q_s, k_s, dot);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int l = l0 + tl + i * kThreadsL;
      if (l >= p.L) continue;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int s = s0 + tt + j * kThreadsT;
        if (s >= p.S) continue;
        float x = dot[i][j] * p.scale;
        if (p.bias != nullptr) {
          x += p.bias[b * p.bias_stride[0] + h * p.bias_stride[1] + l * p.bias_stride[2] + s * p.bias_stride[3]];
        }
        // A masked key (-inf) adds exp(-inf) = 0; skipping it also avoids -inf − (-inf) = NaN below.
        if (x == neg_inf) continue;
        if (x > row_max[i]) {
          row_sum[i] = row_sum[i] * expf(row_max[i] - x) + 1.f;
          row_max[i] = x;
        } else {
          row_sum[i] += expf(x - row_max[i]);  // a NaN score lands here and propagates, as in the reference
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    part_max[tt][tl + i * kThreadsL] = row_max[i];
    part_sum[tt][tl + i * kThreadsL] = row_sum[i];
  }
  __syncthreads();
  if (threadIdx.x < kBlockL && l0 + static_cast<int>(threadIdx.x) < p.L) {
    const int r = threadIdx.x;
    float m = neg_inf;
    for (int t = 0; t < kThreadsT; ++t) m = fmaxf(m, part_max[t][r]);
    float sum = 0.f;
    if (m != neg_inf) {
      for (int t = 0; t < kThreadsT; ++t) {
        if (part_max[t][r] != neg_inf) sum += part_sum[t][r] * expf(part_max[t][r] - m);
      }
    }
    // All keys masked: lse = -inf, like torch.logsumexp (the capture then yields NaN, as the reference does).
    lse_out[(static_cast<int64_t>(b) * p.H + h) * p.L + l0 + r] = m == neg_inf ? neg_inf : m + logf(sum);
  }
}

// Grid sizes (x, y, z) of the two kernels; the launcher checks y and z against kMaxGridYZ.
struct Grid {
  int64_t x, y, z;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Capture: x = query tiles, y = token tiles, z = batch × head groups (heads_per_block > 0).
inline Grid capture_grid(const Params& p, int64_t B) {
  return {ceil_div(p.L, kBlockL), ceil_div(p.T, kBlockT), B * (p.H / p.heads_per_block)};
}

// Row lse: x = query tiles, y = batch × heads.
inline Grid row_lse_grid(const Params& p, int64_t B) { return {ceil_div(p.L, kBlockL), B * p.H, 1}; }

}  // namespace kernels
}  // namespace daam_fast
