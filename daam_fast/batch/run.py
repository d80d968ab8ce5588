"""Running a batch: lock the folder, skip finished items, stream the rest through an engine, write, summarise."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .items import PromptSpec, plan_items
from .store import BatchDir
from .summary import summarize

__all__ = ["BatchResult", "make_engine", "run_batch"]

logger = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What a run did: ``planned`` items, ``skipped`` (finished before), ``ok`` and ``failed`` (index records of
    the items that failed in this run), and the ``summary`` (None when not written)."""

    out: Path
    planned: int
    skipped: int
    ok: int = 0
    failed: list[dict] = field(default_factory=list)
    summary: dict | None = None


def make_engine(
    engine: str,
    model: str,
    device: str = "auto",
    *,
    workers: int | None = None,
    address: str | None = None,
    threads: int | None = None,
):
    """The engine named ``engine`` (``local`` or ``ray``); options a local engine cannot use are refused."""
    from ..session import UsageError

    if engine == "local":
        if workers not in (None, 1):
            raise UsageError(f"--workers {workers} needs --engine ray (the local engine runs one pipeline)")
        if address:
            raise UsageError("--ray-address needs --engine ray")
        from .engine_local import LocalEngine

        return LocalEngine(model, device)
    if engine == "ray":
        from .engine_ray import RayEngine

        return RayEngine(model, device, workers=workers, address=address, threads=threads or 1)
    raise UsageError(f"--engine {engine!r}: expected local or ray")


def run_batch(
    specs: Sequence[PromptSpec],
    out: str | Path,
    engine,
    *,
    model: str,
    guidance_scale: float | None = None,
    words: Sequence[str] | None = None,
    progress: bool = True,
    summary: bool = True,
) -> BatchResult:
    """Run every item of ``specs`` (prompt × seed) not finished in ``out`` on ``engine`` and write them.

    Under the folder's lock: the items finished before are skipped (a finished item made from other settings is
    a :class:`~daam_fast.session.UsageError`, as is another model or guidance scale than the folder's); the
    engine starts only when there is something to run and checks ``words`` against every prompt before the first
    generation; each outcome is written as it arrives (a tqdm bar over items unless ``progress=False``); the index
    is compacted at the end, even after Ctrl-C; then the summary (:func:`daam_fast.batch.summary.summarize`) is
    written. ``model`` and ``guidance_scale`` (None: the pipeline's default) are recorded in ``batch.json``.
    """
    from tqdm.auto import tqdm

    items = plan_items(specs)
    order = [i.id for i in items]
    store = BatchDir(out)
    with store:
        store.check_config(model, guidance_scale)
        done = store.done(items)
        todo = [i for i in items if i.id not in done]
        result = BatchResult(store.root, len(items), len(done))
        store.compact(order)
        if todo:
            logger.info("batch: %d item(s) to run, %d finished before", len(todo), len(done))
            try:
                engine.start()
                engine.check_words(specs, words)
                store.write_config(model, guidance_scale, words, planned=len(items))
                bar = tqdm(total=len(todo), desc="items", unit="item", disable=not progress)
                for outcome in engine.run(todo):
                    record = store.write_item(outcome)
                    if record["status"] == "ok":
                        result.ok += 1
                    else:
                        result.failed.append(record)
                        logger.warning("item %s failed: %s", record["id"], record["error"])
                    bar.update(1)
                bar.close()
            finally:
                engine.close()
                store.compact(order)
        if summary:
            result.summary = summarize(store.root, words=words, command="batch")
        if not todo:  # after the summary, which checks the words against the maps
            store.write_config(model, guidance_scale, words, planned=len(items))
    return result
