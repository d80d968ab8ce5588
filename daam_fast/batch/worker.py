"""What an engine does with one item: the session's traced generation, its failure caught as a message.

Both engines call :func:`run_item` (in-process, or inside a Ray actor) and hand the :class:`Outcome` to the
driver, which alone writes files: Ray workers need no shared file system, and the local and Ray engines write
the same bytes through the same code.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .. import session
from ..generation import Generation
from .items import Item, PromptSpec

__all__ = ["Outcome", "check_words", "run_item", "worker_name"]

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """The result of one item: ``generation`` (image and maps, maps on the CPU) or ``error`` (a one-line
    message), with the guidance scale the pipeline ran with, the ``seconds`` it took and the ``worker`` (host:pid
    of the process) that ran it."""

    item: Item
    generation: Generation | None
    error: str | None
    guidance_scale: float | None
    seconds: float
    worker: str


def worker_name() -> str:
    """``host:pid`` of this process, recorded with each item (which Ray worker ran it)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _to_cpu(gen: Generation) -> Generation:
    # Maps traced on a GPU go to the driver (another process, maybe a machine without a GPU) as CPU tensors.
    for gm in (gen.maps, gen.negative_maps):
        if gm is not None:
            gm.heat_maps = gm.heat_maps.detach().cpu()
    return gen


def run_item(pipe, item: Item) -> Outcome:
    """Run ``item`` on ``pipe`` through :func:`daam_fast.session.run_seed`. An exception (other than
    ``KeyboardInterrupt`` / ``SystemExit``) becomes the outcome's ``error`` (``"TypeName: message"``) so the other
    items go on; its traceback goes to the log at DEBUG."""
    request = item.spec.request
    guidance = session.pipe_kwargs(pipe, request).get("guidance_scale")
    start = time.perf_counter()
    try:
        gen = _to_cpu(session.run_seed(pipe, request, item.seed))
        error = None
    except Exception as exc:
        logger.debug("item %s failed", item.id, exc_info=True)
        gen, error = None, f"{type(exc).__name__}: {exc}"
    return Outcome(item, gen, error, guidance, time.perf_counter() - start, worker_name())


def check_words(pipe, specs: Sequence[PromptSpec], words: Sequence[str] | None) -> None:
    """Raise :class:`~daam_fast.session.UsageError` when a word of ``words`` is not in every prompt; the message
    names the prompt's line and its words. Runs before any generation."""
    if words is None:
        return
    for spec in specs:
        try:
            session.check_words(pipe, spec.request.prompt, words)
        except session.UsageError as exc:
            raise session.UsageError(f"line {spec.line} ({spec.request.prompt!r}): {exc}") from None
