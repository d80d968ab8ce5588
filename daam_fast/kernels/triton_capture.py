"""Triton capture kernel from the row logsumexp.

``capture_from_lse`` adds ``Σ_h exp(scale·q·k_selᵀ + bias − lse)`` into the fp32 heat buffer. Each
program owns a block of queries × a block of selected tokens of one image, loops over all heads,
sums in registers and does one load + add + store per buffer cell: no atomics, deterministic.
The self-normalising and fused attention + capture kernels live in :mod:`.triton_fused`, the shared
helpers and tiles in :mod:`.triton_common`, the dispatcher backend in :mod:`.triton_backend`.

Kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` set **before this module is imported**
they run in Triton's interpreter, on CPU tensors too (that is how the tests run them).
"""

from __future__ import annotations

import torch

from . import reference
from .triton_common import (
    INTERPRET,
    MAX_HEAD_DIM,
    TRITON_IMPORT_ERROR,
    Blocks,
    Gpu,
    KernelCall,
    alignment,
    bias_view,
    block_sizes,
    check_launchable,
    gpu_for,
    jit,
    out_strides,
    tl,
    triton,
    upcast_for,
)

# INTERPRET, MAX_HEAD_DIM, TRITON_IMPORT_ERROR and Blocks are re-exported: callers used to find them here.
__all__ = ["INTERPRET", "MAX_HEAD_DIM", "TRITON_IMPORT_ERROR", "Blocks", "capture_from_lse", "capture_from_lse_call"]


# Loop trip counts (heads here, key blocks in triton_fused) are constexpr: they take few values per
# model (one recompile each), and Triton 3.6's interpreter cannot loop over a runtime int under
# numpy >= 2.4 (triton-lang/triton#9171).
@jit
def _capture_lse_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr, bias_ptr,
    L, T, D, scale,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sm_b, sm_h, sm_l,
    so_b, so_h, so_t, so_l,
    sb_b, sb_h, sb_l, sb_t,
    H: tl.constexpr,
    HAS_BIAS: tl.constexpr, PER_HEAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    pid_l = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64 offsets: big batches of big images overflow int32
    D = tl.multiple_of(D, ALIGN)  # see triton_common.alignment: lets q and k rows load as vectors
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_l = offs_l < L
    mask_t = offs_t < T
    mask_d = offs_d < D
    mask_lt = mask_l[:, None] & mask_t[None, :]
    # Padded rows / columns (zero q or k) compute junk that is masked out of every store.
    q_ptrs = q_ptr + b * sq_b + offs_l[:, None] * sq_l + offs_d[None, :] * sq_d
    k_ptrs = k_ptr + b * sk_b + offs_t[None, :] * sk_t + offs_d[:, None] * sk_d
    out_ptrs = out_ptr + b * so_b + offs_t[None, :] * so_t + offs_l[:, None] * so_l
    acc = tl.zeros((BLOCK_L, BLOCK_T), dtype=tl.float32)
    for h in range(H):
        q = tl.load(q_ptrs + tl.multiple_of(h * sq_h, ALIGN), mask=mask_l[:, None] & mask_d[None, :], other=0.0)
        kt = tl.load(k_ptrs + tl.multiple_of(h * sk_h, ALIGN), mask=mask_d[:, None] & mask_t[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
        if HAS_BIAS:
            bias_ptrs = bias_ptr + b * sb_b + h * sb_h + offs_l[:, None] * sb_l + offs_t[None, :] * sb_t
            s += tl.load(bias_ptrs, mask=mask_lt, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + b * sm_b + h * sm_h + offs_l * sm_l, mask=mask_l, other=0.0).to(tl.float32)
        p = tl.exp(s - lse[:, None])
        if PER_HEAD:
            cell = out_ptrs + h * so_h
            tl.store(cell, tl.load(cell, mask=mask_lt, other=0.0) + p, mask=mask_lt)
        else:
            acc += p
    if not PER_HEAD:
        tl.store(out_ptrs, tl.load(out_ptrs, mask=mask_lt, other=0.0) + acc, mask=mask_lt)


@torch.no_grad()
def capture_from_lse(
    q: torch.Tensor,
    k_sel: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """Triton :func:`daam_fast.kernels.reference.capture_from_lse`: add ``Σ_h exp(scale·q·k_selᵀ + bias − lse)``
    into ``out`` in place and return ``out``.

    Args:
        q: ``[B, H, L, D]`` float16 / bfloat16 / float32, any strides (e.g. a transposed view of ``[B, L, H·D]``).
        k_sel: ``[B, H, T, D]`` keys of the ``T`` selected tokens, same dtype, any strides.
        lse: ``[B, H, L]`` float32 logsumexp of each query row over all keys, any strides (the CPU
            flash op returns strides ``(H·L, 1, H)``).
        scale: softmax scale the attention used.
        out: float32 ``[B, T, L]`` (summed over heads) or ``[B, H, T, L]`` (per head), any strides.
        bias: optional additive score bias of the selected columns, broadcastable to ``[B, H, L, T]``.
        blocks: tile sizes; default from :func:`block_sizes` (tests pass small ones to get tails).
    """
    B, H, L, D = reference._check_common(q, k_sel, out, "k_sel")
    T = k_sel.shape[2]
    reference._check_out(out, B, H, T, L)
    if tuple(lse.shape) != (B, H, L):
        raise ValueError(f"lse must be [B, H, L] = {(B, H, L)}, got {tuple(lse.shape)}")
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32 for the Triton kernels, got {out.dtype}")
    check_launchable(q, k_sel, lse, out)
    if B * L * T == 0:
        return out
    capture_from_lse_call(q, k_sel, lse, scale, out, bias=bias, blocks=blocks).launch()
    return out


def capture_from_lse_call(
    q: torch.Tensor,
    k_sel: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    blocks: Blocks | None = None,
    gpu: Gpu | None = None,
) -> KernelCall:
    """The launch :func:`capture_from_lse` makes for these (already checked) arguments, without running it.
    Tensors may live on the ``meta`` device, with ``gpu`` the GPU to build for (default: ``q``'s device):
    ``make kernel-report`` compiles the call for GPUs it lacks."""
    B, H, L, D = q.shape
    T = k_sel.shape[2]
    per_head = out.dim() == 4
    gpu = gpu or gpu_for(q.device)
    bl = blocks or block_sizes("capture_lse", D, T, T, L, q.device, q.dtype, gpu=gpu)
    bias_t, sb = bias_view(bias, (B, H, L, T), q)
    upcast, precision = upcast_for(q.dtype, gpu)
    grid = (triton.cdiv(L, bl.queries), triton.cdiv(T, bl.tokens), B)
    args = (
        q, k_sel, lse, out, bias_t,
        L, T, D, float(scale),
        *q.stride(), *k_sel.stride(), *lse.stride(), *out_strides(out, per_head), *sb,
    )  # fmt: skip
    constants = dict(
        H=H, HAS_BIAS=bias is not None, PER_HEAD=per_head, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_L=bl.queries, BLOCK_T=bl.tokens, BLOCK_D=bl.dim, ALIGN=alignment(D, q.stride(1), k_sel.stride(1)),
    )  # fmt: skip
    return KernelCall(_capture_lse_kernel, grid, args, constants, bl)


# --- torch.library op (so torch.compile sees the kernel as an opaque op) ---

if TRITON_IMPORT_ERROR is None:

    @torch.library.custom_op("daam_fast::triton_capture_from_lse", mutates_args=("out",))
    def _capture_from_lse_op(
        q: torch.Tensor, k_sel: torch.Tensor, lse: torch.Tensor, scale: float, out: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        capture_from_lse(q, k_sel, lse, scale, out, bias=bias)

    @_capture_from_lse_op.register_fake
    def _(q, k_sel, lse, scale, out, bias=None) -> None:
        return None
