"""Benchmark fixtures and reporting.

- Collects ``bench_*.py`` files as test modules (pytest's default pattern only takes ``test_*.py``).
- Keeps torch to ``DAAM_FAST_BENCH_THREADS`` threads (default 1: the machines these run on are shared).
- ``bench_info``: machine facts for ``benchmark.extra_info`` (CPU model, torch version, threads, GPU).
- At the end of the run prints the comparison tables the bench modules collected in
  ``harness.RESULTS`` and, when ``DAAM_FAST_BENCH_OUT`` names a folder, writes them there as
  ``bench.md`` and ``bench.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import harness

torch.set_num_threads(int(os.environ.get("DAAM_FAST_BENCH_THREADS", "1")))


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself already; collecting it here too
    # would run every benchmark twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_info() -> dict:
    """Machine facts (``harness.machine_info``) for ``benchmark.extra_info``."""
    return harness.machine_info("cuda" if torch.cuda.is_available() else "cpu")


def _report() -> str:
    parts = []
    info = harness.machine_info("cuda" if torch.cuda.is_available() else "cpu")
    parts.append("Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    for section in harness.RESULTS.get("pipeline", []):
        parts.append(section["table"])
        parts.append("\n".join(f"- {note}" for note in section["notes"]))
    if harness.RESULTS.get("heat_buffer"):
        parts.append(
            "**Heat-buffer memory (daam_fast default: one fp32 [tokens, h·w] buffer per traced grid)**\n\n"
            + harness.markdown_table(harness.RESULTS["heat_buffer"], list(harness.RESULTS["heat_buffer"][0]))
        )
    if harness.RESULTS.get("kernels"):
        rows = harness.RESULTS["kernels"]
        parts.append(
            "**Kernel level: capture vs the attention it rides on**\n\n" + harness.markdown_table(rows, list(rows[0]))
        )
    return "\n\n".join(parts)


def pytest_terminal_summary(terminalreporter):
    if not harness.RESULTS:
        return
    text = _report()
    terminalreporter.section("daam_fast benchmark tables")
    terminalreporter.write_line(text)
    out = os.environ.get("DAAM_FAST_BENCH_OUT")
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "bench.md").write_text(text + "\n")
        (path / "bench.json").write_text(json.dumps(harness.RESULTS, indent=1, default=str))
