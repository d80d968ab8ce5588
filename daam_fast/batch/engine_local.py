"""``--engine local``: the items one after another in this process, on one pipeline."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from .. import session
from .items import Item, PromptSpec
from .worker import Outcome, check_words, run_item

__all__ = ["LocalEngine"]


class LocalEngine:
    """Runs items in-process on one pipeline loaded by :func:`daam_fast.session.load_pipeline` (``model``,
    ``device``). ``pipe`` skips loading (a pipeline the caller already has). CPU threads are the caller's
    (``torch.set_num_threads``): a library does not change them."""

    name = "local"

    def __init__(self, model: str, device: str = "auto", *, pipe=None):
        self.model, self.device, self.pipe = model, device, pipe

    def start(self) -> None:
        """Load the pipeline (once)."""
        if self.pipe is None:
            self.pipe = session.load_pipeline(self.model, self.device, quiet=True)

    def check_words(self, specs: Sequence[PromptSpec], words: Sequence[str] | None) -> None:
        """See :func:`daam_fast.batch.worker.check_words`."""
        check_words(self.pipe, specs, words)

    def run(self, items: Iterable[Item]) -> Iterator[Outcome]:
        """Each item's :class:`Outcome`, in order, as it finishes."""
        for item in items:
            yield run_item(self.pipe, item)

    def close(self) -> None:
        """Nothing to release: the pipeline stays with the caller's references."""
