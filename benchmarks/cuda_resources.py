"""Registers, spills and shared memory of the CUDA extension's kernels per architecture, from ``nvcc -Xptxas -v``.

``csrc/capture_kernels.cuh`` holds the kernels free of torch (``tests/cuda_emu`` compiles the same file for
the CPU), so a small translation unit instantiates them for float, ``__half`` and ``__nv_bfloat16`` without
the torch headers. The extension instantiates them with ``at::Half`` / ``at::BFloat16``, whose conversion to
float is the same ``__half2float`` / ``__bfloat162float`` the CUDA types use. Flags: the extension's own
(``daam_fast/kernels/cuda_build.py``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.kernel_resources import ARCHS, resident_programs
from daam_fast.kernels import cuda_build

ROOT = Path(__file__).resolve().parents[1]
_TYPES = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16"}
_MANGLED_TYPES = {"f": "float", "6__half": "__half", "13__nv_bfloat16": "__nv_bfloat16"}
_INSTANTIATE = """#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "capture_kernels.cuh"

namespace daam_fast {
namespace kernels {
"""
_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_MANGLED = re.compile(r"(capture_kernel|row_lse_kernel)I(f|6__half|13__nv_bfloat16)E")


def translation_unit() -> str:
    """Source that instantiates both kernels for the three input types."""
    lines = [_INSTANTIATE]
    for t in _TYPES:
        lines.append(f"template __global__ void capture_kernel<{t}>(const Params);")
        lines.append(f"template __global__ void row_lse_kernel<{t}>(const Params, float*);")
    lines.append("}  // namespace kernels\n}  // namespace daam_fast\n")
    return "\n".join(lines)


def parse_ptxas(log: str) -> list[dict]:
    """One dict per (kernel, type, arch) from ``ptxas -v`` output."""
    found, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            name = _MANGLED.search(m.group(1))
            kernel, t = (name.group(1), name.group(2)) if name else (m.group(1), "?")
            t = _MANGLED_TYPES.get(t, t)
            current = {"kernel": kernel, "dtype": _TYPES.get(t, t), "arch": m.group(2), "spill_bytes": 0}
            found.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            current["shared_memory"] = int(m.group(2) or 0)
    return found


def nvcc_version() -> str | None:
    """``nvcc --version``'s release line, or None without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    return next((ln.strip() for ln in out.splitlines() if "release" in ln), out.strip()[-80:])


def ptxas_version(arch: int) -> str | None:
    """Version line of the ``ptxas`` Triton compiles ``sm_<arch>`` with (one of those in its wheel), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - another triton layout: the report just lacks the line
        return None
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=False).stdout
    return next((ln.strip() for ln in out.splitlines() if "release" in ln), None)


def report(archs=ARCHS) -> dict:
    """``{"nvcc": version, "kernels": [...]}`` (each with ``programs_per_sm`` at 256 threads), or
    ``{"error": why}`` without nvcc or when the compile fails."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {"error": "nvcc not found: no CUDA toolkit"}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "instantiate.cu"
        src.write_text(translation_unit())
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        cmd = [nvcc, "-c", str(src), "-o", str(Path(tmp) / "k.o"), "-std=c++17", *cuda_build.NVCC_FLAGS, *gencode]
        cmd += ["-Xptxas", "-v", "-I", str(ROOT / "csrc")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"nvcc": nvcc_version(), "error": (proc.stdout + proc.stderr)[-3000:]}
    kernels = parse_ptxas(proc.stdout + proc.stderr)
    for k in kernels:
        arch = int(k["arch"].removeprefix("sm_"))
        k["num_warps"] = 8  # kThreads = 256 in capture_kernels.cuh
        k["programs_per_sm"] = resident_programs(arch, k["registers"], k["shared_memory"], 8)
    return {"nvcc": nvcc_version(), "kernels": kernels}
