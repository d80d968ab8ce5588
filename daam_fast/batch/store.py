"""A batch's output folder: the lock, ``batch.json``, ``index.jsonl`` and each item's files.

Layout (paths relative to the folder)::

    .lock                         held (flock) while a batch writes here; says which process holds it
    batch.json                    model, guidance scale and words of the batch (a rerun must match them)
    index.jsonl                   one JSON line per finished item (fields: RECORD_FIELDS)
    items/<id>/image.png          the image
    items/<id>/maps.safetensors   its maps (daam_fast.load); negative_maps.safetensors with a negative prompt

Crash safety: every file is written to a temporary name in its folder, flushed to disk and renamed, so a file
under its final name is whole; an item's index line is appended (and flushed) only after its files. A killed
run therefore loses only the items in flight: on the next run an item counts as done when its last index line
says ``complete`` and its files have the recorded sizes, and the index is rewritten with one line per item
(a torn last line from a crash is dropped). Where an id has several lines, the last one counts.

The lock is an advisory ``flock`` on ``.lock``: the kernel drops it when its process dies, however it dies, so a
lock left by a dead batch (a stale lock: the file names a pid that no longer runs) never blocks a rerun.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from .. import analysis as A
from ..heatmap_file import atomic_write
from ..report import json_safe
from ..session import UsageError
from ..version import __version__
from .items import Item
from .worker import Outcome

__all__ = ["RECORD_FIELDS", "BatchDir", "BatchLockedError", "atomic_write", "dumps", "read_index"]

logger = logging.getLogger(__name__)

#: Keys of each index.jsonl line.
RECORD_FIELDS = (
    "id",
    "prompt_id",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "size",
    "guidance_scale",
    "status",
    "complete",
    "nonfinite",
    "error",
    "image",
    "maps",
    "negative_maps",
    "bytes",
    "influence",
    "seconds",
    "worker",
)
_SETTINGS = ("model", "guidance_scale")


class BatchLockedError(UsageError):
    """Another live batch holds the folder's lock."""


def dumps(obj, indent: int | None = None) -> str:
    """``obj`` as strict JSON (nan / inf as null, any script as itself); one line unless ``indent``."""
    return json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False, indent=indent)


def _influence(maps) -> list[dict]:
    """Every prompt word's share of the attribution, ranked (:func:`daam_fast.analysis.word_influence`)."""
    try:
        ranked = A.word_influence(maps)
    except ValueError:  # a prompt without words (punctuation only)
        return []
    return [{"word": r.word, "share": r.share, "mass": r.mass} for r in ranked]


def read_index(path: Path) -> dict[str, dict]:
    """The last record of each id in ``index.jsonl`` (in order of first appearance); lines that are not JSON
    objects with an ``id`` (a torn last line after a crash) are skipped with a warning."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            logger.warning("%s line %d is not a record (an interrupted write?); ignored", path, number)
            continue
        records[rec["id"]] = rec
    return records


class BatchDir:
    """The output folder ``root`` of a batch. Use as a context manager to hold its lock (raises
    :class:`BatchLockedError` when another live process holds it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index_path = self.root / "index.jsonl"
        self.config_path = self.root / "batch.json"
        self._lock_fd: int | None = None

    # -- lock ------------------------------------------------------------------------------------------------
    def __enter__(self) -> BatchDir:
        try:
            import fcntl
        except ImportError:
            raise UsageError("daam-fast batch needs POSIX file locks (Linux, macOS)") from None
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1000).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise BatchLockedError(
                f"--out {self.root}: another daam-fast batch is writing there ({holder}); wait for it to finish or "
                "use another --out"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise UsageError(f"--out {self.root}: cannot lock the folder ({exc.strerror})") from None
        stale = os.read(fd, 1000).decode("utf-8", "replace").strip()
        if stale:  # the previous holder died (or ended) without anyone else taking over
            logger.info("taking over the lock of %s (%s)", self.root, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, since {time.ctime()}\n".encode(), 0)
        self._lock_fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._lock_fd is not None:
            # Empty the file first: a later batch finding text there knows its writer died holding the lock.
            os.ftruncate(self._lock_fd, 0)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- batch.json ------------------------------------------------------------------------------------------
    def read_config(self) -> dict | None:
        """``batch.json`` as written by :meth:`write_config`, or None when there is none."""
        if not self.config_path.is_file():
            return None
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def check_config(self, model: str, guidance_scale: float | None) -> None:
        """Raise :class:`UsageError` when the folder holds a batch of another model or guidance scale (its items
        would not be comparable with this run's)."""
        old = self.read_config()
        new = {"model": model, "guidance_scale": guidance_scale}
        for key in _SETTINGS if old is not None else ():
            if old.get(key) != new[key]:
                raise UsageError(
                    f"--out {self.root} holds a batch made with --{key.replace('_', '-')} {old.get(key)!r}, not "
                    f"{new[key]!r}: rerun with the same settings or use another --out"
                )

    def write_config(self, model: str, guidance_scale: float | None, words, planned: int) -> None:
        """Write ``batch.json``: the daam_fast version, ``model``, ``guidance_scale`` (as asked; None: the
        pipeline's default), ``words`` (the summary's default) and the ``planned`` items of the last run."""
        self.check_config(model, guidance_scale)
        body = {
            "daam_fast_version": __version__,
            "model": model,
            "guidance_scale": guidance_scale,
            "words": None if words is None else list(words),
            "planned": planned,
        }
        atomic_write(self.config_path, lambda tmp: tmp.write_text(dumps(body) + "\n", encoding="utf-8"))

    # -- index -----------------------------------------------------------------------------------------------
    def records(self) -> dict[str, dict]:
        """The index's last record per id."""
        return read_index(self.index_path)

    def is_complete(self, record: dict | None) -> bool:
        """Whether ``record`` is a finished item whose files are all there with their recorded sizes."""
        if not record or record.get("status") != "ok" or not record.get("complete"):
            return False
        sizes = record.get("bytes") or {}
        for key in ("image", "maps", "negative_maps"):
            rel = record.get(key)
            if rel is None:
                continue
            path = self.root / rel
            if not path.is_file() or path.stat().st_size != sizes.get(key):
                return False
        return record.get("image") is not None and record.get("maps") is not None

    def done(self, items: Iterable[Item]) -> set[str]:
        """Ids of ``items`` already finished here. Raises :class:`UsageError` when a finished item with the same
        id was made from another prompt, seed, negative prompt, steps or size."""
        records = self.records()
        finished = set()
        for item in items:
            rec = records.get(item.id)
            if not self.is_complete(rec):
                continue
            wanted = item.key()
            differs = {k: rec.get(k) for k, v in wanted.items() if rec.get(k) != v}
            if differs:
                raise UsageError(
                    f"--out {self.root}: item {item.id} was made with {differs}, this run asks for "
                    f"{ {k: wanted[k] for k in differs} }: use another --out (or give the prompt another id)"
                )
            finished.add(item.id)
        return finished

    def compact(self, order: Iterable[str] = ()) -> None:
        """Rewrite ``index.jsonl`` with one line per id: ids of ``order`` first (in that order), then the rest."""
        records = self.records()
        if not records and not self.index_path.exists():
            return
        ids = [i for i in order if i in records]
        ids += [i for i in records if i not in set(ids)]
        text = "".join(dumps(records[i]) + "\n" for i in ids)
        atomic_write(self.index_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def append(self, record: dict) -> None:
        """Append ``record`` to ``index.jsonl`` and flush it to disk."""
        with open(self.index_path, "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- items -----------------------------------------------------------------------------------------------
    def write_item(self, outcome: Outcome) -> dict:
        """Write the outcome's files atomically under ``items/<id>/``, append its index record and return it.
        Non-finite maps are written (to look at) but the item is recorded as failed."""
        item, gen = outcome.item, outcome.generation
        r = item.spec.request
        rec = {
            "id": item.id,
            "prompt_id": item.spec.id,
            **item.key(),
            "guidance_scale": outcome.guidance_scale,
            "status": "failed",
            "complete": False,
            "nonfinite": False,
            "error": outcome.error,
            "image": None,
            "maps": None,
            "negative_maps": None,
            "bytes": {},
            "influence": None,
            "seconds": round(outcome.seconds, 4),
            "worker": outcome.worker,
        }
        if gen is not None:
            base = self.root / "items" / item.id
            base.mkdir(parents=True, exist_ok=True)
            rel = f"items/{item.id}"
            rec["bytes"]["image"] = atomic_write(base / "image.png", lambda tmp: gen.image.save(tmp, format="PNG"))
            rec["image"] = f"{rel}/image.png"
            meta = dict(seed=item.seed, prompt_id=item.spec.id, steps=r.steps)
            rec["bytes"]["maps"] = gen.maps.save(base / "maps.safetensors", **meta).stat().st_size
            rec["maps"] = f"{rel}/maps.safetensors"
            finite = bool(gen.maps.heat_maps.isfinite().all())
            if gen.negative_maps is not None:
                neg = gen.negative_maps.save(base / "negative_maps.safetensors", **meta)
                rec["bytes"]["negative_maps"] = neg.stat().st_size
                rec["negative_maps"] = f"{rel}/negative_maps.safetensors"
                finite = finite and bool(gen.negative_maps.heat_maps.isfinite().all())
            rec["influence"] = _influence(gen.maps)
            rec["nonfinite"] = not finite
            if finite:
                rec.update(status="ok", complete=True)
            else:
                rec["error"] = "the maps have non-finite values (nan or inf)"
        self.append(rec)
        return rec
