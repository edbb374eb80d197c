"""The Ray backend: an actor pool in which every actor builds its worker once, and a pull loop on the driver that
hands each idle actor the next batch, streams results back in the order they finish, and sends the batches of an
actor that died to the others (a bounded number of times)."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..errors import DiffprobeError, InputError, WorkerError
from .pool import Finished, Worker, WorkerStats

IN_FLIGHT = 2  # batches queued per actor: one runs while the next one's arguments travel
MAX_ATTEMPTS = 3  # a batch whose actor dies is tried on at most this many actors in all
START_TIMEOUT = 900.0  # seconds for every actor to load its model (hub downloads included)


class WorkerActor:
    """What runs inside one Ray actor: the worker, built once, and a timer around each batch."""

    def __init__(self, worker: Worker, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker = worker

    def setup(self) -> Any:
        return self.worker.setup()

    def run(self, batch: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        result = self.worker.run(batch)
        return result, time.perf_counter() - start

    def pid(self) -> int:
        return os.getpid()


def failure(err: BaseException, where: str) -> DiffprobeError:
    """The error a worker raised, without Ray's wrapping: a user error keeps its type (the CLI prints it), anything
    else becomes a WorkerError that names where it happened and what the worker said."""
    cause = getattr(err, "cause", None) if isinstance(err, RayTaskError) else None
    if isinstance(cause, DiffprobeError):
        return cause
    if cause is not None:
        return WorkerError(f"{where} failed: {type(cause).__name__}: {cause}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return WorkerError(f"{where} failed: {first}")


class RayPool:
    def __init__(self, worker: Worker, *, workers: int, cpus: float, gpus: float, threads: int | None,
                 start_timeout: float = START_TIMEOUT, max_attempts: int = MAX_ATTEMPTS, in_flight: int = IN_FLIGHT):
        self.max_attempts = max_attempts
        self.in_flight = in_flight
        actor_class = ray.remote(WorkerActor)
        self.actors = [actor_class.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0)
                       .remote(worker, threads) for _ in range(workers)]
        self.stats = [WorkerStats(f"ray-{i}") for i in range(workers)]
        self.alive = set(range(workers))
        self.retries = 0  # batches sent again because their actor died
        try:
            self.info = self._setup(start_timeout)
        except BaseException:
            self.close()
            raise

    def _setup(self, timeout: float) -> Any:
        """Every actor's ``setup()``; the first failure fails the start at once (the others are not waited for)."""
        pending = {actor.setup.remote(): i for i, actor in enumerate(self.actors)}
        deadline = time.monotonic() + timeout
        info = None
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise WorkerError(f"{len(pending)} of {len(self.actors)} Ray worker(s) did not start within "
                                  f"{timeout:.0f} s (the cluster has {ray.cluster_resources()}); ask for fewer "
                                  "--workers or --gpus-per-worker")
            index = pending.pop(ready[0])
            try:
                got = ray.get(ready[0])
            except (RayTaskError, RayActorError) as err:
                raise failure(err, f"Ray worker {index} while loading") from None
            info = got if info is None else info
        return info

    def imap_unordered(self, batches: Sequence[Any], *, size: Callable[[Any], int] = len,
                       describe: Callable[[Any], str] = repr) -> Iterator[Finished]:
        queue: deque[tuple[int, int]] = deque((i, 1) for i in range(len(batches)))  # (batch, attempt)
        running: dict[Any, tuple[int, int, int]] = {}  # ref -> (actor, batch, attempt)
        load = [0] * len(self.actors)

        def fill(actor: int | None = None) -> None:
            for a in [actor] if actor is not None else sorted(self.alive, key=load.__getitem__):
                while a in self.alive and load[a] < self.in_flight and queue:
                    index, attempt = queue.popleft()
                    running[self.actors[a].run.remote(batches[index])] = (a, index, attempt)
                    load[a] += 1

        if queue and not self.alive:  # a pool used again after losing every actor
            raise WorkerError(f"every Ray worker of this pool has died; {len(queue)} batch(es) are left, starting "
                              f"with {describe(batches[0])}; run the same command to resume")
        fill()
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, index, attempt = running.pop(ready[0])
            load[actor] -= 1
            try:
                result, seconds = ray.get(ready[0])
            except RayActorError as err:
                self._lost(actor)
                if attempt >= self.max_attempts:
                    raise WorkerError(f"{describe(batches[index])}: its Ray worker died {attempt} times while "
                                      f"running it ({failure(err, 'the last one')}); finished results are kept, "
                                      "run the same command to retry") from None
                queue.appendleft((index, attempt + 1))
                self.retries += 1
                fill()
                if not running:
                    raise WorkerError(f"every Ray worker died; {len(queue)} batch(es) are left, starting with "
                                      f"{describe(batches[queue[0][0]])}; finished results are kept, run the same "
                                      "command to resume") from None
                continue
            except RayTaskError as err:
                raise failure(err, f"Ray worker {actor} on {describe(batches[index])}") from None
            stats = self.stats[actor]
            stats.batches += 1
            stats.items += size(batches[index])
            stats.seconds += seconds
            fill(actor)  # the actor gets its next batch before the driver spends time on this result
            yield Finished(index, result, stats.name)

    def _lost(self, actor: int) -> None:
        if actor in self.alive:
            self.alive.discard(actor)
            self.stats[actor].died = True

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.alive.clear()


class RayBackend:
    """Runs batches on Ray actors: ``workers`` actors (default: one per GPU of the cluster, or one per CPU on a
    cluster without GPUs), each with ``gpus_per_worker`` GPUs and ``threads_per_worker`` torch threads."""

    name = "ray"

    def __init__(self, *, address: str | None = None, workers: int | None = None, gpus_per_worker: float = 0.0,
                 threads_per_worker: int | None = None, start_timeout: float = START_TIMEOUT,
                 max_attempts: int = MAX_ATTEMPTS):
        if workers is not None and workers < 1:
            raise InputError(f"--workers must be at least 1 (got {workers})")
        if gpus_per_worker < 0:
            raise InputError(f"--gpus-per-worker cannot be negative (got {gpus_per_worker})")
        self.address = address
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.threads_per_worker = threads_per_worker
        self.start_timeout = start_timeout
        self.max_attempts = max_attempts
        self.started_ray = False
        self.pool: RayPool | None = None  # the most recent pool (for inspection)

    def connect(self) -> None:
        if ray.is_initialized():
            return
        try:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, logging_level="warning")
        except ConnectionError as err:
            raise InputError(f"cannot reach a Ray cluster at --address {self.address}: {err}; start one with "
                             "'ray start --head' or leave --address unset for a local one") from None
        self.started_ray = True

    def start(self, worker: Worker) -> RayPool:
        self.connect()
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        per_gpu = self.gpus_per_worker or (1.0 if gpus and self.workers is None else 0.0)
        workers = self.workers or (int(gpus // per_gpu) if per_gpu else int(cpus)) or 1
        per_cpu = 1.0
        if workers * per_gpu > gpus or workers * per_cpu > cpus:
            raise InputError(f"{workers} worker(s) with {per_gpu:g} GPU(s) and {per_cpu:g} CPU each do not fit the "
                             f"Ray cluster ({cpus:g} CPUs, {gpus:g} GPUs); ask for fewer --workers or "
                             "--gpus-per-worker")
        self.pool = RayPool(worker, workers=workers, cpus=per_cpu, gpus=per_gpu,
                            threads=self.threads_per_worker or int(per_cpu),
                            start_timeout=self.start_timeout, max_attempts=self.max_attempts)
        return self.pool

    def shutdown(self) -> None:
        """Stop the local Ray instance this backend started (a cluster it connected to keeps running)."""
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False
