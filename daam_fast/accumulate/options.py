"""What to capture: the options of ``trace(...)`` that decide which calls, layers, grids, tokens and rows add
into which heat buffers, checked once when the tracer is built."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..kernels import dispatch

__all__ = ["DEFAULT_SKIPPED_FACTORS", "SNAPSHOT_MODES", "CaptureOptions", "as_int", "check_flag", "describe"]

#: daam skips the attention grids at 1/8 of the latent size (too coarse to localise anything).
DEFAULT_SKIPPED_FACTORS = frozenset({8})

#: Snapshot modes ``trace(snapshots=...)`` accepts (``None``: no snapshots). Per-layer maps need no snapshots:
#: ``per_layer=True`` keeps one buffer per layer; with ``snapshots="step"`` that becomes per step and layer.
SNAPSHOT_MODES = frozenset({"step"})


def describe(value) -> str:
    """``value`` for an error message: its repr and its type (``'2' (str)``)."""
    return "None" if value is None else f"{value!r} ({type(value).__name__})"


def as_int(value) -> int | None:
    """``value`` as an int when it is an integer (numpy and 0-d torch integers included; bools are not), else
    None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_flag(name: str, value) -> bool:
    """``value`` when it is a bool, else ``TypeError`` naming option ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return value


def _int_list(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    what = f"{name} must be a list of ints (or None for all)"
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{what}, got {describe(value)}")
    out = []
    for item in value:
        if (i := as_int(item)) is None:
            raise TypeError(f"{what}, got {describe(item)} in it")
        out.append(i)
    return tuple(out)


def _count(name: str, value) -> int | None:
    # A count of at least 1, or None; the type is checked first so "2" is not silently taken for 2.
    if value is not None and as_int(value) is None:
        raise TypeError(f"{name} must be an int >= 1 or None, got {describe(value)}")
    return None if value is None else as_int(value)


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
        tokens = self.tokens
        token_tuple = _int_list("tokens", tokens)
        if token_tuple is not None and (not token_tuple or min(token_tuple) < 0):
            raise ValueError(f"tokens must be non-empty key positions >= 0, got {tokens!r}")
        keep = _count("keep_records", self.keep_records)
        if keep is not None and keep < 1:
            raise ValueError(f"keep_records must be None (keep all) or >= 1, got {keep!r}")
        budget = _count("max_snapshot_bytes", self.max_snapshot_bytes)
        if budget is not None and budget < 1:
            raise ValueError(f"max_snapshot_bytes must be an int >= 1 or None, got {budget!r}")
        modes = " or ".join(repr(m) for m in sorted(SNAPSHOT_MODES))
        if self.snapshots is not None and not isinstance(self.snapshots, str):
            raise TypeError(f"snapshots must be {modes} or None, got {describe(self.snapshots)}")
        if self.snapshots is not None and self.snapshots not in SNAPSHOT_MODES:
            raise ValueError(f"unknown snapshots mode {self.snapshots!r}; valid: None or {sorted(SNAPSHOT_MODES)}")
        if self.max_snapshot_bytes is not None and self.snapshots is None:
            raise ValueError("max_snapshot_bytes limits snapshots: pass snapshots='step' too")
        names = [b.name for b in dispatch.backends()]
        if self.backend is not None and not isinstance(self.backend, str):
            raise TypeError(f"backend must be a backend name ({names} or 'auto') or None, got {describe(self.backend)}")
        if self.backend is not None and self.backend not in {*names, "auto"}:
            raise ValueError(f"unknown backend {self.backend!r}; valid: {names} or 'auto'")
        factors, steps = _int_list("factors", self.factors), _int_list("steps", self.steps)
        daam_compat = check_flag("daam_compat", self.daam_compat)
        normalised = {
            "factors": None if factors is None else frozenset(factors),
            "steps": None if steps is None else frozenset(steps),
            "tokens": token_tuple,
            "negative": check_flag("negative", self.negative),
            "per_layer": check_flag("per_layer", self.per_layer) or daam_compat,
            "daam_compat": daam_compat,
            "fused": check_flag("fused", self.fused),
            "keep_records": keep,
            "max_snapshot_bytes": budget,
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def traces_step(self, step: int) -> bool:
        """Whether denoising step ``step`` (0-based) is traced."""
        return self.steps is None or step in self.steps

    def traces_factor(self, factor: int) -> bool:
        """Whether a grid at ``factor`` (relative to the latent) is traced (multiscale models only)."""
        return factor not in DEFAULT_SKIPPED_FACTORS if self.factors is None else factor in self.factors
