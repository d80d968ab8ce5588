"""The ``triton`` capture backend: registers the Triton kernels of :mod:`.triton_capture` (capture from lse)
and :mod:`.triton_fused` (self-normalising capture; fused attention + capture, up to
``triton_fused.MAX_FUSED_KEYS`` keys) with the registry.

Eager calls go straight to the launchers (the custom-op dispatch costs tens of µs per call, a sizeable share
of a capture kernel); under ``torch.compile`` the registered ``daam_fast::triton_*`` ops keep graphs whole.
The kernels are looked up on their modules at call time, so a test may wrap them.
"""

from __future__ import annotations

import torch

from . import triton_capture, triton_fused
from .registry import Backend, register_backend
from .triton_common import INTERPRET, MAX_HEAD_DIM, TRITON_IMPORT_ERROR

__all__: list[str] = []


def _capture_from_lse(q, k_sel, lse, scale, out, *, bias=None, max_chunk_bytes=None):
    if torch.compiler.is_compiling():
        torch.ops.daam_fast.triton_capture_from_lse(q, k_sel, lse, scale, out, bias)
        return out
    return triton_capture.capture_from_lse(q, k_sel, lse, scale, out, bias=bias)


def _capture_self_normalising(q, k, token_idx, scale, out, *, bias=None, max_chunk_bytes=None):
    if torch.compiler.is_compiling():
        torch.ops.daam_fast.triton_capture_self_normalising(q, k, token_idx, scale, out, bias)
        return out
    return triton_fused.capture_self_normalising(q, k, token_idx, scale, out, bias=bias)


def _fused_attention(q, k, v, token_idx, scale, out):
    if torch.compiler.is_compiling():
        return torch.ops.daam_fast.triton_fused_attention_capture(q, k, v, token_idx, scale, out, None)
    return triton_fused.fused_attention_capture(q, k, v, token_idx, scale, out)


def _extra_checks(q: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> list[str]:
    return [] if out.dtype == torch.float32 else [f"out dtype {out.dtype} (the Triton kernels add into float32)"]


register_backend(
    Backend(
        name="triton",
        priority=10,
        capture_from_lse=_capture_from_lse,
        capture_self_normalising=_capture_self_normalising,
        devices=("cuda", "cpu") if INTERPRET else ("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        max_head_dim=MAX_HEAD_DIM,
        supports_bias=True,
        supports_per_head=True,
        available=lambda: TRITON_IMPORT_ERROR,
        extra_checks=_extra_checks,
        fused_attention=_fused_attention,
        max_fused_keys=triton_fused.MAX_FUSED_KEYS,
    )
)
