"""Triton kernels that compute the row logsumexp themselves: self-normalising capture, and fused
cross-attention + capture.

One kernel serves both. A program owns a block of queries × a block of selected tokens of one image
and loops over all heads; per head it runs the flash-attention online softmax over all ``S`` keys
(running max and sum, and with ``v`` the running output), then computes the selected columns
``exp(scale·q·k[token_idx]ᵀ + bias − lse)`` from that lse, which never leaves registers, sums them
over heads and adds them into the heat buffer with one load + add + store per cell (no atomics).
The fused variant also writes the attention output ``o`` as SDPA would (programs of the first token
block only), so a cross-attention layer costs one kernel instead of attention + capture.
"""

from __future__ import annotations

import torch

from . import reference
from .triton_common import (
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

__all__ = ["MAX_FUSED_KEYS", "attn_capture_call", "capture_self_normalising", "fused_attention_capture"]

#: Longest key sequence :func:`fused_attention_capture` takes. It is built for text-length keys (SD/SDXL
#: cross-attention, 77 per CLIP window): every program streams all keys and values of each head, which
#: is cheap for short sequences; for long ones run flash attention and capture from its lse instead.
MAX_FUSED_KEYS = 512


@jit
def _attn_capture_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, out_ptr, bias_ptr,
    L, S, T, D, scale,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    so_b, so_h, so_l, so_d,
    sh_b, sh_h, sh_t, sh_l,
    sb_b, sb_h, sb_l, sb_s,
    H: tl.constexpr, KEY_BLOCKS: tl.constexpr,
    HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr, PER_HEAD: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    pid_l = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    D = tl.multiple_of(D, ALIGN)  # see triton_common.alignment: lets q, k, v, o rows move as vectors
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_l = offs_l < L
    mask_t = offs_t < T
    mask_d = offs_d < D
    mask_lt = mask_l[:, None] & mask_t[None, :]
    tok = tl.load(idx_ptr + offs_t, mask=mask_t, other=0)
    # Out-of-range indices (only possible for unchecked device tensors) read zeros, never stray memory.
    tok_ok = mask_t & (tok >= 0) & (tok < S)
    q_ptrs = q_ptr + b * sq_b + offs_l[:, None] * sq_l + offs_d[None, :] * sq_d
    heat_ptrs = out_ptr + b * sh_b + offs_t[None, :] * sh_t + offs_l[:, None] * sh_l
    acc = tl.zeros((BLOCK_L, BLOCK_T), dtype=tl.float32)
    for h in range(H):
        q = tl.load(q_ptrs + tl.multiple_of(h * sq_h, ALIGN), mask=mask_l[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_head = k_ptr + b * sk_b + tl.multiple_of(h * sk_h, ALIGN)
        v_head = v_ptr + b * sv_b + tl.multiple_of(h * sv_h, ALIGN)
        m_i = tl.full((BLOCK_L,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_L,), dtype=tl.float32)
        if HAS_V:
            acc_o = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for kb in range(KEY_BLOCKS):
            offs_s = kb * BLOCK_S + tl.arange(0, BLOCK_S)
            mask_s = offs_s < S
            kt = tl.load(
                k_head + offs_s[None, :] * sk_s + offs_d[:, None] * sk_d,
                mask=mask_d[:, None] & mask_s[None, :],
                other=0.0,
            )
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
            if HAS_BIAS:
                bias_ptrs = bias_ptr + b * sb_b + h * sb_h + offs_l[:, None] * sb_l + offs_s[None, :] * sb_s
                s += tl.load(bias_ptrs, mask=mask_l[:, None] & mask_s[None, :], other=0.0).to(tl.float32)
            # Every key block holds at least one real key, so the running max is finite after it.
            s = tl.where(mask_s[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_V:
                v = tl.load(
                    v_head + offs_s[:, None] * sv_s + offs_d[None, :] * sv_d,
                    mask=mask_s[:, None] & mask_d[None, :],
                    other=0.0,
                )
                if UPCAST:
                    v = v.to(tl.float32)
                # As flash SDPA does: probabilities rounded to the input dtype for the PV product.
                acc_o = acc_o * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        lse = m_i + tl.log(l_i)
        if HAS_V:
            # A branch, not a `& (pid_t == 0)` in the mask: Triton 3.9's interpreter types a block mask
            # and-ed with a scalar comparison as int32 and refuses it; the branch also skips the work.
            if pid_t == 0:
                o_head = o_ptr + b * so_b + tl.multiple_of(h * so_h, ALIGN)
                o_ptrs = o_head + offs_l[:, None] * so_l + offs_d[None, :] * so_d
                o_mask = mask_l[:, None] & mask_d[None, :]
                tl.store(o_ptrs, (acc_o / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=o_mask)
        ksel = tl.load(
            k_head + tok[None, :] * sk_s + offs_d[:, None] * sk_d, mask=mask_d[:, None] & tok_ok[None, :], other=0.0
        )
        if UPCAST:
            ksel = ksel.to(tl.float32)
        s_sel = tl.dot(q, ksel, input_precision=DOT_PRECISION) * scale
        if HAS_BIAS:
            bias_ptrs = bias_ptr + b * sb_b + h * sb_h + offs_l[:, None] * sb_l + tok[None, :] * sb_s
            s_sel += tl.load(bias_ptrs, mask=mask_l[:, None] & tok_ok[None, :], other=0.0).to(tl.float32)
        p_sel = tl.exp(s_sel - lse[:, None])
        if PER_HEAD:
            cell = heat_ptrs + h * sh_h
            tl.store(cell, tl.load(cell, mask=mask_lt, other=0.0) + p_sel, mask=mask_lt)
        else:
            acc += p_sel
    if not PER_HEAD:
        tl.store(heat_ptrs, tl.load(heat_ptrs, mask=mask_lt, other=0.0) + acc, mask=mask_lt)


def _token_idx(token_idx, S: int, device: torch.device) -> torch.Tensor:
    # Range-check on the host only when the indices are there: checking a device tensor would
    # synchronise every call. The kernel masks out-of-range indices either way.
    t = torch.as_tensor(token_idx)
    if t.device.type == "cpu":
        t = reference._check_token_idx(t, S, t.device).contiguous()  # the kernel reads it densely
        return t.to(device, non_blocking=True)
    t = t.to(device=device, dtype=torch.long).reshape(-1).contiguous()
    if t.numel() == 0:
        raise ValueError("token_idx is empty: select at least one key column")
    return t


def _launch(q, k, v, token_idx, scale, out, bias, blocks: Blocks | None) -> torch.Tensor | None:
    B, H, L, D = reference._check_common(q, k, out, "k")
    S = k.shape[2]
    idx = _token_idx(token_idx, S, q.device)
    T = idx.numel()
    reference._check_out(out, B, H, T, L)
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32 for the Triton kernels, got {out.dtype}")
    check_launchable(q, k, out)
    o = None
    if v is not None:
        if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
            raise ValueError(f"v must match k: k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}")
        # [B, L, H, D] memory seen as [B, H, L, D], the layout flash SDPA returns: the caller's
        # transpose(1, 2).reshape(B, L, H·D) is then a free view.
        o = torch.empty(B, L, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    if B * L == 0:
        return o
    attn_capture_call(q, k, v, o, idx, scale, out, bias=bias, blocks=blocks).launch()
    return o


def attn_capture_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    o: torch.Tensor | None,
    idx: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    blocks: Blocks | None = None,
    gpu: Gpu | None = None,
) -> KernelCall:
    """The launch of the self-normalising (``v`` and ``o`` None) or fused kernel for already checked arguments
    (``idx`` the ``[T]`` int64 token indices on the device, ``o`` the output ``[B, H, L, D]`` view), without
    running it. Tensors may live on the ``meta`` device, with ``gpu`` the GPU to build for (default: ``q``'s
    device): ``make kernel-report`` compiles the call for GPUs it lacks."""
    B, H, L, D = q.shape
    S = k.shape[2]
    T = idx.numel()
    per_head = out.dim() == 4
    kernel = "fused" if v is not None else "self_normalising"
    gpu = gpu or gpu_for(q.device)
    bl = blocks or block_sizes(kernel, D, T, S, L, q.device, q.dtype, gpu=gpu)
    bias_t, sb = bias_view(bias, (B, H, L, S), q)
    upcast, precision = upcast_for(q.dtype, gpu)
    v_t, sv = (v, v.stride()) if v is not None else (k, (0, 0, 0, 0))
    o_t, so = (o, o.stride()) if o is not None else (q, (0, 0, 0, 0))
    grid = (triton.cdiv(L, bl.queries), triton.cdiv(T, bl.tokens), B)
    args = (
        q, k, v_t, o_t, idx, out, bias_t,
        L, S, T, D, float(scale),
        *q.stride(), *k.stride(), *sv, *so, *out_strides(out, per_head), *sb,
    )  # fmt: skip
    constants = dict(
        H=H, KEY_BLOCKS=triton.cdiv(S, bl.keys), HAS_V=v is not None, HAS_BIAS=bias is not None, PER_HEAD=per_head,
        UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_L=bl.queries, BLOCK_T=bl.tokens, BLOCK_S=bl.keys, BLOCK_D=bl.dim,
        ALIGN=alignment(D, q.stride(1), k.stride(1), sv[1], so[1]),
    )  # fmt: skip
    return KernelCall(_attn_capture_kernel, grid, args, constants, bl)


@torch.no_grad()
def capture_self_normalising(
    q: torch.Tensor,
    k: torch.Tensor,
    token_idx: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """Triton :func:`daam_fast.kernels.reference.capture_self_normalising`: computes each row's
    logsumexp over all keys, then adds the selected columns ``Σ_h softmax(scale·q·kᵀ + bias)[..., token_idx]``
    into ``out`` in place; returns ``out``.

    Args:
        q: ``[B, H, L, D]`` float16 / bfloat16 / float32, any strides.
        k: ``[B, H, S, D]`` all keys, same dtype, any strides.
        token_idx: ``[T]`` integer positions in ``0..S-1`` (range-checked when on the CPU).
        scale: softmax scale.
        out: float32 ``[B, T, L]`` or ``[B, H, T, L]``, added to in place.
        bias: optional additive bias broadcastable to ``[B, H, L, S]``.
        blocks: tile sizes; default from :func:`.triton_common.block_sizes`.
    """
    _launch(q, k, None, token_idx, scale, out, bias, blocks)
    return out


@torch.no_grad()
def fused_attention_capture(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_idx: torch.Tensor,
    scale: float | None,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """Attention output ``softmax(scale·q·kᵀ + bias)·v`` (as ``F.scaled_dot_product_attention``), and,
    in the same pass, the selected columns of the softmax summed over heads added into ``out``.

    Args:
        q: ``[B, H, L, D]`` float16 / bfloat16 / float32, any strides.
        k, v: ``[B, H, S, D]`` with ``S ≤`` :data:`MAX_FUSED_KEYS`, same dtype, any strides.
        token_idx: ``[T]`` integer key positions to capture.
        scale: softmax scale; ``None`` means ``D ** -0.5`` as in SDPA.
        out: float32 heat buffer ``[B, T, L]`` or ``[B, H, T, L]``, added to in place.
        bias: optional additive float bias broadcastable to ``[B, H, L, S]`` (SDPA's float ``attn_mask``).
        blocks: tile sizes; default from :func:`.triton_common.block_sizes`.

    Returns:
        ``o`` ``[B, H, L, D]`` in ``q``'s dtype (fp32 accumulation), stored as ``[B, L, H, D]`` memory.
    """
    if k.dim() == 4 and k.shape[2] > MAX_FUSED_KEYS:
        raise ValueError(
            f"fused_attention_capture takes at most {MAX_FUSED_KEYS} keys, got {k.shape[2]}: run attention "
            "with lse and capture_from_lse instead"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _launch(q, k, v, token_idx, scale, out, bias, blocks)


if TRITON_IMPORT_ERROR is None:

    @torch.library.custom_op("daam_fast::triton_capture_self_normalising", mutates_args=("out",))
    def _capture_self_normalising_op(
        q: torch.Tensor, k: torch.Tensor, token_idx: torch.Tensor, scale: float, out: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        capture_self_normalising(q, k, token_idx, scale, out, bias=bias)

    @_capture_self_normalising_op.register_fake
    def _(q, k, token_idx, scale, out, bias=None) -> None:
        return None

    @torch.library.custom_op("daam_fast::triton_fused_attention_capture", mutates_args=("out",))
    def _fused_attention_capture_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_idx: torch.Tensor, scale: float,
        out: torch.Tensor, bias: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        return fused_attention_capture(q, k, v, token_idx, scale, out, bias=bias)

    @_fused_attention_capture_op.register_fake
    def _(q, k, v, token_idx, scale, out, bias=None) -> torch.Tensor:
        B, H, L, D = q.shape
        return q.new_empty(B, L, H, D).transpose(1, 2)
