"""``--engine ray``: a pool of Ray actors, each holding one pipeline, with items streamed to them.

Why actors and not Ray Data: an item is a few bytes of description and seconds of GPU work on a pipeline that
takes long to load, so what matters is keeping one loaded pipeline per GPU busy and getting each result back as
soon as it is done, with its own success or failure. Actors plus ``ray.wait`` do exactly that: the driver keeps
two items in flight per actor (one running, one queued, so no actor waits on the driver) and writes each result
as it arrives, which is what makes the run resumable item by item and lets one failed item leave the others
alone. Ray Data's ``map_batches`` with an actor pool would schedule the same actors, but its unit of work and
of failure is a block of rows (a failed row fails its block, and the job past ``max_errored_blocks``), results
come back through Arrow tables (PIL images and heat maps as Python objects or bytes), and it needs
``ray[data]`` (pyarrow, pandas). Nothing here needs a dataset abstraction.

Files are written by the driver only (see :mod:`daam_fast.batch.store`): the workers need no shared file system,
only ``daam_fast`` installed and the model reachable (a folder on every node, a hub id, or ``demo``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

from .. import session
from ..session import UsageError
from .items import Item, PromptSpec
from .worker import Outcome, check_words, run_item

__all__ = ["RayEngine", "import_ray"]

logger = logging.getLogger(__name__)

#: Restarts of a dead actor (it reloads its pipeline).
MAX_RESTARTS = 2
#: Items queued per actor beyond the one it runs.
QUEUED_PER_ACTOR = 1
#: An actor whose items failed this many times in a row because it died leaves the pool: one death fails what it
#: had in flight, so this is more than its restarts can explain.
MAX_DEATHS_IN_A_ROW = (MAX_RESTARTS + 1) * (1 + QUEUED_PER_ACTOR)


def import_ray():
    """The ``ray`` module, or a :class:`UsageError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'daam_fast[ray]'") from None
    return ray


class _Worker:
    """The actor: one pipeline in one Ray worker process. Loading errors are kept and reported by :meth:`ready`
    (an exception in an actor's constructor only surfaces as an opaque "actor died")."""

    def __init__(self, model: str, device: str, threads: int):
        import torch

        torch.set_num_threads(threads)  # this process is ours: as many threads as CPUs Ray gave the actor
        self.pipe, self.error = None, None
        try:
            self.pipe = session.load_pipeline(model, device, quiet=True)
        except UsageError as exc:
            self.error = ("usage", str(exc))
        except Exception as exc:
            self.error = ("runtime", f"{type(exc).__name__}: {exc}")

    def ready(self):
        return self.error

    def check_words(self, specs, words):
        try:
            check_words(self.pipe, specs, words)
        except UsageError as exc:
            return str(exc)
        return None

    def run(self, item: Item) -> Outcome:
        return run_item(self.pipe, item)


class RayEngine:
    """Runs items on a pool of Ray actors.

    Args:
        model, device: as :func:`daam_fast.session.load_pipeline`, in each actor. ``auto``: one GPU per actor
            when the cluster has GPUs, else CPU actors; ``cpu``: CPU actors; ``cuda``: GPU actors (refused on a
            cluster without GPUs).
        workers: actors in the pool (default: one per GPU, or CPUs // ``threads`` on CPUs).
        address: a running cluster (``ray.init(address=...)``, e.g. ``auto`` or ``ray://host:10001``); default a
            local Ray started for this run (or the one this process already started). A Ray started here is shut
            down by :meth:`close`.
        threads: torch threads per actor (and CPUs it asks Ray for, on CPUs).
    """

    name = "ray"

    def __init__(self, model: str, device: str = "auto", *, workers: int | None = None, address=None, threads=1):
        if workers is not None and workers < 1:
            raise UsageError(f"--workers {workers}: must be at least 1")
        if threads < 1:
            raise UsageError(f"--threads {threads}: must be at least 1")
        self.model, self.device, self.workers, self.address, self.threads = model, device, workers, address, threads
        self.ray = import_ray()
        self.actors: list = []
        self._started_ray = False
        self._pending: dict = {}

    def start(self) -> None:
        """Start or join Ray and start the actors, each loading its pipeline; raise what the first one that
        failed to load raised (:class:`UsageError` or ``RuntimeError``)."""
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            self._started_ray = True
        total = ray.cluster_resources()
        gpus, cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
        use_gpu = self.device.startswith("cuda") or (self.device == "auto" and gpus > 0)
        if use_gpu:
            if gpus == 0:
                raise UsageError(f"--device {self.device}: the Ray cluster has no GPUs")
            n, have, options = self.workers or gpus, gpus, {"num_gpus": 1, "num_cpus": 1}
            device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES: the actor's GPU is its cuda:0
        else:
            n, have, options = self.workers or max(1, cpus // self.threads), cpus, {"num_cpus": self.threads}
            device = "cpu"
        need = n * (options.get("num_gpus") or options["num_cpus"])
        if need > have:
            what = "GPUs" if use_gpu else "CPUs"
            raise UsageError(f"--workers {n} needs {need} {what}; the Ray cluster has {have}")
        actor = ray.remote(max_restarts=MAX_RESTARTS, **options)(_Worker)
        self.actors = [actor.remote(self.model, device, self.threads) for _ in range(n)]
        logger.info("ray: %d %s actor(s) loading %s", n, "GPU" if use_gpu else "CPU", self.model)
        for error in ray.get([a.ready.remote() for a in self.actors]):
            if error is not None:
                kind, message = error
                raise UsageError(message) if kind == "usage" else RuntimeError(f"a Ray worker failed: {message}")

    def check_words(self, specs: Sequence[PromptSpec], words: Sequence[str] | None) -> None:
        """The words check of :func:`daam_fast.batch.worker.check_words`, run by the first actor."""
        if words is None:
            return
        message = self.ray.get(self.actors[0].check_words.remote(list(specs), list(words)))
        if message:
            raise UsageError(message)

    def run(self, items: Iterable[Item]) -> Iterator[Outcome]:
        """Each item's :class:`Outcome` as it finishes (not in order). An item whose actor died is a failed
        outcome; an actor whose items failed so :data:`MAX_DEATHS_IN_A_ROW` times in a row gets no more items."""
        ray = self.ray
        queue = deque(items)
        deaths = {id(a): 0 for a in self.actors}  # items lost to the actor's death since its last finished item

        def alive(actor) -> bool:
            return deaths[id(actor)] < MAX_DEATHS_IN_A_ROW

        def submit(actor) -> None:
            if queue:
                item = queue.popleft()
                self._pending[actor.run.remote(item)] = (actor, item)

        for actor in self.actors:
            for _ in range(1 + QUEUED_PER_ACTOR):
                submit(actor)
        while self._pending:
            (ref,), _ = ray.wait(list(self._pending), num_returns=1)
            actor, item = self._pending.pop(ref)
            try:
                outcome = ray.get(ref)
                deaths[id(actor)] = 0
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                deaths[id(actor)] += 1
                outcome = Outcome(item, None, f"the Ray worker running it died: {exc}", None, 0.0, "?")
            except ray.exceptions.RayError as exc:
                outcome = Outcome(item, None, f"{type(exc).__name__}: {exc}", None, 0.0, "?")
            if alive(actor):
                submit(actor)
            yield outcome
            if queue and not self._pending and not any(alive(a) for a in self.actors):
                raise RuntimeError(f"every Ray worker died, {len(queue)} item(s) not run; rerun to go on")

    def close(self) -> None:
        """Cancel items still in flight, end the actors, and shut Ray down if this engine started it."""
        ray = self.ray
        self._pending.clear()
        for actor in self.actors:  # its queued and running items end with it
            try:
                ray.kill(actor, no_restart=True)
            except ray.exceptions.RayError as exc:
                logger.debug("ray.kill: %s", exc)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
