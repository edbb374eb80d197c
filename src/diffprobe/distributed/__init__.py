"""Backends: where batches of work run. The local backend runs them in this process; the Ray backend runs them on
an actor pool in which each actor builds its worker (loads its model) once. Either way the caller gets the results
back and is the only one that writes the run store.

A command hands a backend a :class:`Worker` (a small picklable object: what to load, and how to process one
batch) and the list of batches; it iterates the results as they finish::

    pool = backend.start(worker)          # worker.setup() runs once per process; pool.info is what it returned
    try:
        for done in pool.imap_unordered(batches):
            store.add(...done.result...)  # done.index says which batch
    finally:
        pool.close()
"""

from __future__ import annotations

from ..errors import InputError
from .pool import Backend, Finished, LocalBackend, Pool, ReusePools, Worker, WorkerStats, worker_kind

BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install 'diffprobe[ray]'"

__all__ = ["BACKENDS", "Backend", "Finished", "LocalBackend", "Pool", "ReusePools", "Worker", "WorkerStats",
           "make_backend", "worker_kind"]


def make_backend(name: str = "local", *, address: str | None = None, workers: int | None = None,
                 gpus_per_worker: float | None = None, threads_per_worker: int | None = None) -> Backend:
    """The backend the ``--backend`` flags describe (``local`` by default; ``ray`` needs the ``ray`` extra)."""
    if name not in BACKENDS:
        raise InputError(f"unknown --backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "local":
        given = [flag for flag, value in (("--address", address), ("--workers", workers),
                                          ("--gpus-per-worker", gpus_per_worker)) if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply to --backend ray")
        return LocalBackend()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise InputError(f"--backend ray needs Ray, which is not installed; install it with {RAY_INSTALL}") from None
    from .raypool import RayBackend

    return RayBackend(address=address, workers=workers, gpus_per_worker=gpus_per_worker or 0.0,
                      threads_per_worker=threads_per_worker)
