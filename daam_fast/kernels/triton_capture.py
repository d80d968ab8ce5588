"""Triton capture kernel from the row logsumexp and the shared launch helpers.

``capture_from_lse`` adds ``Σ_h exp(scale·q·k_selᵀ + bias − lse)`` into the fp32 heat buffer. Each
program owns a block of queries × a block of selected tokens of one image, loops over all heads,
sums in registers and does one load + add + store per buffer cell: no atomics, deterministic.
The self-normalising and fused attention + capture kernels live in :mod:`.triton_fused`.

Triton is optional: when it cannot be imported this module still imports, the ``triton`` backend
(:mod:`.triton_backend`) gives the import error as its ``available()`` reason, and nothing here can be launched.
Kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` set **before this module is imported**
they run in Triton's interpreter, on CPU tensors too (that is how the tests run them).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from . import reference

try:
    import triton
    import triton.language as tl
except (ImportError, RuntimeError, OSError, AttributeError) as exc:  # absent, or broken install
    triton = None
    tl = None
    TRITON_IMPORT_ERROR: str | None = f"triton cannot be imported ({type(exc).__name__}: {exc})"
else:
    TRITON_IMPORT_ERROR = None

__all__ = ["INTERPRET", "MAX_HEAD_DIM", "TRITON_IMPORT_ERROR", "Blocks", "block_sizes", "capture_from_lse"]

logger = logging.getLogger(__name__)


def _interpreting() -> bool:
    # Triton decides at @triton.jit time whether a kernel is interpreted, so this is read once, at import.
    if triton is not None and hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET") == "1"


#: True when the kernels below were defined for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).
INTERPRET: bool = _interpreting()


def _no_jit(fn):
    # Stand-in decorator when triton is missing: the kernels stay plain (never launched) functions.
    return fn


_jit = triton.jit if triton is not None else _no_jit

#: Largest padded head dim the kernels accept (the q tile is BLOCK_L × next_pow2(D)).
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Blocks:
    """Tile sizes of one launch: ``queries``, selected ``tokens``, head ``dim`` (padded to a power of
    two, masked), ``keys`` per online-softmax step, and ``num_warps`` per program."""

    queries: int
    tokens: int
    dim: int
    keys: int = 16
    num_warps: int = 4


# GPU tiles by padded head dim: (largest query block, keys per online-softmax step). The live fp32 tiles
# are the BLOCK_L × BLOCK_T heat accumulator, the BLOCK_L × BLOCK_S scores and the BLOCK_L × BLOCK_D
# query / output tiles. Untuned starting points (no GPU was at hand): autotuning over a pruned list
# keyed on (D, T, L) is the next step once benchmarks/bench_kernels_gpu.py runs on a real device.
_GPU_TABLE = {16: (128, 128), 32: (128, 128), 64: (64, 128), 128: (64, 64), 256: (32, 64)}
_GPU_MAX_BLOCK_T = 128
_GPU_MIN_BLOCK_L = 16  # tl.dot needs M, N, K ≥ 16 on GPUs

# The interpreter's cost is per program and per op, nearly independent of tile size: one big tile.
_INTERP_BLOCK_L = 128
_INTERP_MAX_BLOCK = 512


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def block_sizes(head_dim: int, n_cols: int, n_keys: int, n_rows: int, n_batch: int, device: torch.device) -> Blocks:
    """Tiles for ``n_batch`` images × ``n_rows`` queries × ``n_cols`` selected tokens, ``head_dim``, ``n_keys`` keys.

    GPUs: the table above, then the query block halves (down to 16) while the grid has fewer programs
    than the device has SMs (at SDXL's 32² grid, 1024 queries × 2 images, 64-query blocks would leave
    most of an H100 idle); 8 warps once a 2-D tile exceeds 4096 elements, to keep registers per thread
    bounded. Interpreter: the largest tiles (fewest programs).
    """
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    bd = _pow2(head_dim)
    if INTERPRET or device.type != "cuda":
        return Blocks(
            queries=_INTERP_BLOCK_L,
            tokens=min(_pow2(n_cols), _INTERP_MAX_BLOCK),
            dim=bd,
            keys=min(_pow2(n_keys), _INTERP_MAX_BLOCK),
        )
    bl, bs = _GPU_TABLE[bd]
    bs = min(bs, _pow2(n_keys))
    bt = min(_pow2(n_cols), _GPU_MAX_BLOCK_T)
    n_sm = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    while bl > _GPU_MIN_BLOCK_L and n_batch * triton.cdiv(n_rows, bl) * triton.cdiv(n_cols, bt) < n_sm:
        bl //= 2
    warps = 4 if bl * max(bt, bs, bd) <= 4096 else 8
    return Blocks(queries=bl, tokens=bt, dim=bd, keys=bs, num_warps=warps)


def upcast_for(dtype: torch.dtype) -> tuple[bool, str | None]:
    """``(UPCAST, DOT_PRECISION)`` kernel constants for inputs of ``dtype``.

    The interpreter computes bf16 ``tl.dot`` wrongly, so there every tile is cast to fp32 first. On GPUs
    fp16/bf16 tiles go to the tensor cores as they are (products exact in the fp32 accumulator, the
    backend's default precision) and fp32 tiles use IEEE fp32, not TF32, so fp32 inputs keep fp32 accuracy.
    """
    upcast = INTERPRET or dtype == torch.float32
    return upcast, ("ieee" if upcast else None)


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise when the Triton kernels cannot run on these tensors in this process."""
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(TRITON_IMPORT_ERROR)
    dev = tensors[0].device
    if dev.type != "cuda" and not INTERPRET:
        raise ValueError(f"Triton kernels need CUDA tensors (got {dev}); set TRITON_INTERPRET=1 to interpret on CPU")
    if tensors[0].dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"Triton kernels take float16, bfloat16 or float32 inputs, got {tensors[0].dtype}")


def out_strides(out: torch.Tensor, per_head: bool) -> tuple[int, int, int, int]:
    """``(batch, head, token, query)`` strides of the heat buffer; head stride 0 when summed over heads."""
    if per_head:
        return out.stride(0), out.stride(1), out.stride(2), out.stride(3)
    return out.stride(0), 0, out.stride(1), out.stride(2)


def bias_view(bias: torch.Tensor | None, shape: tuple[int, int, int, int], like: torch.Tensor):
    """``(tensor, strides)`` of ``bias`` broadcast to ``shape`` = ``[B, H, L, C]`` (stride 0 where it
    broadcasts); a 1-element dummy and zero strides without a bias."""
    if bias is None:
        return like, (0, 0, 0, 0)
    b = bias.expand(shape)
    return b, b.stride()


# Loop trip counts (heads here, key blocks in triton_fused) are constexpr: they take few values per
# model (one recompile each), and Triton 3.6's interpreter cannot loop over a runtime int under
# numpy >= 2.4 (triton-lang/triton#9171).
@_jit
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
    BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_l = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64 offsets: big batches of big images overflow int32
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
        q = tl.load(q_ptrs + h * sq_h, mask=mask_l[:, None] & mask_d[None, :], other=0.0)
        kt = tl.load(k_ptrs + h * sk_h, mask=mask_d[:, None] & mask_t[None, :], other=0.0)
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
    per_head = reference._check_out(out, B, H, T, L)
    if tuple(lse.shape) != (B, H, L):
        raise ValueError(f"lse must be [B, H, L] = {(B, H, L)}, got {tuple(lse.shape)}")
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32 for the Triton kernels, got {out.dtype}")
    check_launchable(q, k_sel, lse, out)
    if B * L * T == 0:
        return out
    bl = blocks or block_sizes(D, T, T, L, B, q.device)
    bias_t, sb = bias_view(bias, (B, H, L, T), q)
    upcast, precision = upcast_for(q.dtype)
    grid = (triton.cdiv(L, bl.queries), triton.cdiv(T, bl.tokens), B)
    _capture_lse_kernel[grid](
        q, k_sel, lse, out, bias_t,
        L, T, D, float(scale),
        *q.stride(), *k_sel.stride(), *lse.stride(), *out_strides(out, per_head), *sb,
        H=H, HAS_BIAS=bias is not None, PER_HEAD=per_head, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_L=bl.queries, BLOCK_T=bl.tokens, BLOCK_D=bl.dim, num_warps=bl.num_warps,
    )  # fmt: skip
    return out


# --- torch.library ops (so torch.compile sees the kernels as opaque ops) ---

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
