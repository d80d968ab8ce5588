"""Accumulation: records of traced pipeline calls, their heat buffers, per-step snapshots and aggregation.

A leaf below the tracer: it knows no tracer, no model family and no diffusers; the model family describes each
model call (:class:`Geometry`), the processors hand attention calls to the :class:`Accumulator` (the capture
sink), and :mod:`daam_fast.kernels.dispatch` runs the kernels.

- :mod:`.options`: what to capture (:class:`CaptureOptions`, checked once).
- :mod:`.records`: :class:`Record`, :class:`HeatBuffer`, :class:`Geometry`.
- :mod:`.capture`: the :class:`Accumulator` (model calls, steps, CFG rows, capture into buffers).
- :mod:`.snapshots`: opt-in per-step copies and their memory guard.
- :mod:`.aggregate`: from buffers to per-token maps of one image.
"""

from .aggregate import ImageText, aggregate, select_image
from .capture import Accumulator
from .options import DEFAULT_SKIPPED_FACTORS, SNAPSHOT_MODES, CaptureOptions
from .records import CallRows, Geometry, HeatBuffer, LayerPlan, Record
from .snapshots import SnapshotBudgetError, snapshot_bytes, step_buffers, step_bytes

__all__ = [
    "DEFAULT_SKIPPED_FACTORS",
    "SNAPSHOT_MODES",
    "Accumulator",
    "CallRows",
    "CaptureOptions",
    "Geometry",
    "HeatBuffer",
    "ImageText",
    "LayerPlan",
    "Record",
    "SnapshotBudgetError",
    "aggregate",
    "select_image",
    "snapshot_bytes",
    "step_buffers",
    "step_bytes",
]
