"""Dispatch: every kernel choice of the package is made here.

Each backend declares what it supports (:class:`~.registry.Backend`) and answers
``not_supported_reasons(...) -> list[str]``. Dispatch walks the registry in priority order
(cuda → triton → torch) and takes the first backend with no reasons. A backend forced by argument or by
the ``DAAM_FAST_BACKEND`` environment variable raises when it cannot run the call; an automatic pick
never does (``torch`` runs everything).

The fused attention + capture kernel is a backend capability too (``Backend.fused_attention``, up to
``Backend.max_fused_keys`` keys): :func:`fused_attention_capture` asks :func:`select_backend` for a backend
that has it and answers ``None`` when none can run the call, so the caller keeps the model's own attention.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import reference
from .registry import _REGISTRY, ENV_VAR, Backend, BackendUnavailable, backends, register_backend

__all__ = [
    "ENV_VAR",
    "Backend",
    "BackendUnavailable",
    "backends",
    "capture_from_lse",
    "capture_self_normalising",
    "fused_attention_capture",
    "register_backend",
    "select_backend",
]

register_backend(
    Backend(
        name="torch",
        priority=0,
        capture_from_lse=reference.capture_from_lse,
        capture_self_normalising=reference.capture_self_normalising,
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        devices=("cpu", "cuda", "mps", "xpu"),
    )
)


def _forced(backend: str | None) -> str | None:
    forced = backend or os.environ.get(ENV_VAR) or None
    if forced is None or forced == "auto":
        return None
    if forced not in _REGISTRY:
        raise ValueError(f"unknown capture backend {forced!r}; valid: {sorted(_REGISTRY)} or 'auto'")
    return forced


def _pick(q, out, bias, forced: str | None, fused_keys: int | None) -> tuple[Backend | None, dict[str, list[str]]]:
    """The first backend (the forced one only, when given) that can run the call, and why the others cannot."""
    candidates = [_REGISTRY[forced]] if forced is not None else backends()
    rejected = {}
    for b in candidates:
        reasons = b.not_supported_reasons(q, out, bias, fused_keys=fused_keys)
        if not reasons:
            return b, rejected
        rejected[b.name] = reasons
    return None, rejected


def select_backend(
    q: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
    *,
    fused_keys: int | None = None,
) -> Backend:
    """Pick the backend for a call: the forced one (argument, else ``DAAM_FAST_BACKEND``) or the
    fastest that supports it. ``fused_keys``: the call wants fused attention + capture over that many keys
    (only backends with that capability and limit qualify). Raises :class:`BackendUnavailable` when a forced
    backend cannot run it or nothing can, ``ValueError`` for an unknown backend name."""
    forced = _forced(backend)
    chosen, rejected = _pick(q, out, bias, forced, fused_keys)
    if chosen is not None:
        return chosen
    what = f"q{tuple(q.shape)} {q.dtype} on {q.device} into out{tuple(out.shape)}"
    if fused_keys is not None:
        what = f"fused attention over {fused_keys} keys for {what}"
    if forced is not None:
        reasons = "; ".join(rejected[forced])
        raise BackendUnavailable(f"capture backend {forced!r} was forced but cannot run {what}: {reasons}")
    lines = [f"{name}: " + "; ".join(reasons) for name, reasons in rejected.items()]
    raise BackendUnavailable(f"no capture backend supports {what}:\n  " + "\n  ".join(lines))


def capture_from_lse(
    q, k_sel, lse, scale, out, *, bias=None, backend=None, max_chunk_bytes=reference.DEFAULT_CHUNK_BYTES
):
    """Dispatching :func:`daam_fast.kernels.reference.capture_from_lse` (same shapes and dtypes)."""
    b = select_backend(q, out, bias, backend)
    return b.capture_from_lse(q, k_sel, lse, scale, out, bias=bias, max_chunk_bytes=max_chunk_bytes)


def capture_self_normalising(
    q, k, token_idx, scale, out, *, bias=None, backend=None, max_chunk_bytes=reference.DEFAULT_CHUNK_BYTES
):
    """Dispatching :func:`daam_fast.kernels.reference.capture_self_normalising` (same shapes and dtypes)."""
    b = select_backend(q, out, bias, backend)
    return b.capture_self_normalising(q, k, token_idx, scale, out, bias=bias, max_chunk_bytes=max_chunk_bytes)


def fused_attention_capture(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_idx: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    rows: slice | None = None,
    backend: str | None = None,
) -> torch.Tensor | None:
    """Attention output and capture in one kernel, when a backend (the forced one, else any) has that capability.

    Args:
        q: ``[B, H, L, D]``; k, v: ``[B, H, S, D]``; scale: the softmax scale.
        token_idx: ``[T]`` int64 key positions to capture.
        out: fp32 heat buffer ``[R, T, L]`` or ``[R, H, T, L]`` for the traced rows, added to in place.
        rows: the traced rows of the batch (``R`` of them, default all); the other rows (CFG's unconditional
            half) go through SDPA without capture.
        backend: a forced backend name, as for :func:`select_backend`.

    Returns:
        ``o`` ``[B, H, L, D]`` in ``q``'s dtype, or ``None`` when no backend can fuse this call (nothing was
        computed; run attention and capture from its lse instead). Never raises for a missing capability.
    """
    rows = slice(0, q.shape[0]) if rows is None else rows
    forced = _forced(backend)
    chosen, _ = _pick(q, out, None, forced, k.shape[2])
    if chosen is None:
        return None
    traced = chosen.fused_attention(q[rows], k[rows], v[rows], token_idx, scale, out)
    if rows.start == 0 and rows.stop == q.shape[0]:
        return traced
    parts = [traced]
    if rows.start > 0:
        head = slice(0, rows.start)
        parts.insert(0, F.scaled_dot_product_attention(q[head], k[head], v[head], scale=scale))
    if rows.stop < q.shape[0]:
        tail = slice(rows.stop, q.shape[0])
        parts.append(F.scaled_dot_product_attention(q[tail], k[tail], v[tail], scale=scale))
    return torch.cat([p.to(parts[0].dtype) for p in parts])


def _register_optional_backends() -> None:
    # Optional backends register themselves on import; a missing dependency (no triton, no built
    # extension) shows up as that backend's `available()` reason, never as an import error here.
    from . import cuda, triton_backend  # noqa: F401


_register_optional_backends()
