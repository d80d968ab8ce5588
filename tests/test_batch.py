"""`daam-fast batch` on the demo model, local engine: per-item files and index, resume after Ctrl-C or a killed
process, the folder lock (and a stale one), failed items, settings checks, the dataset summary, `analyze DIR`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daam_fast import analysis as A
from daam_fast import load, session
from daam_fast.batch import (
    RECORD_FIELDS,
    SUMMARY_FIELDS,
    BatchDir,
    BatchLockedError,
    read_index,
    read_prompts,
    run_batch,
)
from daam_fast.batch.engine_local import LocalEngine
from daam_fast.cli import BATCH_FAILED, main

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle and a blue square", "a blue circle and a red square"]
WORDS = ["red", "circle", "square"]


@pytest.fixture(scope="module")
def demo_pipe():
    return session.load_pipeline("demo", "cpu", quiet=True)


class CountingEngine(LocalEngine):
    """The local engine on a loaded pipeline, remembering which items it ran; ``hook(item)`` runs before each."""

    def __init__(self, pipe, hook=None):
        super().__init__("demo", "cpu", pipe=pipe)
        self.ran, self.hook = [], hook

    def run(self, items):
        for item in items:
            if self.hook:
                self.hook(item)
            self.ran.append(item.id)
            yield from super().run([item])


def _specs(tmp_path, seeds="0-1", prompts=PROMPTS, **kw):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return read_prompts(path, seeds=seeds, steps=kw.pop("steps", 2), size="32x32", **kw)


def _run(specs, out, engine, summary=False, **kw):
    return run_batch(specs, out, engine, model="demo", progress=False, summary=summary, **kw)


def _no_temporary_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def finished(demo_pipe, tmp_path_factory):
    """A finished batch: 2 prompts x 2 seeds, words red circle square."""
    tmp = tmp_path_factory.mktemp("batch")
    specs = _specs(tmp)
    engine = CountingEngine(demo_pipe)
    result = _run(specs, tmp / "out", engine, words=WORDS, summary=True)
    return specs, tmp / "out", result, engine


def test_batch_writes_each_item_the_index_and_the_summary(finished, demo_pipe):
    specs, out, result, engine = finished
    assert (result.planned, result.skipped, result.ok, result.failed) == (4, 0, 4, [])
    lines = (out / "index.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["id"] for r in records] == engine.ran == [f"{s.id}_s{k}" for s in specs for k in (0, 1)]
    for rec in records:
        assert tuple(rec) == RECORD_FIELDS
        assert rec["status"] == "ok" and rec["complete"] and not rec["nonfinite"] and rec["error"] is None
        assert rec["guidance_scale"] == 7.5 and rec["size"] == [32, 32] and rec["steps"] == 2
        assert rec["image"] == f"items/{rec['id']}/image.png" and rec["maps"] == f"items/{rec['id']}/maps.safetensors"
        with Image.open(out / rec["image"]) as im:
            assert im.size == (32, 32)
        shares = {r["word"]: r["share"] for r in rec["influence"]}
        assert set(shares) == {"a", "red", "circle", "and", "blue", "square"}
        assert 0.99 < sum(shares.values()) <= 1.0 + 1e-12  # fractions of one total, summed in fp64
    # An item is the session's traced generation of its prompt and seed, saved with the project's saver.
    item = specs[1]
    gen = session.run_seed(demo_pipe, item.request, 1)
    saved = load(out / records[3]["maps"])
    assert torch.equal(saved.heat_maps, gen.maps.heat_maps) and saved.meta["seed"] == 1
    assert saved.prompt == PROMPTS[1] and saved.meta["prompt_id"] == item.id
    assert _no_temporary_files(out) and not (out / ".lock").read_text()


def test_summary_aggregates_the_items(finished):
    _, out, result, _ = finished
    summary = json.loads((out / "summary.json").read_text())
    assert tuple(summary) == SUMMARY_FIELDS and summary["command"] == "batch" and summary["words"] == WORDS
    assert summary["items"] == {"planned": 4, "indexed": 4, "ok": 4, "failed": 0, "nonfinite": 0}
    records = list(read_index(out / "index.jsonl").values())
    for word in WORDS:  # the mean and spread of the shares the index records
        shares = [r["share"] for rec in records for r in rec["influence"] if r["word"] == word]
        stats = summary["word_stats"][word]["share"]
        assert stats["n"] == 4 and stats["mean"] == pytest.approx(np.mean(shares), rel=1e-12)
        assert stats["std"] == pytest.approx(np.std(shares), rel=1e-9, abs=1e-15) and stats["max"] == max(shares)
    for prompt in summary["prompts"]:
        maps = [load(out / f"items/{prompt['prompt_id']}_s{k}/maps.safetensors") for k in (0, 1)]
        overlaps = [A.concept_overlap(g, WORDS) for g in maps]
        mean_iou = ((overlaps[0].iou + overlaps[1].iou) / 2).tolist()
        assert np.allclose(prompt["overlap"]["iou"], mean_iou, rtol=1e-12)
        stability = A.seed_sweep(maps, WORDS).stability
        assert prompt["stability"] == pytest.approx(stability)
        pair = prompt["pairs"][0]  # red x circle: its items ranked by IoU
        assert pair["words"] == ["red", "circle"]
        assert [p["iou"] for p in pair["items"]] == sorted((float(o.iou[0, 1]) for o in overlaps), reverse=True)
    top = summary["top_overlaps"]
    assert [t["iou"] for t in top] == sorted((t["iou"] for t in top), reverse=True) and len(top) == 10
    assert set(summary["figures"]) == {
        "influence",
        "top_overlaps",
        *(f"prompts/{p['prompt_id']}" for p in summary["prompts"]),
    }
    for fig in summary["figures"].values():
        with Image.open(out / fig["path"]) as im:
            assert im.size == (fig["width"], fig["height"])


def test_rerun_skips_finished_items_and_redoes_the_rest(finished, demo_pipe, tmp_path):
    specs, out, _, _ = finished
    engine = CountingEngine(demo_pipe)
    assert _run(specs, out, engine, words=WORDS).skipped == 4 and engine.ran == []
    records = read_index(out / "index.jsonl")
    first, last = list(records)[0], list(records)[-1]
    before = (out / records[last]["maps"]).read_bytes()
    (out / records[first]["maps"]).unlink()  # an item whose files are gone is redone
    with open(out / "index.jsonl", "a") as f:
        f.write('{"id": "torn')  # a line cut by a crash is ignored
    result = _run(specs, out, engine, words=WORDS)
    assert engine.ran == [first] and (result.skipped, result.ok) == (3, 1)
    assert (out / records[last]["maps"]).read_bytes() == before  # finished items are not rewritten
    assert list(read_index(out / "index.jsonl")) == list(records)
    assert len((out / "index.jsonl").read_text().splitlines()) == 4  # compacted: one line per item


def test_ctrl_c_loses_only_the_item_in_flight(demo_pipe, tmp_path):
    specs, out = _specs(tmp_path), tmp_path / "out"

    def interrupt(item):
        if item.id.endswith("_s0") and item.spec.id == specs[1].id:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(specs, out, CountingEngine(demo_pipe, interrupt))
    assert list(read_index(out / "index.jsonl")) == [f"{specs[0].id}_s0", f"{specs[0].id}_s1"]
    assert not (out / "items" / f"{specs[1].id}_s0").exists() and _no_temporary_files(out)
    assert main(["analyze", str(out), "--words", "red"]) == 0  # a partial batch has a summary
    assert json.loads((out / "summary.json").read_text())["items"]["ok"] == 2
    engine = CountingEngine(demo_pipe)
    result = _run(specs, out, engine)  # the lock was released
    assert engine.ran == [f"{specs[1].id}_s0", f"{specs[1].id}_s1"] and result.skipped == 2


def test_a_killed_process_loses_only_the_item_in_flight(demo_pipe, tmp_path):
    specs, out = _specs(tmp_path), tmp_path / "out"
    killer = textwrap.dedent(
        f"""
        import os, signal, sys
        from daam_fast import session
        from daam_fast.cli import main
        real, calls = session.run_seed, []
        def run_seed(pipe, request, seed):
            calls.append(seed)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
            return real(pipe, request, seed)
        session.run_seed = run_seed
        sys.exit(main(["batch", {str(tmp_path / "prompts.txt")!r}, "--model", "demo", "--seeds", "0-1",
                       "--steps", "2", "--out", {str(out)!r}, "--threads", "1", "--quiet"]))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", killer], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(read_index(out / "index.jsonl")) == [f"{specs[0].id}_s0", f"{specs[0].id}_s1"]
    assert (out / ".lock").read_text().startswith("pid ")  # the dead process's lock file, never emptied
    engine = CountingEngine(demo_pipe)
    result = _run(specs, out, engine)  # the dead process's lock does not block
    assert engine.ran == [f"{specs[1].id}_s0", f"{specs[1].id}_s1"] and result.skipped == 2
    assert _no_temporary_files(out)


def test_a_second_batch_on_the_same_folder_is_refused(demo_pipe, tmp_path, capsys):
    specs, out = _specs(tmp_path, seeds="0"), tmp_path / "out"
    with BatchDir(out):
        with pytest.raises(BatchLockedError, match=f"another daam-fast batch is writing there \\(pid {os.getpid()} "):
            _run(specs, out, CountingEngine(demo_pipe))
        argv = ["batch", str(tmp_path / "prompts.txt"), "--model", "demo", "--out", str(out), "--quiet"]
        assert main(argv) == 2
        assert "another daam-fast batch is writing there" in capsys.readouterr().err
    (out / ".lock").write_text("pid 4194999 on some-host, since yesterday\n")  # stale: nobody holds it
    assert _run(specs, out, CountingEngine(demo_pipe)).ok == 2


def test_failed_items_are_recorded_the_others_go_on_and_the_exit_code_counts_them(tmp_path, monkeypatch, capsys):
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    argv = ["batch", str(tmp_path / "p.txt"), "--model", "demo", "--seeds", "0-2", "--steps", "2"]
    argv += ["--out", str(tmp_path / "out"), "--threads", "1", "--quiet"]
    real = session.run_seed

    def flaky(pipe, request, seed):
        if seed == 1:
            raise RuntimeError("out of memory (simulated)")
        gen = real(pipe, request, seed)
        if seed == 2:
            gen.maps.heat_maps[0, 0, 0] = float("nan")
        return gen

    monkeypatch.setattr(session, "run_seed", flaky)
    assert main(argv) == BATCH_FAILED + 2
    assert "failed: " in capsys.readouterr().err
    records = read_index(tmp_path / "out" / "index.jsonl")
    ok, oom, nan = records.values()
    assert ok["status"] == "ok" and ok["complete"]
    assert oom["status"] == "failed" and oom["error"] == "RuntimeError: out of memory (simulated)"
    assert oom["image"] is None and not oom["complete"]
    assert nan["status"] == "failed" and nan["nonfinite"] and not nan["complete"] and "non-finite" in nan["error"]
    monkeypatch.setattr(session, "run_seed", real)
    assert main(argv) == 0  # the rerun redoes the failed items only
    assert all(r["status"] == "ok" for r in read_index(tmp_path / "out" / "index.jsonl").values())


def test_settings_a_finished_item_depends_on_must_match(finished, demo_pipe, tmp_path):
    specs, out, _, _ = finished
    with pytest.raises(session.UsageError, match=r"was made with \{'steps': 2\}, this run asks for \{'steps': 3\}"):
        _run(_specs(tmp_path, steps=3), out, CountingEngine(demo_pipe))
    with pytest.raises(session.UsageError, match="holds a batch made with --guidance-scale None, not 2.0"):
        _run(specs, out, CountingEngine(demo_pipe), guidance_scale=2.0)


def test_an_unknown_word_names_the_prompt_and_its_words_before_any_generation(demo_pipe, tmp_path):
    specs, out = _specs(tmp_path, prompts=[PROMPTS[0], "a green triangle"]), tmp_path / "out"
    engine = CountingEngine(demo_pipe)
    with pytest.raises(session.UsageError) as exc:
        _run(specs, out, engine, words=["red"])
    assert "line 2 ('a green triangle'): --words: 'red' is not in the prompt" in str(exc.value)
    assert "'green', 'triangle'" in str(exc.value)
    assert engine.ran == [] and not (out / "items").exists()


def test_model_demo_in_generate(tmp_path):
    out = tmp_path / "gen"
    argv = ["generate", "--model", "demo", "--prompt", PROMPTS[0], "--steps", "1", "--out", str(out)]
    assert main([*argv, "--no-time-profile", "--quiet", "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "demo" and report["size"] == [32, 32]  # the demo model's own size by default
