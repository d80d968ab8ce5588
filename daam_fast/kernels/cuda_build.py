"""Build description of the CUDA extension in ``csrc/``: one place for the sources, flags and op schemas
that ``setup.py``, the JIT fallback (:func:`daam_fast.kernels.cuda.build_jit`) and the CI compile test use.

Deliberately imports nothing but the standard library: ``setup.py`` loads this file by path, before the
package (or torch) is importable.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "BUILD_ENV",
    "CXX_FLAGS",
    "EXT_MODULE",
    "JIT_ENV",
    "NVCC_FLAGS",
    "SCHEMAS",
    "SOURCES",
    "csrc_dir",
    "source_paths",
]

#: Import name of the extension that ``setup.py`` builds.
EXT_MODULE = "daam_fast._C"
#: ``setup.py``: ``1`` forces the build, ``0`` disables it, unset builds when CUDA is usable.
BUILD_ENV = "DAAM_FAST_BUILD_CUDA"
#: ``1`` lets :mod:`daam_fast.kernels.cuda` compile the extension with ``torch.utils.cpp_extension.load`` at
#: first use when the built one is missing.
JIT_ENV = "DAAM_FAST_CUDA_JIT"

#: Sources, relative to the repository root (setuptools wants relative paths).
SOURCES = ("csrc/ext.cpp", "csrc/capture.cu")

# torch's BuildExtension adds the C++ standard its headers need, -fPIC and its COMMON_NVCC_FLAGS
# (no implicit __half conversions, --expt-relaxed-constexpr); these are only what we add on top.
CXX_FLAGS = ("-O3",)
# Precise expf/logf on purpose (no --use_fast_math): results are compared with a float64 reference at fixed
# tolerances. -lineinfo costs nothing at run time and lets profilers map SASS to source lines.
NVCC_FLAGS = ("-O3", "-lineinfo")

#: The op schemas, exactly as ``csrc/ext.cpp`` defines them (tests/test_cuda_binding.py checks they agree).
SCHEMAS = {
    "cuda_capture_from_lse": (
        "cuda_capture_from_lse(Tensor q, Tensor k_sel, Tensor lse, float scale, Tensor(a!) out, "
        "Tensor? bias=None) -> ()"
    ),
    "cuda_capture_self_normalising": (
        "cuda_capture_self_normalising(Tensor q, Tensor k, Tensor token_idx, float scale, Tensor(a!) out, "
        "Tensor? bias=None) -> ()"
    ),
}


def csrc_dir() -> Path:
    """The ``csrc/`` directory of the source checkout this package lives in (``DAAM_FAST_CSRC`` overrides).

    Only a source checkout (``pip install -e .``) has it; a wheel install ships the built extension instead.
    """
    override = os.environ.get("DAAM_FAST_CSRC")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "csrc"


def source_paths() -> list[Path]:
    """Absolute paths of :data:`SOURCES` in :func:`csrc_dir`."""
    return [csrc_dir() / Path(s).relative_to("csrc") for s in SOURCES]
