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
