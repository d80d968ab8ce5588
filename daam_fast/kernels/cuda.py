"""Native CUDA backend: Python bindings of the ``daam_fast::`` ops built from ``csrc/``.

The extension ``daam_fast._C`` is loaded lazily, at the first dispatch that considers this backend, never at
import: ``import daam_fast`` works on a CPU-only machine and touches no CUDA. A failed load is cached, and its
reason is what :func:`available` reports (so forcing ``backend="cuda"`` raises
:class:`~daam_fast.kernels.dispatch.BackendUnavailable` with a how-to-build message). With
``DAAM_FAST_CUDA_JIT=1`` a missing extension is compiled with ``torch.utils.cpp_extension.load`` instead
(:func:`build_jit`; needs a source checkout, a CUDA toolkit and a CUDA build of torch).

Arguments are validated here, in Python, before the op is called, so errors are ordinary ``ValueError`` /
``TypeError`` / ``IndexError`` with the shapes in the message (the C++ op re-checks with ``TORCH_CHECK``).
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import threading

import torch

from . import cuda_build
from .reference import DEFAULT_CHUNK_BYTES
from .registry import Backend, BackendUnavailable, register_backend

__all__ = [
    "HOW_TO_BUILD",
    "available",
    "build_jit",
    "capture_from_lse",
    "capture_self_normalising",
    "load_extension",
    "validate_capture_from_lse",
    "validate_capture_self_normalising",
]

logger = logging.getLogger(__name__)

HOW_TO_BUILD = (
    f"{cuda_build.EXT_MODULE} not built: install with a CUDA toolkit and a CUDA build of torch, or "
    f"{cuda_build.BUILD_ENV}=1 pip install -e ., or set {cuda_build.JIT_ENV}=1 to compile at first use"
)

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_NOT_TRIED = object()
_load_result: object = _NOT_TRIED  # None once the ops are usable, else the reason string; set once
_lock = threading.RLock()
_fakes_registered = False


def _ops_registered() -> bool:
    # hasattr on torch.ops never loads anything: it only asks the dispatcher whether the schema exists.
    return all(hasattr(torch.ops.daam_fast, name) for name in cuda_build.SCHEMAS)


def _register_fakes() -> None:
    """Fake (meta) kernels for torch.compile / FakeTensor tracing, registered once the ops exist."""
    global _fakes_registered
    if _fakes_registered or not _ops_registered():
        return
    torch.library.register_fake("daam_fast::cuda_capture_from_lse", fake_capture_from_lse)
    torch.library.register_fake("daam_fast::cuda_capture_self_normalising", fake_capture_self_normalising)
    _fakes_registered = True


def build_jit(verbose: bool = False) -> None:
    """Compile ``csrc/`` with ``torch.utils.cpp_extension.load`` and register the ops in this process.

    Needs a source checkout (``csrc/``, or ``DAAM_FAST_CSRC`` pointing at one), a CUDA toolkit and a CUDA build
    of torch; takes a minute or more the first time and caches the build under ``TORCH_EXTENSIONS_DIR``. A
    no-op when the ops are already registered (e.g. ``daam_fast._C`` is installed). Raises what ``load``
    raises on failure (``RuntimeError`` for compiler errors, ``OSError`` without a toolkit) or
    ``FileNotFoundError`` without the sources.
    """
    global _load_result
    with _lock:
        if not _ops_registered():
            from torch.utils.cpp_extension import load

            sources = cuda_build.source_paths()
            missing = [str(s) for s in sources if not s.exists()]
            if missing:
                raise FileNotFoundError(f"CUDA sources not found (the JIT build needs a source checkout): {missing}")
            logger.info("compiling the daam_fast CUDA extension (JIT) from %s", cuda_build.csrc_dir())
            load(
                name="daam_fast_jit",
                sources=[str(s) for s in sources],
                extra_include_paths=[str(cuda_build.csrc_dir())],
                extra_cflags=list(cuda_build.CXX_FLAGS),
                extra_cuda_cflags=list(cuda_build.NVCC_FLAGS),
                is_python_module=False,
                verbose=verbose,
            )
            if not _ops_registered():
                raise RuntimeError("the JIT-built library loaded but registered no daam_fast ops")
        _register_fakes()
        _load_result = None


def _load() -> str | None:
    if _ops_registered():
        return None
    reason = HOW_TO_BUILD
    try:
        importlib.import_module(cuda_build.EXT_MODULE)
    except ImportError as exc:
        # A module that exists but fails to load (built against another torch, no libcudart) says why.
        if not (isinstance(exc, ModuleNotFoundError) and exc.name == cuda_build.EXT_MODULE):
            reason = f"{HOW_TO_BUILD} ({cuda_build.EXT_MODULE} failed to import: {exc})"
    else:
        return None if _ops_registered() else f"{cuda_build.EXT_MODULE} imported but registered no daam_fast ops"
    if os.environ.get(cuda_build.JIT_ENV) != "1":
        return reason
    # Dispatch asks every backend, CPU calls included: never start a minutes-long compile without a GPU.
    if not torch.cuda.is_available():
        return f"{reason} ({cuda_build.JIT_ENV}=1, but no CUDA device is available to compile for)"
    try:
        build_jit()
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as exc:
        logger.warning("JIT compile of the daam_fast CUDA extension failed: %s", exc)
        return f"{cuda_build.JIT_ENV}=1 but compiling the CUDA extension failed: {exc}"
    return None


def load_extension() -> str | None:
    """Make the ``daam_fast::`` ops usable: import ``daam_fast._C`` (or JIT-compile, when opted in) once.

    Returns ``None`` when the ops are registered, else the reason they are not (cached: later calls return
    the same answer without retrying).
    """
    global _load_result
    with _lock:
        if _load_result is _NOT_TRIED:
            _load_result = _load()
            if _load_result is None:
                _register_fakes()
            else:
                logger.debug("CUDA capture backend unavailable: %s", _load_result)
        return _load_result  # type: ignore[return-value]


def available() -> str | None:
    """``None`` when the CUDA backend can run in this process, else why not (for dispatch)."""
    return load_extension()


def _require_ops():
    reason = load_extension()
    if reason is not None:
        raise BackendUnavailable(reason)
    return torch.ops.daam_fast


def __getattr__(name: str):
    # PEP 562: `daam_fast.kernels.cuda.ops` is the loaded `torch.ops.daam_fast` namespace; touching it is what
    # loads the extension (BackendUnavailable with the how-to-build message when it is not there).
    if name == "ops":
        return _require_ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------
# Validation (metadata only, so it also runs on FakeTensors and in the fake kernels)


def _check_qk(q: torch.Tensor, k: torch.Tensor, name_k: str, require_cuda: bool) -> tuple[int, int, int, int, int]:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, L, D], got shape {tuple(q.shape)}")
    B, H, L, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"{name_k} must be [B, H, *, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if q.dtype not in INPUT_DTYPES:
        raise TypeError(f"the cuda backend takes q as float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"{name_k} dtype {k.dtype} differs from q dtype {q.dtype}")
    if require_cuda and q.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got q on {q.device}")
    if k.device != q.device:
        raise ValueError(f"{name_k} is on {k.device} but q is on {q.device}")
    return B, H, L, D, k.shape[2]


def _check_out(out: torch.Tensor, q: torch.Tensor, B: int, H: int, T: int, L: int) -> None:
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    if tuple(out.shape) not in ((B, T, L), (B, H, T, L)):
        raise ValueError(
            f"out must be [B, T, L] = {(B, T, L)} or [B, H, T, L] = {(B, H, T, L)}, got {tuple(out.shape)}"
        )
    if out.device != q.device:
        raise ValueError(f"out is on {out.device} but q is on {q.device}")


def _check_bias(bias: torch.Tensor | None, q: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if bias is None:
        return
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point additive score bias, got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
    try:
        broadcast = torch.broadcast_shapes(tuple(bias.shape), shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to {what} = {shape}")


def validate_capture_from_lse(
    q: torch.Tensor,
    k_sel: torch.Tensor,
    lse: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    require_cuda: bool = True,
) -> tuple[int, int, int, int, int]:
    """Check the arguments of :func:`capture_from_lse`; returns ``(B, H, L, D, T)``. ``require_cuda=False``
    skips the device-type check (fake kernels: the dispatcher already routes by device).

    Raises ``ValueError`` (shapes, devices) or ``TypeError`` (dtypes) with the offending shapes in the message.
    """
    B, H, L, D, T = _check_qk(q, k_sel, "k_sel", require_cuda)
    if tuple(lse.shape) != (B, H, L):
        raise ValueError(f"lse must be [B, H, L] = {(B, H, L)}, got {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32 (as attention kernels return it), got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    _check_out(out, q, B, H, T, L)
    _check_bias(bias, q, (B, H, L, T), "[B, H, L, T]")
    return B, H, L, D, T


def validate_capture_self_normalising(
    q: torch.Tensor,
    k: torch.Tensor,
    token_idx: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    require_cuda: bool = True,
) -> tuple[int, int, int, int, int, int]:
    """Check the arguments of :func:`capture_self_normalising` (metadata only: index values are checked by
    the caller); returns ``(B, H, L, D, S, T)``."""
    B, H, L, D, S = _check_qk(q, k, "k", require_cuda)
    if S == 0:
        raise ValueError("k has no keys (S = 0): the softmax over keys is undefined")
    if token_idx.dim() != 1 or token_idx.numel() == 0:
        raise ValueError(f"token_idx must be a non-empty 1-D tensor [T], got shape {tuple(token_idx.shape)}")
    if token_idx.dtype.is_floating_point or token_idx.dtype.is_complex or token_idx.dtype == torch.bool:
        raise TypeError(f"token_idx must hold integer key positions, got {token_idx.dtype}")
    T = token_idx.shape[0]
    _check_out(out, q, B, H, T, L)
    _check_bias(bias, q, (B, H, L, S), "[B, H, L, S]")
    return B, H, L, D, S, T


def fake_capture_from_lse(q, k_sel, lse, scale, out, bias=None) -> None:
    """Fake kernel of ``daam_fast::cuda_capture_from_lse``: checks metadata as the CUDA op does; mutates ``out``
    only, returns nothing."""
    B, H, L, _, T = validate_capture_from_lse(q, k_sel, lse, out, bias, require_cuda=False)
    if bias is not None and (tuple(bias.shape) != (B, H, L, T) or bias.dtype != torch.float32):
        raise ValueError(
            f"the op takes bias as float32 [B, H, L, T] = {(B, H, L, T)}, got {bias.dtype} "
            f"{tuple(bias.shape)} (expand it first)"
        )


def fake_capture_self_normalising(q, k, token_idx, scale, out, bias=None) -> None:
    """Fake kernel of ``daam_fast::cuda_capture_self_normalising`` (see :func:`fake_capture_from_lse`)."""
    B, H, L, _, S, _ = validate_capture_self_normalising(q, k, token_idx, out, bias, require_cuda=False)
    if token_idx.dtype != torch.int64 or token_idx.device != q.device or not token_idx.is_contiguous():
        raise ValueError(
            f"the op takes token_idx as contiguous int64 on {q.device}, got {token_idx.dtype} on {token_idx.device}"
        )
    if bias is not None and (tuple(bias.shape) != (B, H, L, S) or bias.dtype != torch.float32):
        raise ValueError(
            f"the op takes bias as float32 [B, H, L, S] = {(B, H, L, S)}, got {bias.dtype} "
            f"{tuple(bias.shape)} (expand it first)"
        )


def _check_token_range(idx: torch.Tensor, S: int) -> None:
    # idx: validated 1-D integer tensor. The kernel reads key rows by these values, so they are checked here
    # (a device sync when the indices live on the GPU; pass them as a CPU tensor or list to avoid it).
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= S:
        raise IndexError(f"token_idx must lie in [0, {S - 1}] (S = {S} keys), got values in [{lo}, {hi}]")


# ---------------------------------------------------------------------------------------------------------
# Public functions (signatures of daam_fast.kernels.reference)


@torch.no_grad()
def capture_from_lse(
    q: torch.Tensor,
    k_sel: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Add ``Σ_h exp(scale·q·k_selᵀ + bias − lse)`` into ``out`` in place with the CUDA kernel; return ``out``.

    Args:
        q: ``[B, H, L, D]`` CUDA queries, float16 / bfloat16 / float32, any strides.
        k_sel: ``[B, H, T, D]`` keys of the ``T`` selected tokens, same dtype and device, any strides.
        lse: ``[B, H, L]`` float32 natural-log logsumexp of each query row over all keys, any strides (e.g.
            the padded lse of torch's efficient SDPA, sliced to ``L``).
        scale: the softmax scale the attention used.
        out: float32 ``[B, T, L]`` (summed over heads) or ``[B, H, T, L]`` (per head), non-overlapping strides.
        bias: optional additive bias broadcastable to ``[B, H, L, T]`` (converted to float32).
        max_chunk_bytes: ignored (the kernel allocates nothing); kept for the reference's signature.

    Raises:
        BackendUnavailable: the extension is not built (the message says how to build it).
    """
    B, H, L, _, T = validate_capture_from_lse(q, k_sel, lse, out, bias)
    ops = _require_ops()
    if bias is not None:
        bias = bias.to(torch.float32).expand(B, H, L, T)
    ops.cuda_capture_from_lse(q, k_sel, lse, float(scale), out, bias)
    return out


@torch.no_grad()
def capture_self_normalising(
    q: torch.Tensor,
    k: torch.Tensor,
    token_idx,
    scale: float,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Like :func:`capture_from_lse` for attention calls that give no lse: the kernel computes each row's
    logsumexp over all ``S`` keys, then adds the selected columns into ``out``; returns ``out``.

    Args:
        q: ``[B, H, L, D]`` CUDA queries, float16 / bfloat16 / float32, any strides.
        k: ``[B, H, S, D]`` all keys, same dtype and device, any strides.
        token_idx: ``[T]`` integer positions in ``0..S-1`` (tensor on any device, or a list).
        scale: softmax scale.
        out: float32 ``[B, T, L]`` or ``[B, H, T, L]``, added to in place.
        bias: optional additive bias broadcastable to ``[B, H, L, S]`` (attention mask).
        max_chunk_bytes: ignored (the only temporary is the ``[B, H, L]`` float32 lse).
    """
    idx = (token_idx if isinstance(token_idx, torch.Tensor) else torch.as_tensor(token_idx)).reshape(-1)
    B, H, L, _, S, _ = validate_capture_self_normalising(q, k, idx, out, bias)
    _check_token_range(idx, S)
    ops = _require_ops()
    idx = idx.to(device=q.device, dtype=torch.int64).contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).expand(B, H, L, S)
    ops.cuda_capture_self_normalising(q, k, idx, float(scale), out, bias)
    return out


register_backend(
    Backend(
        name="cuda",
        priority=20,
        capture_from_lse=capture_from_lse,
        capture_self_normalising=capture_self_normalising,
        devices=("cuda",),
        dtypes=INPUT_DTYPES,
        available=available,
    )
)
