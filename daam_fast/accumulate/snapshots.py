"""Opt-in per-step snapshots of the heat buffers (``trace(pipe, snapshots="step")``), with an up-front memory guard.

Without snapshots the heat buffers are running sums over steps, so their memory does not grow with steps.
With ``snapshots="step"`` every heat buffer is copied at each step boundary (before the next step's first
capture). Step ``s``'s contribution is then ``copy after s - copy after the previous traced step`` (the
last step's "copy" is the live buffer itself), which is what ``Trace.compute_step_heat_maps`` returns.
The difference is taken in fp32 on the running sum, so a step's map matches a run traced with ``steps=[s]``
to fp32 rounding of the running sum (relative 1e-6 of the sum's magnitude), not bit for bit.

The guard: at the first model call of a pipeline call, the grid, batch rows, text length and step count are
all known, so the bytes the snapshots will take are computed before anything is captured, and
:class:`SnapshotBudgetError` is raised when they exceed ``max_snapshot_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .options import CaptureOptions
from .records import LayerPlan, Record, grid_at

__all__ = [
    "SnapshotBudgetError",
    "check_budget",
    "snapshot_bytes",
    "snapshot_step",
    "step_buffers",
    "step_bytes",
    "take_snapshot",
]


class SnapshotBudgetError(MemoryError):
    """Requested snapshots would need more memory than ``max_snapshot_bytes`` (the message says how much)."""


def step_bytes(
    options: CaptureOptions, layers: Iterable[LayerPlan], grid: tuple[int, int], rows: int, n_tokens: int
) -> int:
    """Bytes of one copy of all heat buffers of one pipeline call (fp32), i.e. one step's snapshot.

    Mirrors the buffer layout: one ``[rows, n_tokens, h·w]`` buffer per traced grid, per layer with
    ``per_layer``, ``[rows, heads, n_tokens, h·w]`` per layer with ``daam_compat``. ``layers``: the traced layers
    with their grid factors (a family that cannot tell gives 1: an upper bound).
    """
    per_key: dict = {}
    for layer in layers:
        if not options.traces_factor(layer.factor):
            continue
        h, w = grid_at(grid, layer.factor)
        heads = layer.heads if options.daam_compat else 1
        key = layer.idx if options.per_layer else (h, w)
        per_key[key] = rows * heads * n_tokens * h * w * 4
    return sum(per_key.values())


def check_budget(options: CaptureOptions, layers: Iterable[LayerPlan], rec: Record, n_tokens: int) -> None:
    """At a call's first model call: raise :class:`SnapshotBudgetError` when its snapshots would need more than
    ``options.max_snapshot_bytes`` (all traced steps x :func:`step_bytes`)."""
    if options.max_snapshot_bytes is None or rec.expected_steps is None:
        return
    n_steps = sum(1 for s in range(rec.expected_steps) if options.traces_step(s))
    rows = rec.rows.stop - rec.rows.start
    per_step = step_bytes(options, layers, rec.latent_hw, rows, n_tokens)
    if n_steps * per_step > options.max_snapshot_bytes:
        raise SnapshotBudgetError(
            f"snapshots='step' would need {n_steps * per_step} bytes ({n_steps} steps x {per_step} bytes) for "
            f"this call, over max_snapshot_bytes={options.max_snapshot_bytes}"
        )


def snapshot_step(options: CaptureOptions, rec: Record, step: int) -> None:
    """Copy ``rec``'s buffers after ``step``; raises :class:`SnapshotBudgetError` first when the copies would
    pass ``options.max_snapshot_bytes`` (the backstop for pipelines whose step count was unknown up front)."""
    if not rec.slots:
        return
    if options.max_snapshot_bytes is not None:
        need = snapshot_bytes(rec) + sum(s.buf.numel() * s.buf.element_size() for s in rec.slots.values())
        if need > options.max_snapshot_bytes:
            raise SnapshotBudgetError(
                f"snapshots='step' need {need} bytes after step {step}, over max_snapshot_bytes="
                f"{options.max_snapshot_bytes}"
            )
    take_snapshot(rec, step)


def take_snapshot(rec: Record, step: int) -> int:
    """Copy the record's heat buffers as they stand after ``step``; returns the bytes copied."""
    copies = {key: slot.buf.clone() for key, slot in rec.slots.items()}
    rec.snapshots[step] = copies
    return sum(t.numel() * t.element_size() for t in copies.values())


def snapshot_bytes(rec: Record) -> int:
    """Bytes held by the record's snapshots."""
    return sum(t.numel() * t.element_size() for copies in rec.snapshots.values() for t in copies.values())


def step_buffers(rec: Record, step: int, last: int) -> dict:
    """``{slot key: fp32 tensor}``: what traced step ``step`` added to each heat buffer of ``rec`` (same shapes
    as the buffers). Steps before ``last`` (the last traced step, whose state is the live buffers) read the
    snapshot taken after them."""
    after = {key: slot.buf for key, slot in rec.slots.items()} if step == last else rec.snapshots[step]
    earlier = [s for s in sorted(rec.snapshots) if s < step]
    before = rec.snapshots[earlier[-1]] if earlier else {}
    out = {}
    for key, slot in rec.slots.items():  # a buffer first created after a snapshot is zero in that snapshot
        a = after.get(key)
        a = torch.zeros_like(slot.buf) if a is None else a
        out[key] = a - before[key] if key in before else a.clone()
    return out
