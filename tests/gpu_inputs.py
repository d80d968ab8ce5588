"""Inputs of the GPU kernel tests (tests/test_cuda_gpu.py, tests/test_triton_gpu.py): nothing here touches CUDA
until a test calls it."""

import torch

DEV = "cuda"


def qkv(B, H, L, S, D, dtype, seed=0):
    """q [B,H,L,D], k and v [B,H,S,D] as views of [B,L,H,D] memory (the layout diffusers' processors make)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g, device=DEV).to(dtype).transpose(1, 2)
    k = torch.randn(B, S, H, D, generator=g, device=DEV).to(dtype).transpose(1, 2)
    v = torch.randn(B, S, H, D, generator=g, device=DEV).to(dtype).transpose(1, 2)
    return q, k, v


def start(shape, seed=1):
    """A non-zero starting heat buffer: the kernels must add into it, not overwrite it."""
    return torch.rand(shape, generator=torch.Generator(device=DEV).manual_seed(seed), device=DEV)
