"""The Triton backend: its kernels in Triton's CPU interpreter (in a subprocess), and how it behaves
without triton or without a GPU.

Why a subprocess: Triton decides when a ``@triton.jit`` kernel is defined (when
``daam_fast.kernels.triton_capture`` is imported, which ``daam_fast.kernels`` does) whether it is compiled
or interpreted, from ``TRITON_INTERPRET``. Inside this pytest process the variable would come too late
(another test may already have imported the package), and setting it early would silently turn every
other test's Triton use into interpretation. So the interpreter tests live in ``tests/triton_interp/``
under names pytest does not collect (``interp_*.py``; they refuse to import without the variable), and
one test here runs them all in a fresh Python with ``TRITON_INTERPRET=1``, then reads its JUnit report:
every test must have run and passed, none skipped. Failures show the subprocess's report.
"""

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from daam_fast.kernels import BackendUnavailable, dispatch, select_backend

REPO = Path(__file__).resolve().parents[1]
INTERP_DIR = Path(__file__).resolve().parent / "triton_interp"
HAS_TRITON = importlib.util.find_spec("triton") is not None
# A floor on the collected count, so that a collection mistake (a module not found, a parametrisation
# lost) fails instead of passing with fewer tests.
MIN_INTERP_TESTS = 80


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", DAAM_FAST_TEST_THREADS="1", **extra)
    return env


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'daam_fast[triton]')")
def test_triton_kernels_in_interpreter(tmp_path):
    junit = tmp_path / "interp.xml"
    files = sorted(str(p.relative_to(REPO)) for p in INTERP_DIR.glob("interp_*.py"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfEs"]
    cmd += [f"--junitxml={junit}", *files]
    env = _subprocess_env(TRITON_INTERPRET="1")
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    report = (proc.stdout + proc.stderr)[-12000:]
    assert junit.exists(), f"the interpreter run wrote no report (exit {proc.returncode}):\n{report}"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    assert proc.returncode == 0 and counts["failures"] == counts["errors"] == 0, f"{counts}\n{report}"
    assert counts["skipped"] == 0, f"interpreter tests must not skip: {counts}\n{report}"
    assert counts["tests"] >= MIN_INTERP_TESTS, f"only {counts['tests']} interpreter tests ran\n{report}"


def test_without_triton_package_imports_and_forced_triton_explains():
    # `import triton` fails (None in sys.modules makes it raise ModuleNotFoundError): the package must
    # import, the automatic pick must fall back to torch, and forcing triton must say why it cannot.
    code = """
import sys
sys.modules["triton"] = None
import torch
import daam_fast
from daam_fast.kernels import BackendUnavailable, capture_from_lse, select_backend, triton_capture, triton_fused
assert triton_capture.TRITON_IMPORT_ERROR.startswith("triton cannot be imported (ModuleNotFoundError")
q, k, lse = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 3, 16), torch.zeros(1, 2, 5)
assert select_backend(q, torch.zeros(1, 3, 5)).name == "torch"
try:
    capture_from_lse(q, k, lse, 0.25, torch.zeros(1, 3, 5), backend="triton")
except BackendUnavailable as exc:
    assert "triton cannot be imported" in str(exc), exc
else:
    raise AssertionError("forcing triton without triton did not raise")
try:
    triton_fused.fused_attention_capture(q, k, k, torch.tensor([0]), None, torch.zeros(1, 1, 5))
except RuntimeError as exc:
    assert "triton cannot be imported" in str(exc), exc
else:
    raise AssertionError("the fused kernel ran without triton")
print("ok")
"""
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(
        cmd, check=False, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_triton_backend_refuses_cpu_tensors_when_compiling():
    from daam_fast.kernels import triton_capture

    if triton_capture.INTERPRET:
        pytest.skip("this process runs with TRITON_INTERPRET=1, where the triton backend does take CPU tensors")
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 3, 16)
    out = torch.zeros(1, 3, 5)
    assert select_backend(q, out).name == "torch"
    reason = triton_capture.TRITON_IMPORT_ERROR or "device cpu not in ('cuda',)"
    with pytest.raises(BackendUnavailable, match="forced") as exc:
        dispatch.capture_from_lse(q, k, torch.zeros(1, 2, 5), 0.25, out, backend="triton")
    assert reason in str(exc.value)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'daam_fast[triton]')")
@pytest.mark.parametrize("kernel", ["capture_lse", "self_normalising", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("D", [40, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("L,T,S", [(4096, 77, 77), (1024, 77, 77), (37, 1, 300), (4096, 512, 512)])
def test_gpu_block_table(kernel, dtype, D, L, T, S):
    # The GPU branch of block_sizes, without a GPU: the tiles must be legal for tl.dot (powers of two,
    # >= 16), cover the head dim, and take no more tokens or keys than there are (rounded up to 16).
    from daam_fast.kernels.triton_common import Gpu, block_sizes

    h100 = Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132)
    bl = block_sizes(kernel, D, T, S, L, torch.device("meta"), dtype, gpu=h100)
    for size in (bl.queries, bl.tokens, bl.dim, bl.keys):
        assert size >= 16 and size & (size - 1) == 0, bl
    assert bl.dim >= D and bl.dim < 2 * max(D, 16) and bl.tokens <= max(16, 2 * T) and bl.keys <= max(16, 2 * S), bl
    assert bl.tokens <= 128 and bl.queries <= 64 and bl.num_warps in (4, 8) and bl.num_stages in (2, 3), bl


def _tiles_file(path, entries) -> str:
    path.write_text(json.dumps({"version": 1, "entries": entries}))
    return str(path)


def _entry(queries: int, device: str = "NVIDIA H200", capability=(9, 0), **best) -> dict:
    blocks = {"queries": 16, "tokens": 64, "dim": 64, "keys": 64, "num_warps": 4, "num_stages": 3} | best
    return {"kernel": "capture_lse", "device": device, "capability": list(capability), "dtype": "float16",
            "head_dim": 64, "tokens": 77, "queries": queries, "best": blocks}  # fmt: skip


def test_measured_tiles_replace_the_static_table(tmp_path, monkeypatch):
    from daam_fast.kernels.triton_common import MEASURED_TILES_ENV, Blocks, Gpu, block_sizes

    h200 = Gpu("NVIDIA H200", (9, 0), 132)
    meta = torch.device("meta")
    static = block_sizes("capture_lse", 64, 77, 77, 4096, meta, torch.float16, gpu=h200)
    entries = [_entry(4096, num_warps=4), _entry(1024, num_warps=8), _entry(4096, "NVIDIA H100", num_stages=2)]
    monkeypatch.setenv(MEASURED_TILES_ENV, _tiles_file(tmp_path / "tiles.json", entries))
    # Same device, nearest query count (log scale): 3000 is nearer 4096 than 1024, 1500 nearer 1024.
    got = block_sizes("capture_lse", 64, 77, 77, 3000, meta, torch.float16, gpu=h200)
    assert got == Blocks(16, 64, 64, 64, 4, 3)
    assert block_sizes("capture_lse", 40, 70, 77, 1500, meta, torch.float16, gpu=h200).num_warps == 8
    # Another card of the same architecture takes its own entry first, then any same-architecture one.
    h100 = Gpu("NVIDIA H100", (9, 0), 132)
    assert block_sizes("capture_lse", 64, 77, 77, 4096, meta, torch.float16, gpu=h100).num_stages == 2
    # Nothing measured for this architecture, dtype, kernel, head-dim or token bucket: the static table.
    a100 = Gpu("NVIDIA A100", (8, 0), 108)
    assert block_sizes("capture_lse", 64, 77, 77, 4096, meta, torch.float16, gpu=a100).num_stages == 2
    assert block_sizes("capture_lse", 64, 77, 77, 4096, meta, torch.bfloat16, gpu=h200) == static
    assert block_sizes("fused", 64, 77, 77, 4096, meta, torch.float16, gpu=h200).num_stages == 2
    assert block_sizes("capture_lse", 128, 77, 77, 4096, meta, torch.float16, gpu=h200).dim == 128
    assert block_sizes("capture_lse", 64, 8, 77, 4096, meta, torch.float16, gpu=h200).tokens == 16


def test_malformed_tiles_file_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    from daam_fast.kernels.triton_common import MEASURED_TILES_ENV, Gpu, block_sizes

    h200 = Gpu("NVIDIA H200", (9, 0), 132)
    meta = torch.device("meta")
    bad = _entry(4096)
    del bad["capability"]
    monkeypatch.setenv(MEASURED_TILES_ENV, _tiles_file(tmp_path / "bad.json", [bad]))
    with caplog.at_level("WARNING", logger="daam_fast.kernels.triton_common"):
        got = block_sizes("capture_lse", 64, 77, 77, 4096, meta, torch.float16, gpu=h200)
    monkeypatch.delenv(MEASURED_TILES_ENV)
    assert got == block_sizes("capture_lse", 64, 77, 77, 4096, meta, torch.float16, gpu=h200)
    assert "ignoring measured Triton tiles" in caplog.text and "capability" in caplog.text
