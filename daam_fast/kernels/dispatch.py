"""Backend registry and dispatch for the capture kernels.

Each backend declares what it supports and answers ``not_supported_reasons(...) -> list[str]``.
Dispatch walks the registry in priority order (cuda → triton → torch) and takes the first backend
with no reasons. A backend forced by argument or by the ``DAAM_FAST_BACKEND`` environment variable
raises when it cannot run the call; an automatic pick never does (``torch`` runs everything).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import reference

__all__ = [
    "Backend",
    "BackendUnavailable",
    "backends",
    "capture_from_lse",
    "capture_self_normalising",
    "register_backend",
    "select_backend",
]

logger = logging.getLogger(__name__)

ENV_VAR = "DAAM_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given call (the message lists why)."""


@dataclass
class Backend:
    """A capture-kernel backend.

    ``capture_from_lse`` / ``capture_self_normalising`` have the signatures of the functions of the
    same name in :mod:`daam_fast.kernels.reference` (``bias`` and ``max_chunk_bytes`` as keywords).
    ``available`` is called lazily (it may import optional packages) and returns a reason string when
    the backend cannot be used at all in this process, or ``None``.
    """

    name: str
    priority: int
    capture_from_lse: Callable[..., torch.Tensor]
    capture_self_normalising: Callable[..., torch.Tensor]
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim: int | None = None
    supports_bias: bool = True
    supports_per_head: bool = True
    available: Callable[[], str | None] = field(default=lambda: None)
    extra_checks: Callable[..., list[str]] | None = None

    def not_supported_reasons(self, q: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> list[str]:
        """Why this backend cannot run a call on ``q`` ``[B, H, L, D]`` into ``out`` (empty: it can)."""
        reasons = []
        why = self.available()
        if why:
            return [why]
        if q.device.type not in self.devices:
            reasons.append(f"device {q.device.type} not in {self.devices}")
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} not in {[str(d) for d in self.dtypes]}")
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            reasons.append(f"head dim {q.shape[-1]} > {self.max_head_dim}")
        if bias is not None and not self.supports_bias:
            reasons.append("attention bias/mask not supported")
        if out.dim() == 4 and not self.supports_per_head:
            reasons.append("per-head output [B, H, T, L] not supported")
        if self.extra_checks is not None:
            reasons.extend(self.extra_checks(q, out, bias))
        return reasons


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _REGISTRY[backend.name] = backend


def backends() -> list[Backend]:
    """Registered backends, fastest first."""
    return sorted(_REGISTRY.values(), key=lambda b: -b.priority)


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


def _register_optional_backends() -> None:
    # Optional backends register themselves on import; a missing dependency (no triton, no built
    # extension) shows up as that backend's `available()` reason, never as an import error here.
    for module in ("triton_backend", "cuda"):
        try:
            __import__(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise


def select_backend(
    q: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None, backend: str | None = None
) -> Backend:
    """Pick the backend for a call: the forced one (argument, else ``DAAM_FAST_BACKEND``) or the
    fastest that supports it. Raises :class:`BackendUnavailable` when a forced backend cannot run it,
    ``ValueError`` for an unknown backend name."""
    forced = backend or os.environ.get(ENV_VAR) or None
    if forced is not None and forced != "auto":
        if forced not in _REGISTRY:
            raise ValueError(f"unknown capture backend {forced!r}; valid: {sorted(_REGISTRY)} or 'auto'")
        chosen = _REGISTRY[forced]
        reasons = chosen.not_supported_reasons(q, out, bias)
        if reasons:
            raise BackendUnavailable(
                f"capture backend {forced!r} was forced but cannot run q{tuple(q.shape)} {q.dtype} on "
                f"{q.device} into out{tuple(out.shape)}: " + "; ".join(reasons)
            )
        return chosen
    rejected = []
    for b in backends():
        reasons = b.not_supported_reasons(q, out, bias)
        if not reasons:
            return b
        rejected.append(f"{b.name}: " + "; ".join(reasons))
    raise BackendUnavailable(
        f"no capture backend supports q{tuple(q.shape)} {q.dtype} on {q.device} into out{tuple(out.shape)}:\n  "
        + "\n  ".join(rejected)
    )


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


_register_optional_backends()
