"""The backend interface and the in-process backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Worker(Protocol):
    """Made on the driver and sent (pickled) to every worker process, where ``setup`` runs once (load the model)
    and ``run`` processes one batch. ``setup`` returns a small description for the driver (``Pool.info``)."""

    def setup(self) -> Any: ...

    def run(self, batch: Any) -> Any: ...


@dataclass
class WorkerStats:
    name: str
    batches: int = 0
    items: int = 0
    seconds: float = 0.0  # time spent in ``Worker.run``
    died: bool = False

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Finished:
    index: int  # position of the batch in the list given to ``imap_unordered``
    result: Any
    worker: str


class Pool(Protocol):
    info: Any
    stats: list[WorkerStats]

    def imap_unordered(self, batches: Sequence[Any], *, size: Callable[[Any], int] = len,
                       describe: Callable[[Any], str] = repr) -> Iterator[Finished]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def start(self, worker: Worker) -> Pool: ...


class LocalPool:
    """Runs every batch in this process, in order, one at a time (lazily: the caller's work on one result overlaps
    nothing, and an interrupt stops before the next batch)."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.info = worker.setup()
        self.stats = [WorkerStats("local")]

    def imap_unordered(self, batches: Sequence[Any], *, size: Callable[[Any], int] = len,
                       describe: Callable[[Any], str] = repr) -> Iterator[Finished]:
        stats = self.stats[0]
        for index, batch in enumerate(batches):
            start = time.perf_counter()
            result = self.worker.run(batch)
            stats.seconds += time.perf_counter() - start
            stats.batches += 1
            stats.items += size(batch)
            yield Finished(index, result, stats.name)

    def close(self) -> None:
        pass


class LocalBackend:
    name = "local"

    def start(self, worker: Worker) -> LocalPool:
        return LocalPool(worker)


def worker_kind(worker: Worker) -> str:
    """What a worker does, for summaries (``generation (MODEL)``, ``embedding (EMBEDDER)``, ``judging (JUDGE)``)."""
    return str(getattr(worker, "kind", type(worker).__name__))


class KeptPool:
    """A started pool lent to one caller: ``close`` hands it back to its :class:`ReusePools` instead of stopping it.
    A stream left before its end (an error, an interrupt) stops the pool, since its workers may still hold batches."""

    def __init__(self, owner: ReusePools, pool: Pool):
        self.owner = owner
        self.pool = pool
        self.info = pool.info
        self.stats = pool.stats

    def imap_unordered(self, batches: Sequence[Any], *, size: Callable[[Any], int] = len,
                       describe: Callable[[Any], str] = repr) -> Iterator[Finished]:
        finished = False
        try:
            yield from self.pool.imap_unordered(batches, size=size, describe=describe)
            finished = True
        finally:
            if not finished:
                self.owner.release(self.pool)

    def close(self) -> None:
        pass


class ReusePools:
    """A backend that keeps the pool it started for the next start of the same work (workers with equal
    ``pool_key()``), so a command made of several steps (an audit's arms, a reference and a sample set) loads each
    model once. It holds one pool at a time: starting other work stops the pool before, which frees its CPUs and
    GPUs for the next one. It remembers the kind and the per-worker stats of every pool it started (not the pool:
    a stopped pool's model is freed)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = backend.name
        self.current: tuple[str, Pool] | None = None
        self.started: list[tuple[str, list[WorkerStats]]] = []

    def start(self, worker: Worker) -> Pool:
        key_of = getattr(worker, "pool_key", None)
        key = key_of() if key_of is not None else None
        if key is not None and self.current is not None and self.current[0] == key:
            return KeptPool(self, self.current[1])
        self.release()
        pool = self.backend.start(worker)
        self.started.append((worker_kind(worker), pool.stats))
        if key is None:
            return pool
        self.current = (key, pool)
        return KeptPool(self, pool)

    def worker_stats(self) -> list[tuple[str, list[WorkerStats]]]:
        """(kind, per-worker stats) of every pool started, in order."""
        return [(kind, list(stats)) for kind, stats in self.started]

    def release(self, pool: Pool | None = None) -> None:
        """Stop the kept pool (only if it is ``pool``, when given)."""
        if self.current is not None and (pool is None or self.current[1] is pool):
            _, kept = self.current
            self.current = None
            kept.close()

    def close(self) -> None:
        self.release()

    def __enter__(self) -> ReusePools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
