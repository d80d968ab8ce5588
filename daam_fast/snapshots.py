"""Opt-in per-step snapshots of the heat buffers (``trace(pipe, snapshots="step")``), with an up-front memory guard.

Without snapshots the heat buffers are running sums over steps, so their memory does not grow with steps.
With ``snapshots="step"`` the tracer copies every heat buffer at each step boundary (before the next step's
first capture). Step ``s``'s contribution is then ``copy after s - copy after the previous traced step`` (the
last step's "copy" is the live buffer itself), which is what :meth:`Trace.compute_step_heat_maps` returns.
The difference is taken in fp32 on the running sum, so a step's map matches a run traced with ``steps=[s]``
to fp32 rounding of the running sum (relative 1e-6 of the sum's magnitude), not bit for bit.

The guard: at the first UNet call of a pipeline call, the latent size, batch rows, text length and step
count are all known, so the bytes the snapshots will take are computed before anything is captured, and
:class:`SnapshotBudgetError` is raised when they exceed ``max_snapshot_bytes``.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "SNAPSHOT_MODES",
    "SnapshotBudgetError",
    "check_budget",
    "layer_factor",
    "snapshot_step",
    "step_buffers",
    "step_bytes",
    "take_snapshot",
]

#: Snapshot modes ``trace(snapshots=...)`` accepts (``None``: no snapshots). Per-layer maps need no snapshots:
#: ``per_layer=True`` keeps one buffer per layer; with ``snapshots="step"`` that becomes per step and layer.
SNAPSHOT_MODES = frozenset({"step"})

_BLOCK_RE = re.compile(r"^(down|up|mid)_blocks\.(\d+)\.")


class SnapshotBudgetError(MemoryError):
    """Requested snapshots would need more memory than ``max_snapshot_bytes`` (the message says how much)."""


def layer_factor(unet, name: str) -> int:
    """Grid down-sampling factor (relative to the latent) of the UNet attention module called ``name``.

    Counted from the blocks' own ``downsamplers`` / ``upsamplers`` (each halves / doubles the grid), so any
    ``UNet2DConditionModel`` configuration is followed. Names of other models give 1: their grid is at most
    the latent's, so the byte estimate built on it is an upper bound.
    """
    m = _BLOCK_RE.match(name)
    if m is None:
        return 1
    kind, idx = m.group(1), int(m.group(2))
    downs = [bool(getattr(b, "downsamplers", None)) for b in unet.down_blocks]
    if kind == "down":
        return 2 ** sum(downs[:idx])
    if kind == "mid":
        return 2 ** sum(downs)
    ups = [bool(getattr(b, "upsamplers", None)) for b in unet.up_blocks]
    return 2 ** (sum(downs) - sum(ups[:idx]))


def _grid_at(latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    h, w = latent_hw
    while factor > 1:  # the UNet's stride-2 convolutions give ceil(h / 2)
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor // 2
    return h, w


def step_bytes(tracer, latent_hw: tuple[int, int], rows: int, n_tokens: int) -> int:
    """Bytes of one copy of all heat buffers of one pipeline call (fp32), i.e. one step's snapshot.

    Mirrors the tracer's buffer layout: one ``[rows, n_tokens, h·w]`` buffer per traced grid, per layer with
    ``per_layer``, ``[rows, heads, n_tokens, h·w]`` per layer with ``daam_compat``.
    """
    from .trace import DEFAULT_SKIPPED_FACTORS

    per_key: dict = {}
    for info in tracer.layers:
        if info.idx not in tracer._enabled:
            continue
        factor = layer_factor(tracer.unet, info.name)
        traced = factor not in DEFAULT_SKIPPED_FACTORS if tracer.factors is None else factor in tracer.factors
        if not traced:
            continue
        h, w = _grid_at(latent_hw, factor)
        heads = info.heads if tracer.daam_compat else 1
        key = info.idx if tracer.per_layer else (h, w)
        per_key[key] = rows * heads * n_tokens * h * w * 4
    return sum(per_key.values())


def check_budget(tracer, rec, n_text: int) -> None:
    """At a call's first UNet call: raise :class:`SnapshotBudgetError` when its snapshots would need more than
    ``tracer.max_snapshot_bytes`` (all traced steps x :func:`step_bytes`)."""
    if tracer.max_snapshot_bytes is None or rec.expected_steps is None:
        return
    n_steps = sum(1 for s in range(rec.expected_steps) if tracer.steps is None or s in tracer.steps)
    rows = rec.rows.stop - rec.rows.start
    per_step = step_bytes(tracer, rec.latent_hw, rows, n_text if tracer.tokens is None else len(tracer.tokens))
    if n_steps * per_step > tracer.max_snapshot_bytes:
        raise SnapshotBudgetError(
            f"snapshots='step' would need {n_steps * per_step} bytes ({n_steps} steps x {per_step} bytes) for "
            f"this call, over max_snapshot_bytes={tracer.max_snapshot_bytes}"
        )


def snapshot_step(tracer, rec, step: int) -> None:
    """Copy ``rec``'s buffers after ``step``; raises :class:`SnapshotBudgetError` first when the copies would
    pass ``tracer.max_snapshot_bytes`` (the backstop for pipelines whose step count was unknown up front)."""
    if not rec.slots:
        return
    if tracer.max_snapshot_bytes is not None:
        need = snapshot_bytes(rec) + sum(s.buf.numel() * s.buf.element_size() for s in rec.slots.values())
        if need > tracer.max_snapshot_bytes:
            raise SnapshotBudgetError(
                f"snapshots='step' need {need} bytes after step {step}, over max_snapshot_bytes="
                f"{tracer.max_snapshot_bytes}"
            )
    take_snapshot(rec, step)


def take_snapshot(rec, step: int) -> int:
    """Copy the record's heat buffers as they stand after ``step``; returns the bytes copied."""
    copies = {key: slot.buf.clone() for key, slot in rec.slots.items()}
    rec.snapshots[step] = copies
    return sum(t.numel() * t.element_size() for t in copies.values())


def snapshot_bytes(rec) -> int:
    """Bytes held by the record's snapshots."""
    return sum(t.numel() * t.element_size() for copies in rec.snapshots.values() for t in copies.values())


def step_buffers(rec, step: int, last: int) -> dict:
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
