"""``make kernel-report``: registers, spills and shared memory of every GPU kernel variant, per architecture,
compiled on this machine without a GPU; writes ``benchmarks/kernel_resources.json`` and the tables in
``docs/PERFORMANCE.md`` (between the ``kernel-report`` markers).

Triton: every variant the dispatcher can pick (:func:`dispatcher_variants`) and every autotuning candidate
of ``benchmarks/autotune_tiles.py`` (:func:`candidate_variants`), each compiled by ``triton.compile`` for
sm_75 / 80 / 86 / 89 / 90 (``benchmarks/kernel_resources.py``). CUDA extension: ``csrc/capture_kernels.cuh``
compiled by ``nvcc -Xptxas -v`` for the same architectures (:mod:`benchmarks.cuda_resources`).

    python -m benchmarks.kernel_report [--jobs 2] [--archs 80,90] [--measured gpu-check-out/triton_tiles.json]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch

from benchmarks import cuda_resources
from benchmarks.kernel_resources import ARCHS, Variant, measure
from daam_fast.kernels.triton_common import KERNELS, Blocks, Gpu, block_sizes, tile_candidates

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "benchmarks" / "kernel_resources.json"
DOC_PATH = ROOT / "docs" / "PERFORMANCE.md"
MARK_START, MARK_END = "<!-- kernel-report:start -->", "<!-- kernel-report:end -->"

DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (40, 64, 80, 128, 160)  # SD 1.x, SD 2.x / SDXL, (SD 2.x 768 / 10 heads), Flux, (large DiTs)
#: A card per architecture (the tiles depend on the architecture only; the name labels measured tiles).
CARDS = {
    75: Gpu("Tesla T4", (7, 5), 40),
    80: Gpu("A100", (8, 0), 108),
    86: Gpu("GeForce RTX 3090", (8, 6), 82),
    89: Gpu("GeForce RTX 4090", (8, 9), 128),
    90: Gpu("H100 / H200", (9, 0), 132),
}
#: (queries, tokens, keys) the tracer passes: cross-attention at 64² … 8² grids with a short prompt's positions
#: or all 77, and Flux's 512 text tokens against 4096 + 512 joint keys.
SHAPES = [(L, T, 77) for L in (4096, 1024, 256, 64) for T in (8, 77)] + [(4096, 512, 4608)]


def dispatcher_variants(archs=ARCHS) -> list[Variant]:
    """Every tile set the dispatcher picks for :data:`SHAPES` on each architecture, per kernel, dtype and head dim,
    without bias or per-head output; plus, for the largest pick of each, the bias / per-head combinations (the
    register-hungriest variants: a smaller tile of the same kernel holds fewer live values)."""
    found: dict[tuple, Variant] = {}
    for kernel, arch, dtype, D in itertools.product(KERNELS, archs, DTYPES, HEAD_DIMS):
        picks: dict[tuple, Variant] = {}
        for L, T, S in SHAPES:
            if kernel == "fused" and S > 512:
                continue  # the fused kernel takes at most MAX_FUSED_KEYS keys
            bl = block_sizes(kernel, D, T, S, L, torch.device("meta"), getattr(torch, dtype), gpu=CARDS[arch])
            v = Variant(kernel, arch, dtype, D, bl, queries=L, tokens=T, keys=S)
            picks.setdefault(v.key(), v)
        largest = max(picks.values(), key=lambda v: (v.blocks.queries * v.blocks.tokens, v.blocks.keys))
        flagged = [replace(largest, bias=b, per_head=p) for b, p in ((True, False), (False, True), (True, True))]
        for v in [*picks.values(), *flagged]:
            found.setdefault(v.key(), v)
    return list(found.values())


def candidate_variants(archs=ARCHS) -> list[Variant]:
    """The autotuning candidates of ``benchmarks/autotune_tiles.py``, for every architecture."""
    from benchmarks.autotune_tiles import SHAPES as TUNED

    found: dict[tuple, Variant] = {}
    for (_, kernel, dtype, _B, H, L, T, S, D), arch in itertools.product(TUNED, archs):
        for bl in tile_candidates(kernel, D, T, S, L, getattr(torch, dtype), CARDS[arch]):
            v = Variant(kernel, arch, dtype, D, bl, heads=H, queries=L, tokens=T, keys=S)
            found.setdefault(v.key(), v)
    return list(found.values())


def source_key() -> str:
    """Hash of the two Triton kernels' source and the Triton version: entries compiled under the same key can be
    reused by the next run (``--fresh`` recompiles everything)."""
    import triton

    from daam_fast.kernels import triton_capture, triton_fused

    text = triton_capture._capture_lse_kernel.src + triton_fused._attn_capture_kernel.src + triton.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def entry_variant(e: dict) -> Variant:
    """The :class:`Variant` a report entry was compiled from."""
    blocks = Blocks(**e["blocks"], num_warps=e["num_warps"], num_stages=e["num_stages"])
    return Variant(e["kernel"], int(e["arch"].removeprefix("sm_")), e["dtype"], e["head_dim"], blocks, e["bias"],
                   e["per_head"], e["heads"], e["queries"], e["tokens"], e["keys"])  # fmt: skip


def _measure_safely(v: Variant) -> dict:
    try:
        return measure(v)
    except Exception as exc:  # noqa: BLE001 - a compile error is a finding, written into the report
        return {"kernel": v.kernel, "arch": f"sm_{v.arch}", "dtype": v.dtype, "head_dim": v.head_dim,
                "error": f"{type(exc).__name__}: {str(exc)[-500:]}"}  # fmt: skip


def run(variants: list[Variant], jobs: int) -> list[dict]:
    """Compile all ``variants`` in ``jobs`` processes (compiles are single-threaded)."""
    if jobs <= 1:
        return [_measure_safely(v) for v in variants]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_measure_safely, variants, chunksize=4))


def write_tables(doc: dict, path: Path) -> None:
    """Replace the section between the kernel-report markers of ``path`` (appended when absent) by the tables."""
    from benchmarks import report_tables

    section = report_tables.markdown(doc)
    text = path.read_text()
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + MARK_START + "\n" + section + "\n" + MARK_END + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + MARK_START + "\n" + section + "\n" + MARK_END + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)))
    ap.add_argument("--json", type=Path, default=JSON_PATH)
    ap.add_argument("--doc", type=Path, default=DOC_PATH, help="markdown file whose kernel-report section is rewritten")
    ap.add_argument("--measured", type=Path, help="a triton_tiles.json from autotune_tiles.py: adds measured µs")
    ap.add_argument("--tables-only", action="store_true", help="rewrite the docs tables from --json, compile nothing")
    ap.add_argument("--fresh", action="store_true", help="recompile variants the existing --json already holds")
    args = ap.parse_args(argv)
    if args.tables_only:
        write_tables(json.loads(args.json.read_text()), args.doc)
        return 0
    import triton

    archs = tuple(int(a) for a in args.archs.split(","))
    start = time.perf_counter()
    picked = dispatcher_variants(archs)
    picked_keys = {v.key() for v in picked}
    candidates = [v for v in candidate_variants(archs) if v.key() not in picked_keys]
    key = source_key()
    known = {}
    if not args.fresh and args.json.is_file():
        old = json.loads(args.json.read_text())
        if old.get("source_key") == key:
            known = {entry_variant(e).key(): e for e in old["triton_kernels"] if "error" not in e}
    todo = [v for v in picked + candidates if v.key() not in known]
    print(f"kernel-report: {len(picked)} dispatcher variants + {len(candidates)} autotuning candidates for "
          f"sm_{', sm_'.join(map(str, archs))}; compiling {len(todo)} with {args.jobs} processes "
          f"(the rest unchanged since the last report)", file=sys.stderr)  # fmt: skip
    fresh = dict(zip([v.key() for v in todo], run(todo, args.jobs), strict=True))
    entries = []
    for i, v in enumerate(picked + candidates):
        e = dict(fresh[v.key()] if v.key() in fresh else known[v.key()])
        e["picked"] = i < len(picked)
        entries.append(e)
    cuda = cuda_resources.report(archs)
    doc = {
        "generated_by": "make kernel-report (benchmarks/kernel_report.py)",
        "source_key": key,
        "triton": triton.__version__,
        "ptxas": {f"sm_{a}": cuda_resources.ptxas_version(a) for a in archs},
        "nvcc": cuda.get("nvcc"),
        "wall_s": round(time.perf_counter() - start, 1),
        "compiled_now": len(todo),
        "triton_kernels": entries,
        "cuda_kernels": cuda.get("kernels", []),
        "cuda_error": cuda.get("error"),
        "measured": json.loads(args.measured.read_text()) if args.measured else None,
    }
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    write_tables(doc, args.doc)
    errors = [e for e in entries if "error" in e]
    print(f"kernel-report: {len(entries)} Triton variants ({len(errors)} failed to compile), "
          f"{len(doc['cuda_kernels'])} CUDA kernels in {doc['wall_s']} s; wrote {args.json} and {args.doc}",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
