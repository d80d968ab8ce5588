"""What to capture: the options of ``trace(...)`` that decide which calls, layers, grids, tokens and rows add
into which heat buffers, checked once when the tracer is built."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..kernels import dispatch

__all__ = ["DEFAULT_SKIPPED_FACTORS", "SNAPSHOT_MODES", "CaptureOptions"]

#: daam skips the attention grids at 1/8 of the latent size (too coarse to localise anything).
DEFAULT_SKIPPED_FACTORS = frozenset({8})

#: Snapshot modes ``trace(snapshots=...)`` accepts (``None``: no snapshots). Per-layer maps need no snapshots:
#: ``per_layer=True`` keeps one buffer per layer; with ``snapshots="step"`` that becomes per step and layer.
SNAPSHOT_MODES = frozenset({"step"})


@dataclass(frozen=True)
class CaptureOptions:
    """Capture options (see :class:`daam_fast.trace.Trace` for their meaning), checked and normalised when built:
    a bad value raises ``ValueError`` naming it and what is valid."""

    factors: Iterable[int] | None = None
    steps: Iterable[int] | None = None
    tokens: Sequence[int] | None = None
    negative: bool = False
    per_layer: bool = False
    daam_compat: bool = False
    backend: str | None = None
    fused: bool = False
    keep_records: int | None = None
    snapshots: str | None = None
    max_snapshot_bytes: int | None = None

    def __post_init__(self):
        tokens, keep = self.tokens, self.keep_records
        token_tuple = None if tokens is None else tuple(int(t) for t in tokens)
        if token_tuple is not None and (not token_tuple or min(token_tuple) < 0):
            raise ValueError(f"tokens must be non-empty key positions >= 0, got {tokens!r}")
        if keep is not None and (isinstance(keep, bool) or int(keep) < 1):
            raise ValueError(f"keep_records must be None (keep all) or >= 1, got {keep!r}")
        if self.snapshots is not None and self.snapshots not in SNAPSHOT_MODES:
            raise ValueError(f"unknown snapshots mode {self.snapshots!r}; valid: None or {sorted(SNAPSHOT_MODES)}")
        if self.max_snapshot_bytes is not None and self.snapshots is None:
            raise ValueError("max_snapshot_bytes limits snapshots: pass snapshots='step' too")
        names = [b.name for b in dispatch.backends()]
        if self.backend is not None and self.backend not in {*names, "auto"}:
            raise ValueError(f"unknown backend {self.backend!r}; valid: {names} or 'auto'")
        normalised = {
            "factors": None if self.factors is None else frozenset(int(f) for f in self.factors),
            "steps": None if self.steps is None else frozenset(int(s) for s in self.steps),
            "tokens": token_tuple,
            "negative": bool(self.negative),
            "per_layer": bool(self.per_layer or self.daam_compat),
            "daam_compat": bool(self.daam_compat),
            "fused": bool(self.fused),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def traces_step(self, step: int) -> bool:
        """Whether denoising step ``step`` (0-based) is traced."""
        return self.steps is None or step in self.steps

    def traces_factor(self, factor: int) -> bool:
        """Whether a grid at ``factor`` (relative to the latent) is traced (multiscale models only)."""
        return factor not in DEFAULT_SKIPPED_FACTORS if self.factors is None else factor in self.factors
