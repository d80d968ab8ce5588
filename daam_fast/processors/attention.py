"""Attention calls that also return the row log-sum-exp, with the same output as
``F.scaled_dot_product_attention`` would give.

The capture kernels need ``lse[b, h, i] = logsumexp_j(scale·q·k + bias)``. Flash-style attention
computes it anyway; these helpers call the op that SDPA itself would dispatch to and keep its lse, so
the attention output (and therefore the image) is unchanged by tracing.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = ["attention_with_lse", "mask_to_bias"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    # Logging while torch.compile traces would break the graph; eager calls give the message.
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        logger.info(msg)


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` as an additive bias: boolean masks (True = attend) become 0 / -inf."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf")).expand(mask.shape)


def _cpu_flash(q, k, v, mask, scale):
    # The op takes only float masks of q's dtype; SDPA converts boolean ones to 0 / -inf the same way.
    if mask is not None and mask.dtype == torch.bool:
        mask = mask_to_bias(mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )
    return out, lse


def _cuda_flash(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], res[1]


def _cuda_efficient(q, k, v, mask, scale):
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, 0.0, False, scale=scale)
    # The efficient kernel pads lse's query dim to a multiple of its block size.
    return res[0], res[1][..., : q.shape[2]]


def _cuda_cudnn(q, k, v, mask, scale):
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, mask, True, 0.0, False, False, scale=scale)
    lse = res[1]
    if lse.dim() == 4:  # [B, H, L, 1] on torch >= 2.9
        lse = lse.squeeze(-1)
    return res[0], lse


# torch's SDPBackend values, in the order SDPA tries them by default (math accepts everything).
_FLASH, _EFFICIENT, _MATH, _CUDNN = 1, 2, 0, 3
_DEFAULT_ORDER = (_FLASH, _EFFICIENT, _MATH, _CUDNN)


@torch._dynamo.assume_constant_result
def _sdp_state() -> tuple[bool, bool, bool, bool, tuple[int, ...]]:
    """SDPA's enabled flags (flash, efficient, math, cuDNN) and priority order. torch.compile cannot
    trace these getters; it takes their value when it compiles (as a constant, like SDPA's own choice)."""
    c = torch.backends.cuda
    order = tuple(torch._C._get_sdp_priority_order()) or _DEFAULT_ORDER
    return c.flash_sdp_enabled(), c.mem_efficient_sdp_enabled(), c.math_sdp_enabled(), c.cudnn_sdp_enabled(), order


def _choose(q, k, v, mask) -> str | None:
    try:
        from torch.backends.cuda import (
            SDPAParams,
            can_use_cudnn_attention,
            can_use_efficient_attention,
            can_use_flash_attention,
        )

        params = SDPAParams(q, k, v, mask, 0.0, False, False)
    except (ImportError, TypeError, RuntimeError):
        return None
    flash, efficient, math, cudnn, order = _sdp_state()
    for backend in order:
        if backend == _FLASH and flash and mask is None and can_use_flash_attention(params, False):
            return "flash"
        if backend == _EFFICIENT and efficient and can_use_efficient_attention(params, False):
            return "efficient"
        if backend == _CUDNN and cudnn and can_use_cudnn_attention(params, False):
            return "cudnn"
        if backend == _MATH and math:
            return None
    return None


def _meta(t: torch.Tensor) -> tuple:
    return tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device)


@torch._dynamo.assume_constant_result
def _choose_static(qm: tuple, km: tuple, vm: tuple, mm: tuple | None) -> str | None:
    # Evaluated once while torch.compile traces (SDPAParams cannot be traced): empty tensors with the
    # inputs' sizes, strides, dtypes and device stand in for them.
    q, k, v, mask = (
        None if m is None else torch.empty_strided(m[0], m[1], dtype=m[2], device=m[3]) for m in (qm, km, vm, mm)
    )
    return _choose(q, k, v, mask)


def _cuda_choice(q, k, v, mask) -> str | None:
    """Which lse-returning fused kernel SDPA would run for these inputs, or None (math / other).

    Follows SDPA's enabled flags and priority order (``sdpa_kernel(..., set_priority=True)`` changes
    it), so tracing runs the kernel the model would run."""
    if torch.compiler.is_compiling():
        return _choose_static(_meta(q), _meta(k), _meta(v), None if mask is None else _meta(mask))
    return _choose(q, k, v, mask)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled-dot-product attention that also returns the row log-sum-exp when the kernel has it.

    Args:
        q: ``[B, H, L, D]``; k, v: ``[B, H, S, D]``; same dtype (fp16 / bf16 / fp32; fp64 takes the math path).
        attn_mask: additive float or boolean mask broadcastable to ``[B, H, L, S]``, as SDPA takes it.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``(out [B, H, L, D] in q's dtype, lse [B, H, L] float32 or None)``. ``lse`` is ``None`` when
        SDPA would run a kernel that gives none (math, other devices); then ``out`` comes from
        ``F.scaled_dot_product_attention`` itself and callers use the self-normalising capture.
    """
    cpu_flash = _sdp_state()[0]  # SDPA reads the flash flag on every device
    if (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not q.requires_grad
        and cpu_flash
    ):
        return _cpu_flash(q, k, v, attn_mask, scale)
    if q.device.type == "cuda" and not q.requires_grad:
        choice = _cuda_choice(q, k, v, attn_mask)
        try:
            if choice == "flash":
                return _cuda_flash(q, k, v, scale)
            if choice == "efficient":
                return _cuda_efficient(q, k, v, attn_mask, scale)
            if choice == "cudnn":
                return _cuda_cudnn(q, k, v, attn_mask, scale)
        except RuntimeError as exc:  # e.g. an arch the prebuilt kernel lacks: SDPA would pick another one
            _warn_once(f"cuda-{choice}", f"{choice} SDPA op with lse failed ({exc}); capturing self-normalised")
    _warn_once(
        f"{q.device.type}-{q.dtype}",
        f"no lse-returning SDPA kernel for {q.device.type}/{q.dtype}; capture computes its own row logsumexp",
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, scale=scale), None
