"""Capture overhead on a GPU at SDXL sizes: SDPA alone vs SDPA (with lse) + capture vs the fused kernel.

SDXL at 1024²: cross-attention on the 64² grid (L = 4096 queries, 10 heads) and the 32² grid
(L = 1024, 20 heads), head dim 64, 77 text keys, 2 images (CFG), fp16; T = 77 captured columns (every
position) or 10 (a default trace of a short prompt: its own positions). The other two (H, L) pairs are timed
too, and the dispatcher's first-use check of the Triton backend. Each benchmark also times plain SDPA on the
same inputs in the same run and reports ``overhead_vs_sdpa`` = its median / SDPA's median in ``extra_info``.

    pytest benchmarks/bench_kernels_gpu.py --benchmark-only --benchmark-columns=median,iqr
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (these time CUDA kernels)"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)"),
]

B, D, S = 2, 64, 77
# Captured columns: all 77 positions (tokens=range(77)), or a default trace's prompt positions for a short
# prompt (start + 8 tokens + end).
TOKENS = (77, 10)
ROUNDS, WARMUP = 200, 20


def _inputs(H: int, L: int, T: int = 77, dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(0)
    # As diffusers lays them out: transposed views of [B, L, H·D].
    q = torch.randn(B, L, H * D, device="cuda", dtype=dtype, generator=g).view(B, L, H, D).transpose(1, 2)
    k = torch.randn(B, S, H * D, device="cuda", dtype=dtype, generator=g).view(B, S, H, D).transpose(1, 2)
    v = torch.randn(B, S, H * D, device="cuda", dtype=dtype, generator=g).view(B, S, H, D).transpose(1, 2)
    idx = torch.arange(T, device="cuda")
    heat = torch.zeros(B, T, L, device="cuda")
    return q, k, v, idx, heat


def _median_s(fn) -> float:
    # Same protocol as benchmark.pedantic below: warm-up, then per-call wall time with a sync inside.
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _extra_info(benchmark, H: int, L: int, T: int, baseline_s: float | None) -> None:
    import triton

    props = torch.cuda.get_device_properties(0)
    benchmark.extra_info.update(
        gpu=props.name,
        sm_count=props.multi_processor_count,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        shape={"B": B, "H": H, "L": L, "D": D, "S": S, "T": T, "dtype": "float16"},
        peak_memory_mb=round(torch.cuda.max_memory_allocated() / 2**20, 2),
    )
    if baseline_s is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(sdpa_median_us=round(baseline_s * 1e6, 2), overhead_vs_sdpa=median / baseline_s)


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("H,L", [(10, 4096), (20, 1024), (20, 4096), (10, 1024)])
@pytest.mark.parametrize("provider", ["sdpa", "sdpa_lse+capture", "fused"])
def test_capture_overhead(benchmark, provider, H, L, T):
    from daam_fast.kernels import triton_capture, triton_fused

    q, k, v, idx, heat = _inputs(H, L, T)
    k_sel = k[:, :, idx]
    scale = D**-0.5

    def sdpa():
        F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()

    def sdpa_lse_capture():
        # The flash op returns the lse SDPA computes anyway ([B, H, L] fp32); capture reuses it.
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, scale=scale)[:2]
        triton_capture.capture_from_lse(q, k_sel, lse[..., :L], scale, heat)
        torch.cuda.synchronize()

    def fused():
        triton_fused.fused_attention_capture(q, k, v, idx, scale, heat)
        torch.cuda.synchronize()

    fn = {"sdpa": sdpa, "sdpa_lse+capture": sdpa_lse_capture, "fused": fused}[provider]
    baseline = None if provider == "sdpa" else _median_s(sdpa)
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    _extra_info(benchmark, H, L, T, baseline)


@pytest.mark.parametrize("H,L", [(10, 4096), (20, 1024)])
def test_first_use_check_cost(benchmark, H, L):
    """What the dispatcher's first-use check of the Triton backend costs (once per backend, kernel, device,
    dtype and head dim in a process): the candidate on 64 queries plus the float64 reference, against one
    capture call of the same shape (``overhead_vs_sdpa`` here: check time / capture time)."""
    from daam_fast.kernels import dispatch, triton_capture, verify

    q, k, _, idx, heat = _inputs(H, L)
    k_sel = k[:, :, idx]
    scale = D**-0.5
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, False, scale=scale)[:2]
    lse = lse[..., :L]
    triton = dispatch._REGISTRY["triton"]

    def capture():
        triton_capture.capture_from_lse(q, k_sel, lse, scale, heat)
        torch.cuda.synchronize()

    def check():
        assert verify.check_from_lse(triton, q, k_sel, lse, scale, heat, None) is None
        torch.cuda.synchronize()

    baseline = _median_s(capture)
    benchmark.pedantic(check, rounds=20, warmup_rounds=2, iterations=1)
    _extra_info(benchmark, H, L, 77, baseline)
