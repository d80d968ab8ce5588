// Host stand-ins for the CUDA built-ins that csrc/capture_kernels.cuh uses, so the kernels compile with a plain
// C++20 compiler and run on the CPU: every CUDA thread of a block is a std::thread, __syncthreads is a
// std::barrier over them, and __shared__ arrays are function statics (blocks run one after another, so one
// copy per kernel instantiation is exactly one block's shared memory). A kernel whose threads disagree on the
// number of __syncthreads calls deadlocks here, as it would hang or misbehave on a GPU.
#pragma once

#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local EmuDim3 threadIdx;
inline thread_local EmuDim3 blockIdx;
inline std::barrier<>* emu_block_barrier = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

// Runs kernel() as a grid (gx, gy, gz) of blocks of `threads` threads, one block at a time.
template <typename Kernel>
void emu_launch(int64_t gx, int64_t gy, int64_t gz, unsigned threads, Kernel kernel) {
  std::barrier<> barrier(threads);
  emu_block_barrier = &barrier;
  for (int64_t z = 0; z < gz; ++z) {
    for (int64_t y = 0; y < gy; ++y) {
      for (int64_t x = 0; x < gx; ++x) {
        std::vector<std::thread> block;
        block.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          block.emplace_back([=] {
            threadIdx = {t, 0, 0};
            blockIdx = {static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z)};
            kernel();
          });
        }
        for (std::thread& th : block) th.join();
      }
    }
  }
  emu_block_barrier = nullptr;
}
