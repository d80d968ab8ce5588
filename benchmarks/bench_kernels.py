"""Kernel level: the capture against the attention call it rides on, per backend, at SDXL 1024² shapes.

Shapes (SDXL at 1024²): B = 2 (the CFG batch), cross-attention on the 64² grid (L = 4096, 10 heads)
and on the 32² grid (L = 1024, 20 heads), head dim 64, S = 77 text keys, all T = 77 captured. The
capture here runs on both batch rows (the tracer captures only the conditional row by default, so
this is an upper bound). q, k, v are transposed views of ``[B, L, H·D]``, as diffusers makes them.

Three variants are timed in interleaved rounds (see ``harness.interleaved``):
- ``vanilla``: ``F.scaled_dot_product_attention`` (what the untraced model runs);
- ``traced``: the lse-returning SDPA op daam_fast calls instead, plus the capture into a heat buffer;
- ``daam_style``: daam 0.2.0's method (unfused baddbmm + softmax + bmm, per-head maps, Python loop
  over tokens; see ``daam_style.py``).
The pytest-benchmark statistics are those of ``traced``; ratios against vanilla are in ``extra_info``
and in the table printed at the end of the run.

    pytest benchmarks/bench_kernels.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.daam_style import accumulate, daam_style_attention
from daam_fast.kernels import dispatch
from daam_fast.processors.attention import attention_with_lse

B, D, S, T = 2, 64, 77, 77
#: (heads, queries): SDXL 1024² cross-attention at the 64² grid and at the 32² grid.
SHAPES = [(10, 4096), (20, 1024)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["torch", "triton", "cuda"]
#: Interleaved rounds per device: the CPU is slow and shared, the GPU is quick.
ROUNDS = {"cpu": 5, "cuda": 50}


def _dtype(device: str) -> torch.dtype:
    # fp32 on the CPU (what SD runs there), fp16 on the GPU (what SDXL runs there).
    return torch.float32 if device == "cpu" else torch.float16


def _inputs(H: int, L: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    dt = _dtype(device)
    q = torch.randn(B, L, H * D, device=device, dtype=dt, generator=g).view(B, L, H, D).transpose(1, 2)
    k = torch.randn(B, S, H * D, device=device, dtype=dt, generator=g).view(B, S, H, D).transpose(1, 2)
    v = torch.randn(B, S, H * D, device=device, dtype=dt, generator=g).view(B, S, H, D).transpose(1, 2)
    return q, k, v


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _skip_reason(backend: str, device: str, q: torch.Tensor, heat: torch.Tensor) -> str | None:
    registered = {b.name: b for b in dispatch.backends()}
    if backend not in registered:
        return f"backend {backend!r} is not registered in this build (module missing or not importable)"
    if backend == "triton" and device == "cpu":
        return "triton on the CPU runs only in its interpreter (a correctness tool, not a performance path)"
    reasons = registered[backend].not_supported_reasons(q, heat)
    return "; ".join(reasons) if reasons else None


def _variants(H: int, L: int, device: str, backend: str):
    from diffusers.models.attention_processor import Attention

    q, k, v = _inputs(H, L, device)
    heat = torch.zeros(B, T, L, device=device, dtype=torch.float32)
    why = _skip_reason(backend, device, q, heat)
    if why:
        pytest.skip(why)
    scale = D**-0.5
    k_sel = k[:, :, :T]
    side = int(L**0.5)
    # daam's layout: heads folded into the batch ([B·H, L, D]); get_attention_scores from a real module.
    attn = Attention(query_dim=H * D, heads=H, dim_head=D, cross_attention_dim=H * D).to(device, _dtype(device))
    q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
    daam_maps: dict = {}

    def vanilla():
        F.scaled_dot_product_attention(q, k, v, scale=scale)

    def traced():
        _, lse = attention_with_lse(q, k, v, scale=scale)
        if lse is None:
            dispatch.capture_self_normalising(q, k, torch.arange(T, device=device), scale, heat, backend=backend)
        else:
            dispatch.capture_from_lse(q, k_sel, lse, scale, heat, backend=backend)

    def daam_style():
        _, probs = daam_style_attention(attn, q3, k3, v3)
        accumulate(daam_maps, 1, 0, probs, H, side, side)

    return {"vanilla": vanilla, "traced": traced, "daam_style": daam_style}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,L", SHAPES, ids=[f"H{h}-L{q}" for h, q in SHAPES])
def test_capture_vs_attention(benchmark, device, backend, H, L):
    torch.manual_seed(0)
    variants = _variants(H, L, device, backend)
    rounds = ROUNDS[device]
    with torch.no_grad():
        res = harness.interleaved(variants, rounds, device=device, memory=device != "cpu")

        def traced_synced():
            variants["traced"]()
            harness.sync(device)

        benchmark.pedantic(traced_synced, rounds=rounds, warmup_rounds=1, iterations=1)
    shape = f"B{B} H{H} L{L} D{D} S{S} T{T} {str(_dtype(device)).replace('torch.', '')}"
    benchmark.extra_info.update(
        harness.machine_info(device),
        shape=shape,
        backend=backend,
        vanilla_median_s=res["vanilla"]["median_s"],
        traced_over_vanilla=res["traced"]["ratio"],
        daam_style_over_vanilla=res["daam_style"]["ratio"],
    )
    harness.RESULTS.setdefault("kernels", []).append(
        {
            "device": device,
            "backend": backend,
            "shape": shape,
            "vanilla ms": 1e3 * res["vanilla"]["median_s"],
            "traced ms": 1e3 * res["traced"]["median_s"],
            "traced / vanilla": res["traced"]["ratio"],
            "capture ms (traced − vanilla)": 1e3 * (res["traced"]["median_s"] - res["vanilla"]["median_s"]),
            "daam_style ms": 1e3 * res["daam_style"]["median_s"],
            "daam_style / vanilla": res["daam_style"]["ratio"],
            # On a shared CPU, CPU time is the steadier measure (wall time counts other jobs' turns).
            "traced / vanilla (CPU time)": _fmt(res["traced"]["cpu_ratio"]),
            "daam_style / vanilla (CPU time)": _fmt(res["daam_style"]["cpu_ratio"]),
            "rounds": rounds,
        }
    )
