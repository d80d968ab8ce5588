"""Dispatch: every kernel choice of the package is made here.

Each backend declares what it supports (:class:`~.registry.Backend`) and answers
``not_supported_reasons(...) -> list[str]``. Dispatch walks the registry in priority order
(cuda → triton → torch) and takes the first backend with no reasons. A backend forced by argument or by
the ``DAAM_FAST_BACKEND`` environment variable raises when it cannot run the call; an automatic pick
never does (``torch`` runs everything).

Trust, then verify (:mod:`.verify`): the first call per (backend, kernel, device, dtype, head dim) checks the
backend on a slice of that call's own inputs against the float64 reference. An automatic pick that fails (a
compile or launch error, or different numbers) is disabled for that key in this process with one warning, and
the next backend runs the call; a forced one raises :class:`BackendCheckError`.

The fused attention + capture kernel is a backend capability too (``Backend.fused_attention``, up to
``Backend.max_fused_keys`` keys): :func:`fused_attention_capture` uses a backend that has it and answers
``None`` when none can run the call, so the caller keeps the model's own attention.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from . import reference, verify
from .registry import _REGISTRY, ENV_VAR, Backend, BackendUnavailable, backends, register_backend

logger = logging.getLogger(__name__)

#: The reference backend: the oracle of the first-use checks, never checked itself.
ORACLE = "torch"


class BackendCheckError(BackendUnavailable):
    """A forced backend failed its first-use check (compile / launch error, or results that differ from the
    float64 reference); the message says how."""


__all__ = [
    "ENV_VAR",
    "Backend",
    "BackendCheckError",
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
        name=ORACLE,
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


def _pick(q, out, bias, forced: str | None, fused_keys: int | None, kernel: str):
    """``(backend, check key)`` of the backends (the forced one only, when given) that can run the call, in order,
    and why the others cannot. Backends whose first-use check failed for this key in this process are skipped
    unless forced."""
    candidates = [_REGISTRY[forced]] if forced is not None else backends()
    usable, rejected = [], {}
    for b in candidates:
        reasons = b.not_supported_reasons(q, out, bias, fused_keys=fused_keys)
        key = verify.CHECKS.key(b, kernel, q)
        failed = verify.CHECKS.failed(key)
        if not reasons and failed is not None and forced is None:
            reasons = [f"disabled in this process after its first-use check: {failed}"]
        if reasons:
            rejected[b.name] = reasons
        else:
            usable.append((b, key))
    return usable, rejected


def _unavailable(q, out, fused_keys, forced, rejected) -> BackendUnavailable:
    what = f"q{tuple(q.shape)} {q.dtype} on {q.device} into out{tuple(out.shape)}"
    if fused_keys is not None:
        what = f"fused attention over {fused_keys} keys for {what}"
    if forced is not None:
        return BackendUnavailable(
            f"capture backend {forced!r} was forced but cannot run {what}: " + "; ".join(rejected[forced])
        )
    lines = [f"{name}: " + "; ".join(reasons) for name, reasons in rejected.items()]
    return BackendUnavailable(f"no capture backend supports {what}:\n  " + "\n  ".join(lines))


def select_backend(
    q: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
    *,
    fused_keys: int | None = None,
) -> Backend:
    """Pick the backend for a call: the forced one (argument, else ``DAAM_FAST_BACKEND``) or the
    fastest that supports it and has not failed its first-use check in this process. ``fused_keys``: the call
    wants fused attention + capture over that many keys (only backends with that capability and limit qualify).
    Raises :class:`BackendUnavailable` when a forced backend cannot run it or nothing can, ``ValueError`` for an
    unknown backend name. (The first-use check itself runs when a dispatching function calls the backend.)"""
    forced = _forced(backend)
    kernel = "fused" if fused_keys is not None else "capture_from_lse"
    usable, rejected = _pick(q, out, bias, forced, fused_keys, kernel)
    if usable:
        return usable[0][0]
    raise _unavailable(q, out, fused_keys, forced, rejected)


def _run(kernel: str, q, out, bias, backend, fused_keys, call, check):
    """Run ``call(b)`` on the first usable backend ``b``, checking it first (``check(b)``: None or a reason) when
    this (backend, kernel, device, dtype, head dim) has not been checked in this process. An automatic pick that
    fails its check, or raises, is disabled for that key with one warning and the next backend runs; a forced
    one raises its own error, or :class:`BackendCheckError` when its numbers differ. Returns
    ``(result, backend)``, or ``(None, None)`` for a fused call no backend can take."""
    forced = _forced(backend)
    usable, rejected = _pick(q, out, bias, forced, fused_keys, kernel)
    compiling = torch.compiler.is_compiling()
    for b, key in usable:
        if compiling or b.name == ORACLE:
            return call(b), b
        # A forced backend's own compile / launch error reaches the caller unchanged.
        why = verify.CHECKS.run(key, lambda b=b: check(b), raise_errors=forced is not None)
        if why is None:
            try:
                return call(b), b
            except Exception as exc:  # compile / launch errors of a specialisation the check did not build
                if forced is not None:
                    raise
                why = f"{type(exc).__name__}: {exc}"
                verify.CHECKS.disable(key, why)
        elif forced is not None:
            raise BackendCheckError(f"capture backend {b.name!r} was forced but failed its first-use check: {why}")
        logger.warning(
            "capture backend %r disabled for %s (%s, %s, head dim %d) in this process: %s; using the next backend",
            b.name, kernel, q.device, q.dtype, q.shape[-1], why,
        )  # fmt: skip
        rejected[b.name] = [why]
    if fused_keys is not None:
        return None, None
    raise _unavailable(q, out, fused_keys, forced, rejected)


def capture_from_lse(
    q, k_sel, lse, scale, out, *, bias=None, backend=None, max_chunk_bytes=reference.DEFAULT_CHUNK_BYTES
):
    """Dispatching :func:`daam_fast.kernels.reference.capture_from_lse` (same shapes and dtypes), first-use
    checked (see :mod:`.verify`)."""
    result, _ = _run(
        "capture_from_lse", q, out, bias, backend, None,
        lambda b: b.capture_from_lse(q, k_sel, lse, scale, out, bias=bias, max_chunk_bytes=max_chunk_bytes),
        lambda b: verify.check_from_lse(b, q, k_sel, lse, scale, out, bias),
    )  # fmt: skip
    return result


def capture_self_normalising(
    q, k, token_idx, scale, out, *, bias=None, backend=None, max_chunk_bytes=reference.DEFAULT_CHUNK_BYTES
):
    """Dispatching :func:`daam_fast.kernels.reference.capture_self_normalising` (same shapes and dtypes),
    first-use checked (see :mod:`.verify`)."""
    result, _ = _run(
        "capture_self_normalising", q, out, bias, backend, None,
        lambda b: b.capture_self_normalising(q, k, token_idx, scale, out, bias=bias, max_chunk_bytes=max_chunk_bytes),
        lambda b: verify.check_self_normalising(b, q, k, token_idx, scale, out, bias),
    )  # fmt: skip
    return result


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
    """Attention output and capture in one kernel, when a backend (the forced one, else any) has that capability
    and passes its first-use check (see :mod:`.verify`).

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
    qr, kr, vr = q[rows], k[rows], v[rows]
    traced, chosen = _run(
        "fused", qr, out, None, backend, k.shape[2],
        lambda b: b.fused_attention(qr, kr, vr, token_idx, scale, out),
        lambda b: verify.check_fused(b, qr, kr, vr, token_idx, scale, out),
    )  # fmt: skip
    if chosen is None:
        return None
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
