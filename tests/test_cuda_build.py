"""CI compile check of csrc/: every .cu compiles with nvcc for sm_80 and sm_90, ext.cpp with the host compiler,
and the objects link against libtorch with no unresolved symbol but Python's, all against the headers of a
CUDA build of torch, with no warning in our code.

The dev venv's torch is the CPU wheel (no CUDA headers), so the headers come from a separate venv holding a
CUDA torch wheel that is never imported: `scripts/cuda_build_env.sh` (run by `make test`) creates it. Skipped,
with the reason, where nvcc or that venv is absent. Compiles run in parallel (both archs in one nvcc call, which
parses the torch headers once for the host pass); the module costs about one CPU-minute (measured: ~45 s for
capture.cu, ~10 s for ext.cpp, a few s for the link and the warning-filter check).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daam_fast.kernels import cuda_build

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = ("80", "90")
BUILD_VENV = Path(os.environ.get("DAAM_FAST_CUDA_BUILD_VENV", ROOT / ".cache" / "cuda-build-venv"))
# What torch's BuildExtension passes to nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS, identical in the CPU
# wheel), so the check compiles what `pip install` would.
TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)
COMMON_DEFINES = ("-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-D_GLIBCXX_USE_CXX11_ABI=1")
# Diagnostics: cudafe says `/abs/csrc/x.cu(12): warning #177-D: ...`, gcc `/abs/csrc/x.cpp:12:3: warning: ...`.
WARNING_RE = re.compile(r"warning", re.IGNORECASE)


def _torch_include() -> Path | None:
    for inc in sorted(BUILD_VENV.glob("lib/python3*/site-packages/torch/include")):
        if (inc / "torch" / "extension.h").is_file() and (inc / "ATen" / "cuda").is_dir():
            return inc
    return None


NVCC = shutil.which("nvcc")
TORCH_INC = _torch_include()
pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc not found: no CUDA toolkit to compile csrc/ with"),
    pytest.mark.skipif(
        TORCH_INC is None,
        reason=f"no CUDA torch headers in {BUILD_VENV}: run scripts/cuda_build_env.sh (or `make cuda-headers`)",
    ),
]


def include_flags(inc: Path) -> list[str]:
    """-isystem for torch (its own warnings are not ours to fix), -I for csrc/."""
    py_inc = sysconfig.get_paths()["include"]
    return ["-isystem", str(inc), "-isystem", str(inc / "torch/csrc/api/include"), "-isystem", py_inc, "-I", str(CSRC)]


def nvcc_command(src: Path, obj: Path, inc: Path, archs=ARCHS) -> list[str]:
    """Compile-only nvcc command for one .cu, all archs in one invocation (the host pass is shared)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [
        NVCC or "nvcc",
        "-c",
        str(src),
        "-o",
        str(obj),
        "-std=c++20",
        *TORCH_NVCC_FLAGS,
        *COMMON_DEFINES,
        *cuda_build.NVCC_FLAGS,
        *gencode,
        "--threads=2",  # device passes of the two archs in parallel
        "-Xcompiler=-fPIC,-Wall,-Wextra",
        *include_flags(inc),
    ]


def cxx_command(src: Path, obj: Path, inc: Path) -> list[str]:
    """Host-compiler command for one .cpp (the compiler torch would use: $CXX, else c++)."""
    cxx = os.environ.get("CXX", "c++")
    flags = ["-std=c++20", "-fPIC", "-Wall", "-Wextra", *COMMON_DEFINES, *cuda_build.CXX_FLAGS]
    return [cxx, "-c", str(src), "-o", str(obj), *flags, *include_flags(inc)]


def our_warnings(output: str, src_dir: Path) -> list[str]:
    """Compiler output lines that are warnings located in our sources. Sources and -I are passed as absolute
    paths, so the compilers report absolute paths; torch's own headers live elsewhere (and include a
    `torch/csrc/`, which is why a bare `csrc/` would not do)."""
    ours = str(src_dir) + os.sep
    return [ln for ln in output.splitlines() if WARNING_RE.search(ln) and ours in ln]


def _run(cmd: list[str]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every csrc/ source once, in parallel: {source name: (returncode, output, seconds, object)}."""
    out_dir = tmp_path_factory.mktemp("cuda_build")
    jobs = {}
    for src in sorted(CSRC.glob("*.cu")):
        jobs[src.name] = (nvcc_command(src, out_dir / f"{src.stem}.o", TORCH_INC), out_dir / f"{src.stem}.o")
    for src in sorted(CSRC.glob("*.cpp")):
        jobs[src.name] = (cxx_command(src, out_dir / f"{src.stem}_cpp.o", TORCH_INC), out_dir / f"{src.stem}_cpp.o")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(_run, cmd) for name, (cmd, _) in jobs.items()}
        results = {name: (*f.result(), jobs[name][1]) for name, f in futures.items()}
    wall = time.perf_counter() - t0
    timings = ", ".join(f"{n} {r[2]:.0f} s" for n, r in results.items())
    sys.stderr.write(f"\n[cuda build] compiled {len(results)} sources in {wall:.0f} s wall ({timings})\n")
    return results


def test_sources_present():
    """setup.py's source list is what lies in csrc/ (a new .cu must be added to cuda_build.SOURCES)."""
    on_disk = sorted(f"csrc/{p.name}" for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))
    assert on_disk == sorted(cuda_build.SOURCES)


@pytest.mark.parametrize("name", sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp")))
def test_compiles_without_warnings(compiled, name):
    rc, output, _, _ = compiled[name]
    assert rc == 0, f"{name} failed to compile:\n{output[-20000:]}"
    assert not our_warnings(output, CSRC), f"{name} has warnings in csrc/:\n" + "\n".join(our_warnings(output, CSRC))


def test_links_against_libtorch(compiled, tmp_path):
    """All symbols the objects use exist in libtorch/libc10/libcudart, except Python's (the interpreter provides
    them at import). Catches e.g. a call to a torch function that is not exported."""
    if any(rc != 0 for rc, *_ in compiled.values()):
        pytest.skip("a source failed to compile (reported by test_compiles_without_warnings)")
    lib = TORCH_INC.parent / "lib"
    objs = [str(r[3]) for r in compiled.values()]
    # nvcc as the link driver: it knows where its own libcudart lives.
    cmd = [NVCC, "-shared", "--cudart=shared", "-o", str(tmp_path / "_C.so"), *objs, f"-L{lib}"]
    cmd += ["-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu", "-ltorch_cuda"]
    cmd += ["-Xlinker=--no-undefined", "-Xlinker=--allow-shlib-undefined"]
    rc, output, _ = _run(cmd)
    undefined = set(re.findall(r"undefined reference to [`'](\S+?)'", output))
    not_python = sorted(s for s in undefined if not s.startswith(("Py", "_Py")))
    assert not not_python, f"unresolved symbols: {not_python}\n{output[-5000:]}"
    assert rc == 0 or undefined, f"link failed for another reason than Python's symbols:\n{output[-5000:]}"


def test_warning_check_catches_warnings(tmp_path):
    """The warning filter is not vacuous: a .cu with an unused variable (device code, cudafe) and an unused
    parameter (host code, gcc -Wextra) is reported, without torch headers so this stays fast."""
    src_dir = tmp_path / "csrc"
    src_dir.mkdir()
    src = src_dir / "bad.cu"
    src.write_text(
        "__global__ void k(float* x) { int unused = 1; x[0] = 1.f; }\nint host(int unused_param) { return 0; }\n"
    )
    cmd = nvcc_command(src, tmp_path / "bad.o", TORCH_INC, archs=("80",))
    rc, output, _ = _run(cmd)
    assert rc == 0, output
    found = our_warnings(output, src_dir)
    assert any('variable "unused"' in ln for ln in found), output  # cudafe, device code
    assert any("unused_param" in ln for ln in found), output  # host compiler
