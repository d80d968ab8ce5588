"""Attribution at dataset scale: many prompts × seeds through the front-end session, on one machine or Ray.

``daam-fast batch PROMPTS --model M --out DIR`` (or :func:`run_batch` from Python) reads the prompts
(:mod:`~daam_fast.batch.items`), runs each item (prompt × seed) as :func:`daam_fast.session.run_seed` on an engine
(:mod:`~daam_fast.batch.engine_local`: in-process; :mod:`~daam_fast.batch.engine_ray`: a pool of Ray actors),
writes every result atomically into ``DIR`` with its line in ``DIR/index.jsonl`` (:mod:`~daam_fast.batch.store`:
resumable, locked) and summarises the dataset (:mod:`~daam_fast.batch.summary`, also ``daam-fast analyze DIR``).
See docs/BATCH.md.
"""

from .items import Item, PromptSpec, plan_items, read_prompts
from .run import BatchResult, make_engine, run_batch
from .store import RECORD_FIELDS, BatchDir, BatchLockedError, read_index
from .summary import SUMMARY_FIELDS, summarize

__all__ = [
    "RECORD_FIELDS",
    "SUMMARY_FIELDS",
    "BatchDir",
    "BatchLockedError",
    "BatchResult",
    "Item",
    "PromptSpec",
    "make_engine",
    "plan_items",
    "read_index",
    "read_prompts",
    "run_batch",
    "summarize",
]
