"""What a capture-kernel backend declares, and the registry the backends add themselves to.

A leaf: backend modules (:mod:`.triton_backend`, :mod:`.cuda`) import it to register, and
:mod:`.dispatch` imports them and it to choose, so no backend module imports the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["ENV_VAR", "Backend", "BackendUnavailable", "backends", "input_reasons", "register_backend"]

#: Environment variable that forces a backend by name (``auto`` or unset: automatic).
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

    ``fused_attention`` (optional capability): ``(q, k, v, token_idx, scale, out) -> o`` computes the
    attention output ``softmax(scale·q·kᵀ)·v`` ``[B, H, L, D]`` in ``q``'s dtype and adds the selected columns
    of the softmax into ``out`` in the same pass, for key sequences of at most ``max_fused_keys``.
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
    fused_attention: Callable[..., torch.Tensor] | None = None
    max_fused_keys: int = 0

    def not_supported_reasons(
        self,
        q: torch.Tensor,
        out: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        fused_keys: int | None = None,
    ) -> list[str]:
        """Why this backend cannot run a call on ``q`` ``[B, H, L, D]`` into ``out`` (empty: it can).

        ``fused_keys``: the call wants fused attention + capture over that many keys.
        """
        why = self.available()
        if why:
            return [why]
        reasons = []
        if fused_keys is not None:
            if self.fused_attention is None:
                reasons.append("no fused attention + capture kernel")
            elif fused_keys > self.max_fused_keys:
                reasons.append(f"{fused_keys} keys > {self.max_fused_keys} (the fused kernel's limit)")
        reasons += input_reasons(q, self.devices, self.dtypes, self.max_head_dim)
        if bias is not None and not self.supports_bias:
            reasons.append("attention bias/mask not supported")
        if out.dim() == 4 and not self.supports_per_head:
            reasons.append("per-head output [B, H, T, L] not supported")
        if self.extra_checks is not None:
            reasons.extend(self.extra_checks(q, out, bias))
        return reasons


def input_reasons(
    q: torch.Tensor, devices: tuple[str, ...], dtypes: tuple[torch.dtype, ...], max_head_dim: int | None
) -> list[str]:
    """Why a kernel declared for ``devices`` / ``dtypes`` / ``max_head_dim`` cannot take ``q`` ``[..., D]`` (empty:
    it can). Shared by the capture backends and the attention kernels that give an lse."""
    reasons = []
    if q.device.type not in devices:
        reasons.append(f"device {q.device.type} not in {devices}")
    if q.dtype not in dtypes:
        reasons.append(f"dtype {q.dtype} not in {[str(d) for d in dtypes]}")
    if max_head_dim is not None and q.shape[-1] > max_head_dim:
        reasons.append(f"head dim {q.shape[-1]} > {max_head_dim}")
    return reasons


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _REGISTRY[backend.name] = backend


def backends() -> list[Backend]:
    """Registered backends, fastest first."""
    return sorted(_REGISTRY.values(), key=lambda b: -b.priority)
