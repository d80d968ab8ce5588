"""Time the Triton kernels' candidate tiles on a CUDA GPU and write the fastest per shape (``triton_tiles.json``).

For each real model shape below, every config of ``triton_common.tile_candidates`` (the pruned list that
``make kernel-report`` compiles for every architecture) and the static table's pick are timed on the GPU
with CUDA graphs (``triton.testing.do_bench_cudagraph``: kernel time without the Python launch cost),
median of the replays. Candidates are compiled first in parallel worker processes (Triton's on-disk cache
then serves the timing process), so a whole run fits about a minute on a 16-core GPU machine.

Output in ``--out``: ``triton_tiles.json`` (the measured-tiles file ``block_sizes`` reads when
``DAAM_FAST_TRITON_TILES`` names it, or when copied to ``daam_fast/kernels/triton_tiles.json``) and
``autotune_tiles.md``. Without a CUDA GPU it says so and exits 0. Run by ``benchmarks/gpu_check.sh``:

    python -m benchmarks.autotune_tiles --out gpu-check-out --budget-s 60
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import torch

from daam_fast.kernels.triton_common import Blocks

REPORT = Path(__file__).resolve().parent / "kernel_resources.json"
# (label, kernel, dtype, batch, heads, queries, tokens, keys, head dim): cross-attention at the resolutions
# SD 1.5 (512²) and SDXL (1024²) trace, SDXL with only a short prompt's positions, Flux's joint attention.
SHAPES = [
    ("SDXL 64² cross-attention", "capture_lse", "float16", 2, 10, 4096, 77, 77, 64),
    ("SDXL 32² cross-attention", "capture_lse", "float16", 2, 20, 1024, 77, 77, 64),
    ("SDXL 64², 11 prompt tokens", "capture_lse", "float16", 2, 10, 4096, 11, 77, 64),
    ("SD 1.5 64² cross-attention", "capture_lse", "float16", 2, 8, 4096, 77, 77, 40),
    ("SD 1.5 16² cross-attention", "capture_lse", "float16", 2, 8, 256, 77, 77, 40),
    ("Flux 1024² joint attention", "capture_lse", "bfloat16", 1, 24, 4096, 512, 4608, 128),
    ("SDXL 64² fused", "fused", "float16", 2, 10, 4096, 77, 77, 64),
    ("SDXL 32² fused", "fused", "float16", 2, 20, 1024, 77, 77, 64),
    ("SDXL 64² self-normalising", "self_normalising", "float16", 2, 10, 4096, 77, 77, 64),
]
# --tiny-cpu: one small shape per kernel (a query tail, a token tail) for Triton's interpreter.
TINY_SHAPES = [
    ("tiny capture from lse", "capture_lse", "float32", 1, 2, 40, 20, 20, 16),
    ("tiny fused", "fused", "float32", 1, 2, 40, 20, 20, 16),
    ("tiny self-normalising", "self_normalising", "float32", 1, 2, 40, 20, 20, 16),
]


def _runner(shape, blocks, device: str = "cuda"):
    """A no-argument callable launching ``shape``'s kernel with ``blocks`` on inputs made from a fixed seed (the
    same for every config), returning its outputs: the heat buffer (added to at each call), and ``o`` if fused."""
    from daam_fast.kernels import triton_capture, triton_fused

    _, kernel, dtype, B, H, L, T, S, D = shape
    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)

    def rows(n):  # as diffusers lays them out: transposed views of [B, n, H·D]
        return torch.randn(B, n, H * D, device=device, dtype=dt, generator=g).view(B, n, H, D).transpose(1, 2)

    q, k, v = rows(L), rows(S), rows(S)
    idx = torch.arange(T, device=device)
    heat = torch.zeros(B, T, L, device=device)
    scale = D**-0.5
    if kernel == "capture_lse":
        k_sel = k[:, :, :T]
        if device == "cuda":  # the lse the model's own attention returns (flash SDPA), as the tracer gets it
            lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, scale=scale)[1][..., :L]
        else:
            lse = torch.logsumexp(scale * q.float() @ k.float().transpose(-1, -2), dim=-1)
        return lambda: [triton_capture.capture_from_lse(q, k_sel, lse, scale, heat, blocks=blocks)]
    if kernel == "fused":
        return lambda: [heat, triton_fused.fused_attention_capture(q, k, v, idx, scale, heat, blocks=blocks)]
    return lambda: [triton_fused.capture_self_normalising(q, k, idx, scale, heat, blocks=blocks)]


def _disagrees(got: list, want: list) -> str | None:
    # Every config sums the same products in the same head order: only the dot's tiling over the head dim
    # differs (fp32 rounding), and o rounds to the input dtype.
    for g, w in zip(got, want, strict=True):
        tol = (1e-4, 1e-6) if g.dtype == torch.float32 else (4e-3, 4e-3)
        if not torch.allclose(g, w, rtol=tol[0], atol=tol[1]):
            return f"differs from the static tiles' result by up to {(g.float() - w.float()).abs().max().item():.3g}"
    return None


def _configs(shape, gpu) -> list:
    """The static table's pick for ``gpu`` first, then the other candidates, less those the committed kernel report
    (``benchmarks/kernel_resources.json``) shows spilling on this architecture."""
    from daam_fast.kernels.triton_common import block_sizes, tile_candidates

    _, kernel, dtype, B, H, L, T, S, D = shape
    dt = getattr(torch, dtype)
    static = block_sizes(kernel, D, T, S, L, torch.device("meta"), dt, gpu=gpu)
    spilling = set()
    if REPORT.is_file():
        arch = "sm_{}{}".format(*gpu.capability)
        for e in json.loads(REPORT.read_text())["triton_kernels"]:
            if e.get("spill_bytes") and e["arch"] == arch and not e["bias"] and not e["per_head"]:
                b = Blocks(**e["blocks"], num_warps=e["num_warps"], num_stages=e["num_stages"])
                spilling.add((e["kernel"], e["dtype"], e["head_dim"], b))
    found = tile_candidates(kernel, D, T, S, L, dt, gpu)
    return [static] + [b for b in found if b != static and (kernel, dtype, D, b) not in spilling]


def _compile(shape, blocks) -> None:
    # Worker process: one launch compiles the kernel into Triton's on-disk cache. A config that fails here fails
    # again when measured, which reports it.
    try:
        _runner(shape, blocks)()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def _time_us(fn, device: str) -> float:
    import triton.testing

    if device != "cuda":  # the interpreter (--tiny-cpu): checks the flow, not a timing
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    if hasattr(triton.testing, "do_bench_cudagraph"):
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _measure(shape, blocks, reference: list | None, device: str) -> dict:
    """``{"blocks", "us"}`` for one config, or ``{"blocks", "error"}``; ``reference`` is the static config's
    first outputs (None for the static config itself, whose outputs are returned under ``"outputs"``)."""
    row: dict = {"blocks": asdict(blocks)}
    try:
        fn = _runner(shape, blocks, device)
        first = [t.clone() for t in fn()]
        wrong = _disagrees(first, reference) if reference is not None else None
        if wrong:
            row["error"] = wrong
            return row
        row["us"] = round(_time_us(fn, device), 2)
        if reference is None:
            row["outputs"] = first
    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory on this GPU: reported, not fatal
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-check-out")
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop timing (and write what was measured) after this")
    ap.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--tiny-cpu", action="store_true", help="tiny shapes in Triton's interpreter: checks the script")
    args = ap.parse_args(argv)
    import triton

    from daam_fast.kernels.triton_common import INTERPRET, Gpu, gpu_of

    if args.tiny_cpu:
        if not INTERPRET:
            print("--tiny-cpu needs TRITON_INTERPRET=1 in the environment (the kernels run in the interpreter)")
            return 2
        device, gpu, shapes = "cpu", Gpu("Triton interpreter", (8, 0), 4), TINY_SHAPES
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("autotune_tiles needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.")
        return 0
    else:
        device, gpu, shapes = "cuda", gpu_of(torch.cuda.current_device()), SHAPES

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(shape, _configs(shape, gpu)) for shape in shapes]
    if device == "cuda":
        pool = ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"))
        futures = [pool.submit(_compile, shape, b) for shape, configs in plan for b in configs]
        with contextlib.suppress(TimeoutError):  # what did not compile in time compiles when measured
            for _ in as_completed(futures, timeout=max(1.0, args.budget_s * 0.6)):
                pass
        pool.shutdown(wait=True, cancel_futures=True)
    compile_s = time.perf_counter() - start

    entries, md = [], []
    for shape, configs in plan:
        label, kernel, dtype, B, H, L, T, S, D = shape
        timings, reference = [], None
        for b in configs:
            if time.perf_counter() - start > args.budget_s:
                break
            row = _measure(shape, b, reference, device)
            if not timings:
                reference = row.pop("outputs", None)
            timings.append(row)
            if reference is None:
                break  # the static config failed: nothing to check the others against
        ok = [t for t in timings if "us" in t]
        if not ok:
            md.append(f"| {label} | {_fmt(configs[0])} | not measured (budget or errors) | | | | 0/{len(configs)} |")
            continue
        best = min(ok, key=lambda t: t["us"])
        static = timings[0] if "us" in timings[0] else None
        entries.append({
            "kernel": kernel, "device": gpu.name, "capability": list(gpu.capability), "dtype": dtype,
            "head_dim": D, "tokens": T, "queries": L, "keys": S, "heads": H, "batch": B,
            "best": best["blocks"], "best_us": best["us"], "static": asdict(configs[0]),
            "static_us": static["us"] if static else None, "timings": timings,
        })  # fmt: skip
        speedup = f"{static['us'] / best['us']:.2f}×" if static else "n/a"
        md.append(
            f"| {label} | {_fmt(configs[0])} | {static['us'] if static else 'n/a'} | {_fmt(Blocks(**best['blocks']))} "
            f"| {best['us']} | {speedup} | {len(ok)}/{len(configs)} |"
        )
    doc = {
        "version": 1,
        "device": gpu.name,
        "capability": list(gpu.capability),
        "sm_count": gpu.sm_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "compile_s": round(compile_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "entries": entries,
    }
    (out / "triton_tiles.json").write_text(json.dumps(doc, indent=1) + "\n")
    head = [
        f"# Triton tile autotuning on {gpu.name} (sm_{gpu.capability[0]}{gpu.capability[1]}, {gpu.sm_count} SMs)",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; kernel time per call, µs ("
        + ("CUDA graph replays, median" if device == "cuda" else "one interpreted call: checks the flow only")
        + f"). Compiled in {compile_s:.0f} s, total {doc['wall_s']} s.",
        "",
        "| shape | static tiles | static µs | best tiles | best µs | static / best | configs timed |",
        "|---|---|---|---|---|---|---|",
    ]
    (out / "autotune_tiles.md").write_text("\n".join(head + md) + "\n")
    print("\n".join(head + md))
    return 0


def _fmt(b) -> str:
    return f"L{b.queries} T{b.tokens} S{b.keys} D{b.dim} w{b.num_warps} s{b.num_stages}"


if __name__ == "__main__":
    sys.exit(main())
