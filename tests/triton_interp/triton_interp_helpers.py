"""Shared inputs and tolerances for the Triton-interpreter tests (run by tests/test_triton_kernels.py)."""

import os

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    # Triton picks interpreter vs compiler when a kernel is defined; without the variable these
    # modules would test nothing on a CPU. tests/test_triton_kernels.py runs them the right way.
    raise RuntimeError("tests/triton_interp/* need TRITON_INTERPRET=1 at start-up: run tests/test_triton_kernels.py")

torch.set_num_threads(1)

# (dtype, atol, rtol) of heat-buffer cells against the float64 reference run on the *same* rounded
# inputs. Only fp32 arithmetic error remains, whatever the input dtype: fp16/bf16 products are exact
# in fp32, then fp32 dot accumulation (~sqrt(D)·eps·|s|, |s| ≲ 12 here) and exp. Entries are per-dtype
# so that GPU runs (tensor-core fp16/bf16 dots, approximate exp2) can be held to the same contract.
DTYPES = [(torch.float32, 2e-6, 2e-5), (torch.float16, 2e-6, 2e-5), (torch.bfloat16, 2e-6, 2e-5)]


def make_inputs(B: int, H: int, L: int, S: int, D: int, dtype: torch.dtype, seed: int = 0):
    """``q [B, H, L, D]``, ``k, v [B, H, S, D]`` as diffusers makes them: transposed views of ``[B, L, H·D]``
    (non-contiguous). Logits ``scale·q·k`` have standard deviation ~2, so softmax rows are peaked."""
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, L, H * D, generator=g)).view(B, L, H, D).transpose(1, 2).to(dtype)
    k = torch.randn(B, S, H * D, generator=g).view(B, S, H, D).transpose(1, 2).to(dtype)
    v = torch.randn(B, S, H * D, generator=g).view(B, S, H, D).transpose(1, 2).to(dtype)
    return q, k, v


def token_idx(S: int, T: int, seed: int = 1) -> torch.Tensor:
    """``T`` distinct key positions in random order (all of them when ``T == S``)."""
    return torch.randperm(S, generator=torch.Generator().manual_seed(seed))[:T]


def flash_lse(q, k, v, scale):
    """The lse PyTorch's CPU flash attention returns with its output: ``[B, H, L]`` fp32, strides ``(H·L, 1, H)``."""
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return lse


def start_buffer(shape, seed: int = 2) -> torch.Tensor:
    """A heat buffer already holding values: kernels must add into it, never overwrite."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))
