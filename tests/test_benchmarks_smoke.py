"""Smoke test of the benchmark helpers (benchmarks/ is not part of the test run): the CPU comparison
runs once at a tiny size and returns its structure; the DAAM-style re-implementation computes daam's
maps (checked against daam_fast's ``daam_compat`` mode); the heat-buffer formula matches the tracer;
the GPU script exits 0 with a message when there is no GPU. Nothing here asserts a timing."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# `pytest` run as a script does not put the repository root on sys.path; benchmarks/ lives there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.compare import VARIANTS, compare_pipeline  # noqa: E402
from benchmarks.daam_style import DaamStyleTrace  # noqa: E402

PROMPT = "a cat wearing a red hat"


def test_cpu_comparison_structure(sd_pipe):
    out = compare_pipeline(sd_pipe, PROMPT, height=32, width=32, rounds=1)
    res = out["results"]
    assert set(res) == set(VARIANTS)
    for row in res.values():
        assert len(row["seconds"]) == 1 and len(row["mem"]) == 1
        assert {"median_s", "ratio", "ratio_min", "ratio_max", "mem_median", "mem_vs_baseline"} <= set(row)
    assert res["vanilla"]["ratio"] == 1.0  # each round's vanilla divided by itself
    # Tiny SD: latent 16², cross-attention grids 16² and 8², one conditional row, the prompt's 8 positions
    # (start, 6 tokens, end): a default trace captures only those.
    n_tokens = harness.prompt_positions(sd_pipe.tokenizer, PROMPT)
    assert n_tokens == 8
    assert out["heat_buffer_shapes"] == [[1, 8, 256], [1, 8, 64]]
    analytic = harness.heat_buffer_bytes_per_image(dict(sd_pipe.unet.config), (16, 16), n_tokens)
    assert out["heat_buffer_bytes_per_image"] == analytic == 4 * 8 * (256 + 64)
    table = harness.comparison_table("tiny", res)
    assert all(f"| {v} |" in table for v in VARIANTS)


def test_daam_style_matches_daam_compat(sd_pipe):
    """The DAAM-style re-implementation (unfused softmax, per-head maps, per-map bicubic up-sampling and
    clamp) gives the maps of daam_fast's daam_compat mode, which reproduces daam 0.2.0's aggregation."""
    from daam_fast import trace

    kwargs = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
    with DaamStyleTrace(sd_pipe) as dt:
        sd_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    n = len(sd_pipe.tokenizer.tokenize(PROMPT))
    ours = dt.compute_global_heat_map(n)
    with trace(sd_pipe, daam_compat=True) as tc:
        sd_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    ref = tc.compute_global_heat_map().heat_maps
    assert ours.shape == ref.shape == (n + 2, 16, 16)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-4)


def test_attention_grids_follow_ceil_halving():
    cfg = {"down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}
    assert harness.attention_grids(cfg, (13, 8)) == [(13, 8, 1), (7, 4, 2)]
    sdxl = harness.load_config("sdxl", "unet")
    assert harness.attention_grids(sdxl, (128, 128)) == [(64, 64, 2), (32, 32, 4)]


def test_gpu_check_without_gpu_exits_zero_with_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "needs a CUDA GPU" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


@pytest.mark.skipif(sys.platform != "linux", reason="per-call peak RSS uses Linux /proc")
def test_peak_rss_counts_a_transient_allocation():
    assert harness.peak_rss_supported() is None
    with harness.PeakRSS() as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed
        del x
    assert m.delta >= 60 * 2**20


def test_tile_autotuning_without_gpu_exits_zero_with_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.autotune_tiles", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "needs a CUDA GPU" in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_tile_autotuning_flow_in_the_interpreter(tmp_path):
    # The GPU script's whole flow on tiny shapes in Triton's interpreter: every candidate runs, agrees with the
    # static tiles' result, and the file it writes is one block_sizes reads (timings here mean nothing).
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.autotune_tiles", "--tiny-cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "triton_tiles.json").read_text())
    assert {e["kernel"] for e in doc["entries"]} == {"capture_lse", "fused", "self_normalising"}
    for e in doc["entries"]:
        assert len(e["timings"]) >= 2 and all("us" in t for t in e["timings"]), e["timings"]
    from daam_fast.kernels.triton_common import MEASURED_TILES_ENV, Blocks, Gpu, block_sizes

    first = doc["entries"][0]
    os.environ[MEASURED_TILES_ENV] = str(tmp_path / "triton_tiles.json")
    try:
        got = block_sizes(first["kernel"], first["head_dim"], first["tokens"], first["keys"], first["queries"],
                          torch.device("meta"), torch.float32, gpu=Gpu("Triton interpreter", (8, 0), 4))  # fmt: skip
    finally:
        del os.environ[MEASURED_TILES_ENV]
    assert got == Blocks(**first["best"])


def test_batch_throughput_script_runs(tmp_path):
    from benchmarks import batch_throughput

    argv = ["--items", "3", "--steps", "1", "--rounds", "1", "--local-threads", "1", "--ray-workers", ""]
    threads = torch.get_num_threads()  # the script sets the local variant's threads
    try:
        assert batch_throughput.main([*argv, "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "out" / "batch_throughput.json").read_text())["rows"]
    assert [(r["engine"], r["items"]) for r in rows] == [("local", 3)] and rows[0]["steady_items_per_s"] > 0
