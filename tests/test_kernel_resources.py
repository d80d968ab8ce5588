"""The GPU kernels compiled ahead of time for real GPUs on this CPU-only machine (``make kernel-report``).

``triton.compile`` for a ``GPUTarget`` runs Triton down to the wheel's ``ptxas``: a compile error in a GPU-only
branch (the fp16/bf16 ``UPCAST=False`` tensor-core paths never run in the interpreter) fails here. A representative
subset is compiled (sm_80 and sm_90, fp16 and bf16, head dims 64 and 128, each kernel's largest dispatcher pick
with bias and per-head output, the register-hungriest variant): none may spill, and capture from lse must keep two
programs resident per SM. The committed report must cover every tile the current table picks (so a table change
without ``make kernel-report`` fails) with no spill at head dim ≤ 128 (but the exception docs/PERFORMANCE.md
documents), and docs/PERFORMANCE.md must show it.
The CUDA extension's kernels go through ``nvcc -Xptxas -v`` the same way. About 30 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks import cuda_resources, kernel_report, report_tables  # noqa: E402
from benchmarks.kernel_resources import Variant, resident_programs, specialize  # noqa: E402
from daam_fast.kernels.triton_common import Gpu, tensor_cores  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'daam_fast[triton]')")


def _subset() -> list[Variant]:
    picks = [
        v
        for v in kernel_report.dispatcher_variants(archs=(80, 90))
        if v.dtype in ("float16", "bfloat16") and v.head_dim in (64, 128) and not v.bias and not v.per_head
    ]
    largest: dict[tuple, Variant] = {}
    for v in sorted(picks, key=lambda v: v.blocks.queries * v.blocks.tokens):
        largest[v.kernel, v.arch, v.dtype, v.head_dim] = v
    flagged = [replace(v, bias=True, per_head=True) for v in largest.values()]
    plain_lse = [v for v in largest.values() if v.kernel == "capture_lse"]
    return flagged + plain_lse


@pytest.fixture(scope="module")
def compiled():
    # Two processes (compiles read Triton's process-wide knobs and stdout, so not threads).
    variants = _subset()
    return list(zip(variants, kernel_report.run(variants, jobs=2), strict=True))


@needs_triton
def test_subset_compiles_without_spills(compiled):
    assert len(compiled) >= 30
    errors = [e for _, e in compiled if "error" in e]
    assert not errors, errors[0]["error"]
    spilling = [(v, e["registers"], e["spill_bytes"]) for v, e in compiled if e["spill_bytes"]]
    assert not spilling, spilling
    for _, e in compiled:
        assert 0 < e["registers"] <= 255 and e["shared_memory"] > 0, e


@needs_triton
def test_capture_from_lse_keeps_two_programs_per_sm(compiled):
    for v, e in compiled:
        if v.kernel == "capture_lse":
            assert e["programs_per_sm"] >= 2, (v, e)


@needs_triton
def test_specialisation_matches_triton_runtime():
    # The report compiles what a launch would: the same signature types and divisibility hints as Triton's own
    # argument specialisation (a private function; skipped where this Triton lacks it).
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")
    for arg in (1, 16, 40, 77, 4096, 0, 0.125, torch.empty(2, 3, device="meta", dtype=torch.bfloat16)):
        kind, attr = native_specialize_impl(CUDABackend, arg, False, True, True)
        assert specialize(arg) == (kind, attr == "D"), arg


def test_occupancy_arithmetic():
    # 128 registers × 256 threads = 32768: two programs in sm_80's 65536 registers; 129 rounds up to 136 per
    # thread (allocation unit 256 per warp), so one. Shared memory: sm_86 gives 100 KiB, 1 KiB reserved each.
    assert resident_programs(80, 128, 0, 8) == 2
    assert resident_programs(80, 129, 0, 8) == 1
    assert resident_programs(86, 32, 49 * 1024, 4) == 2
    assert resident_programs(86, 32, 50 * 1024, 4) == 1
    assert resident_programs(75, 32, 0, 4) == 8  # sm_75: 32 warps per SM at most


def test_committed_report_covers_the_tile_table():
    doc = json.loads(kernel_report.JSON_PATH.read_text())
    entries = {}
    for e in doc["triton_kernels"]:
        assert "error" not in e, e
        b = e["blocks"]
        blocks = (b["queries"], b["tokens"], b["dim"], b["keys"], e["num_warps"], e["num_stages"])
        entries[e["kernel"], e["arch"], e["dtype"], e["head_dim"], blocks, e["bias"], e["per_head"]] = e
    missing, spilling = [], []
    for v in kernel_report.dispatcher_variants():
        b = v.blocks
        key = (v.kernel, f"sm_{v.arch}", v.dtype, v.head_dim, (b.queries, b.tokens, b.dim, b.keys, b.num_warps,
               b.num_stages), v.bias, v.per_head)  # fmt: skip
        if key not in entries:
            missing.append(key)
        elif v.head_dim <= 128 and entries[key]["spill_bytes"] and not _documented_exception(v):
            spilling.append(entries[key])
        elif key in entries:
            assert entries[key]["programs_per_sm"] >= 1, entries[key]  # fits an SM at all (shared memory)
    assert not missing, f"{len(missing)} picks not in the report (run `make kernel-report`), e.g. {missing[:3]}"
    assert not spilling, spilling[:5]


def _documented_exception(v: Variant) -> bool:
    # docs/PERFORMANCE.md: the attention kernels on the FMA path (fp32, or any dtype on sm_75) spill, as Triton's
    # FMA dot keeps whole operand rows in registers (and ptxas caps a few at 64 - 128 registers).
    return v.kernel != "capture_lse" and not tensor_cores(getattr(torch, v.dtype), Gpu("", divmod(v.arch, 10), 0))


def test_docs_show_the_committed_report():
    doc = json.loads(kernel_report.JSON_PATH.read_text())
    text = kernel_report.DOC_PATH.read_text()
    section = text.split(kernel_report.MARK_START, 1)[1].split(kernel_report.MARK_END, 1)[0]
    assert section.strip() == report_tables.markdown(doc).strip()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: no CUDA toolkit")
def test_cuda_extension_kernels_do_not_spill():
    res = cuda_resources.report(archs=(80, 90))
    assert "error" not in res, res.get("error")
    assert {(k["kernel"], k["dtype"], k["arch"]) for k in res["kernels"]} == {
        (k, d, a)
        for k in ("capture_kernel", "row_lse_kernel")
        for d in ("float16", "bfloat16", "float32")
        for a in ("sm_80", "sm_90")
    }
    for k in res["kernels"]:
        assert k["spill_bytes"] == 0 and k["programs_per_sm"] >= 2, k
