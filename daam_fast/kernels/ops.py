"""``torch.library`` custom ops, so ``torch.compile`` traces through a daam_fast-traced model without
graph breaks.

- ``daam_fast::capture_from_lse`` and ``daam_fast::capture_self_normalising`` wrap the dispatching
  entry points of :mod:`daam_fast.kernels.dispatch` (whatever backend they pick: the Triton / CUDA
  modules may register ops of their own for their kernels; these stay generic). Both mutate ``out``.
- ``daam_fast::sink_attention`` hands one attention call's ``q``, ``k`` and ``lse`` to a capture sink
  (the tracer's accumulator). Inside a compiled graph it is one opaque node: the tracer's bookkeeping (which step,
  which record, buffer allocation, token selection) runs in Python when the node executes, so it
  neither breaks the graph nor puts guards on per-step Python state (no recompiles per step). It
  mutates ``calls`` (a per-processor counter) so that the compiler keeps it although it returns
  nothing.

The ``register_fake`` implementations only check what can be checked on meta tensors.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch
from torch import Tensor

from . import dispatch

__all__ = ["capture_from_lse", "capture_self_normalising", "emit_attention", "register_sink", "sink_attention"]


@torch.library.custom_op("daam_fast::capture_from_lse", mutates_args=("out",))
def capture_from_lse(
    q: Tensor,
    k_sel: Tensor,
    lse: Tensor,
    scale: float,
    out: Tensor,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Op form of :func:`daam_fast.kernels.dispatch.capture_from_lse`: adds
    ``Σ_h exp(scale·q·k_selᵀ + bias − lse)`` into ``out`` in place.

    ``q`` ``[B, H, L, D]``, ``k_sel`` ``[B, H, T, D]`` (fp16 / bf16 / fp32), ``lse`` ``[B, H, L]`` fp32,
    ``out`` fp32 ``[B, T, L]`` or ``[B, H, T, L]``, ``bias`` broadcastable to ``[B, H, L, T]``.
    """
    dispatch.capture_from_lse(q, k_sel, lse, scale, out, bias=bias, backend=backend)


@capture_from_lse.register_fake
def _(q, k_sel, lse, scale, out, bias=None, backend=None) -> None:
    B, H, L, _ = q.shape
    torch._check(lse.shape == (B, H, L), lambda: f"lse must be [B, H, L] = {(B, H, L)}, got {tuple(lse.shape)}")
    torch._check(out.dtype in (torch.float32, torch.float64), lambda: f"out must be float32, got {out.dtype}")


@torch.library.custom_op("daam_fast::capture_self_normalising", mutates_args=("out",))
def capture_self_normalising(
    q: Tensor,
    k: Tensor,
    token_idx: Tensor,
    scale: float,
    out: Tensor,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Op form of :func:`daam_fast.kernels.dispatch.capture_self_normalising` (``k`` ``[B, H, S, D]``,
    ``token_idx`` ``[T]`` int64, ``bias`` broadcastable to ``[B, H, L, S]``); mutates ``out``."""
    dispatch.capture_self_normalising(q, k, token_idx, scale, out, bias=bias, backend=backend)


@capture_self_normalising.register_fake
def _(q, k, token_idx, scale, out, bias=None, backend=None) -> None:
    torch._check(out.dtype in (torch.float32, torch.float64), lambda: f"out must be float32, got {out.dtype}")


# -- capture sinks ----------------------------------------------------------------------------------

_SINKS: dict[int, weakref.ref] = {}
_SINK_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEXT_ID = itertools.count(1)
_SINK_LOCK = threading.Lock()


def register_sink(sink) -> int:
    """An int naming ``sink`` (held weakly; the same int for the same sink) for :func:`sink_attention`.
    Called eagerly, e.g. when a capture processor is built, never inside a compiled region."""
    with _SINK_LOCK:
        sink_id = _SINK_IDS.get(sink)
        if sink_id is None:
            sink_id = next(_NEXT_ID)
            _SINK_IDS[sink] = sink_id
            _SINKS[sink_id] = weakref.ref(sink, lambda _, i=sink_id: _SINKS.pop(i, None))
    return sink_id


@torch.library.custom_op("daam_fast::sink_attention", mutates_args=("calls",))
def sink_attention(
    q: Tensor,
    k: Tensor,
    lse: Tensor | None,
    bias: Tensor | None,
    scale: float,
    sink_id: int,
    layer_idx: int,
    calls: Tensor,
) -> None:
    """Calls ``sink.on_attention(layer_idx, q, k, lse, bias, scale)`` for the sink registered as
    ``sink_id`` (a no-op once the sink is gone) and adds 1 to ``calls`` (int64, one element).

    ``q`` ``[B, H, L, D]``, ``k`` ``[B, H, S, D]``, ``lse`` ``[B, H, L]`` fp32 or None, ``bias``
    broadcastable to ``[B, H, L, S]`` or None.
    """
    ref = _SINKS.get(sink_id)
    sink = ref() if ref is not None else None
    if sink is not None:
        sink.on_attention(layer_idx, q, k, lse, bias, scale)
    calls.add_(1)


@sink_attention.register_fake
def _(q, k, lse, bias, scale, sink_id, layer_idx, calls) -> None:
    return None


def emit_attention(sink, sink_id: int, calls: Tensor, layer_idx: int, q, k, lse, bias, scale: float) -> None:
    """What a capture processor calls for each attention call: the sink directly in eager mode, the
    opaque :func:`sink_attention` op while ``torch.compile`` traces (no graph break)."""
    if torch.compiler.is_compiling():
        sink_attention(q, k, lse, bias, float(scale), sink_id, layer_idx, calls)
    else:
        sink.on_attention(layer_idx, q, k, lse, bias, scale)
        calls.add_(1)
