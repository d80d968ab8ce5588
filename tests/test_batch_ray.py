"""`daam-fast batch --engine ray`: a 2-CPU local Ray, two actors on the demo model; for the same items and seeds
the outputs equal the local engine's (maps bit-equal on the CPU in fp32 at the same thread count)."""

import json

import pytest
import torch
from PIL import Image, ImageChops

from daam_fast import load
from daam_fast.batch import read_index, read_prompts, run_batch
from daam_fast.batch.engine_local import LocalEngine

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'daam_fast[ray]')")

from daam_fast.batch.engine_ray import RayEngine  # noqa: E402

PROMPTS = ["a red circle and a blue square", "a yellow triangle and a green circle"]
# What differs between runs of the same item: the time it took and the process that ran it.
RUN_FIELDS = ("seconds", "worker")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    # Ray actors run 1 torch thread each; CPU kernels sum in another order with another thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same_record(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k not in RUN_FIELDS} == {k: v for k, v in b.items() if k not in RUN_FIELDS}


def test_ray_engine_writes_what_the_local_engine_writes(ray_cluster, one_thread, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    specs = read_prompts(path, seeds="0-1", steps=3, size="32x32")
    kw = dict(model="demo", words=["circle"], progress=False)
    run_batch(specs, tmp_path / "local", LocalEngine("demo", "cpu"), **kw)
    engine = RayEngine("demo", "cpu", workers=2, threads=1)
    result = run_batch(specs, tmp_path / "ray", engine, **kw)
    assert (result.ok, result.failed) == (4, [])
    assert engine.actors == [] and ray.is_initialized()  # actors ended; a Ray it did not start keeps running

    local, remote = read_index(tmp_path / "local" / "index.jsonl"), read_index(tmp_path / "ray" / "index.jsonl")
    assert list(local) == list(remote)  # the index is in plan order whatever order items finished in
    assert len({r["worker"] for r in remote.values()}) == 2  # both actors got items
    for item_id, rec in local.items():
        assert _same_record(rec, remote[item_id]), item_id
        a, b = load(tmp_path / "local" / rec["maps"]), load(tmp_path / "ray" / rec["maps"])
        assert torch.equal(a.heat_maps, b.heat_maps) and a.meta == b.meta and a.positions == b.positions
        with Image.open(tmp_path / "local" / rec["image"]) as x, Image.open(tmp_path / "ray" / rec["image"]) as y:
            assert ImageChops.difference(x.convert("RGB"), y.convert("RGB")).getbbox() is None
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("local", "ray")]
    assert summaries[0]["word_stats"] == summaries[1]["word_stats"]
    assert summaries[0]["prompts"] == summaries[1]["prompts"]


def test_ray_engine_refuses_more_workers_than_the_cluster_has(ray_cluster):
    engine = RayEngine("demo", "cpu", workers=3, threads=1)
    with pytest.raises(ValueError, match="--workers 3 needs 3 CPUs; the Ray cluster has 2"):
        engine.start()
    with pytest.raises(ValueError, match="--device cuda: the Ray cluster has no GPUs"):
        RayEngine("demo", "cuda").start()


class _KillFirstActorOnce:
    """The Ray engine, with its first actor killed (Ray restarts it) as soon as the first item is back."""

    def __init__(self, engine):
        self.engine, self.killed = engine, False

    def start(self):
        self.engine.start()

    def check_words(self, specs, words):
        self.engine.check_words(specs, words)

    def run(self, items):
        for outcome in self.engine.run(items):
            if not self.killed:
                self.killed = True
                ray.kill(self.engine.actors[0], no_restart=False)
            yield outcome

    def close(self):
        self.engine.close()


def test_a_dead_actor_fails_only_its_items_in_flight_and_a_rerun_redoes_them(ray_cluster, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS[0] + "\n")
    specs = read_prompts(path, seeds="0-5", steps=3, size="32x32")
    out = tmp_path / "out"
    run_batch(
        specs,
        out,
        _KillFirstActorOnce(RayEngine("demo", "cpu", workers=2, threads=1)),
        model="demo",
        progress=False,
        summary=False,
    )
    records = read_index(out / "index.jsonl")
    assert len(records) == 6  # every item ran: the others went on, on the other actor and the restarted one
    failed = [r["id"] for r in records.values() if r["status"] == "failed"]
    assert len(failed) <= 2  # at most what was in flight on the killed actor: one running, one queued
    assert all("the Ray worker running it died" in records[i]["error"] for i in failed)
    engine = LocalEngine("demo", "cpu")
    result = run_batch(specs, out, engine, model="demo", progress=False, summary=False)
    assert result.skipped == 6 - len(failed) and result.ok == len(failed)
    assert all(r["status"] == "ok" for r in read_index(out / "index.jsonl").values())
