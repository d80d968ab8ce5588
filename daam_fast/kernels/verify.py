"""Trust, then verify: the first call of a backend per (backend, kernel, device, dtype, head dim) is checked.

Before a backend's kernel adds into a real heat buffer for the first time with a given key, it runs on a slice
of that call's own inputs (the first image, all heads, the first :data:`CHECK_QUERIES` queries) into a scratch
buffer, and the result is compared with the float64 reference on the same slice (the fused kernel: its
attention output too). A compile or launch error, or a mismatch, is the check's failure: :mod:`.dispatch` then
disables the backend for that key in this process (one warning) and tries the next one, or raises when the
backend was forced. The reference backend (``torch``) is the oracle and is not checked.

The check costs one extra launch of the candidate and a float64 reference on at most ``CHECK_QUERIES`` queries,
once per key and process (benchmarks/bench_kernels_gpu.py times it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from . import reference
from .registry import Backend

__all__ = ["CHECK_QUERIES", "CAPTURE_TOL", "OUTPUT_TOL", "Checks", "CHECKS"]

#: Queries of the slice the first-use check runs on.
CHECK_QUERIES = 64
#: ``(atol, rtol)`` of captured columns (probabilities summed over heads) against float64. Every backend
#: accumulates in fp32 (tests hold them to 2e-5 / 1e-4 against float64); a wrong kernel is off by whole
#: probabilities, so the check leaves a 5x margin against spurious rejections.
CAPTURE_TOL = (1e-4, 1e-3)
#: ``(atol, rtol)`` of the fused kernel's attention output against float64, by input dtype: the output is
#: rounded to that dtype (and its probabilities for the PV product, as flash SDPA does); twice the tests' bounds.
OUTPUT_TOL = {
    torch.float32: (2e-5, 2e-4),
    torch.float16: (4e-3, 8e-3),
    torch.bfloat16: (3.2e-2, 6.4e-2),
    torch.float64: (1e-10, 1e-8),
}


def _rows(t: torch.Tensor | None, shape: tuple[int, int, int, int], n: int) -> torch.Tensor | None:
    """``t`` broadcast to ``shape`` = ``[B, H, L, C]``, cut to the first image and ``n`` queries (a view)."""
    return None if t is None else t.expand(shape)[:1, :, :n]


def _scratch(out: torch.Tensor, n: int) -> torch.Tensor:
    """A zero buffer shaped like one image's first ``n`` queries of ``out`` (``[1, T, n]`` or ``[1, H, T, n]``)."""
    return torch.zeros((1, *out.shape[1:-1], n), dtype=torch.float32, device=out.device)


def _mismatch(got: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str) -> str | None:
    if got.shape != expected.shape:
        return f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    err = (got.double() - expected).abs()
    bound = tol[0] + tol[1] * expected.abs()
    if not bool(torch.isfinite(got).all()) or bool((err > bound).any()):
        worst = err.max().item()
        return f"{what} differs from the float64 reference by up to {worst:.3g} (atol {tol[0]}, rtol {tol[1]})"
    return None


def check_from_lse(backend: Backend, q, k_sel, lse, scale, out, bias) -> str | None:
    """Run ``backend.capture_from_lse`` on a slice of the call; the reason it fails, or None."""
    B, H, L, _ = q.shape
    n = min(L, CHECK_QUERIES)
    qs, ls, ks = q[:1, :, :n], lse[:1, :, :n], k_sel[:1]
    bs = _rows(bias, (B, H, L, k_sel.shape[2]), n)
    got = _scratch(out, n)
    backend.capture_from_lse(qs, ks, ls, scale, got, bias=bs)
    b64 = None if bs is None else bs.double()
    zero = _scratch(out, n).double()
    expected = reference.capture_from_lse(qs.double(), ks.double(), ls.double(), scale, zero, bias=b64)
    return _mismatch(got, expected, CAPTURE_TOL, "capture_from_lse")


def check_self_normalising(backend: Backend, q, k, token_idx, scale, out, bias) -> str | None:
    """Run ``backend.capture_self_normalising`` on a slice of the call; the reason it fails, or None."""
    B, H, L, _ = q.shape
    n = min(L, CHECK_QUERIES)
    qs, ks = q[:1, :, :n], k[:1]
    bs = _rows(bias, (B, H, L, k.shape[2]), n)
    got = _scratch(out, n)
    backend.capture_self_normalising(qs, ks, token_idx, scale, got, bias=bs)
    b64 = None if bs is None else bs.double()
    expected = reference.capture_self_normalising(
        qs.double(), ks.double(), token_idx, scale, _scratch(out, n).double(), bias=b64
    )
    return _mismatch(got, expected, CAPTURE_TOL, "capture_self_normalising")


def check_fused(backend: Backend, q, k, v, token_idx, scale, out) -> str | None:
    """Run ``backend.fused_attention`` on a slice of the call (one image, the first queries): its attention
    output and captured columns against float64; the reason it fails, or None."""
    n = min(q.shape[2], CHECK_QUERIES)
    qs, ks, vs = q[:1, :, :n], k[:1], v[:1]
    scratch = _scratch(out, n)
    o = backend.fused_attention(qs, ks, vs, token_idx, scale, scratch)
    probs = reference.naive_attention_probs(qs, ks, scale)  # float64 [1, H, n, S]
    idx = torch.as_tensor(token_idx, device=probs.device).long()
    cols = probs.index_select(-1, idx).transpose(-1, -2)  # [1, H, T, n]
    expected = cols if scratch.dim() == 4 else cols.sum(1)
    why = _mismatch(scratch, expected, CAPTURE_TOL, "fused capture")
    if why is None:
        o_expected = torch.matmul(probs, vs.double())
        why = _mismatch(o, o_expected, OUTPUT_TOL[q.dtype], "fused attention output")
    return why


class Checks:
    """Which (backend, kernel, device, dtype, head dim) keys passed their first-use check, and which failed (with
    the reason) in this process. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._passed: set[tuple] = set()
        self._failed: dict[tuple, str] = {}

    @staticmethod
    def key(backend: Backend, kernel: str, q: torch.Tensor) -> tuple:
        return (backend.name, kernel, q.device.type, q.device.index, q.dtype, int(q.shape[-1]))

    def failed(self, key: tuple) -> str | None:
        """Why ``key`` was disabled in this process, or None."""
        return self._failed.get(key)

    def run(self, key: tuple, check: Callable[[], str | None], raise_errors: bool = False) -> str | None:
        """Run ``check`` once for ``key`` (later calls answer from memory): None when it passed, else the reason.
        A raised exception counts as a failure, named with its type, unless ``raise_errors`` (then it propagates
        and nothing is recorded)."""
        if key in self._passed:
            return None
        if key in self._failed:
            return self._failed[key]
        try:
            why = check()
        except Exception as exc:  # compile / launch errors of the candidate are what the check is for
            if raise_errors:
                raise
            why = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if why is None:
                self._passed.add(key)
            else:
                self._failed[key] = why
        return why

    def disable(self, key: tuple, why: str) -> None:
        """Mark ``key`` as failed (an error on a real call after its check passed)."""
        with self._lock:
            self._passed.discard(key)
            self._failed[key] = why

    def reset(self) -> None:
        """Forget every result (tests; a process that changed its Triton or driver install)."""
        with self._lock:
            self._passed.clear()
            self._failed.clear()


#: The process-wide check results :mod:`.dispatch` uses.
CHECKS = Checks()
