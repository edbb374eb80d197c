"""The ``--backend`` flags every command that runs batches of model work shares, and its per-worker summary."""

from __future__ import annotations

from collections.abc import Sequence

import typer
from rich.console import Console

from ..console import message
from ..distributed import Backend, WorkerStats, make_backend

BACKEND = typer.Option("local", "--backend", help="Where batches run: local (this process) or ray (an actor pool "
                       "on a Ray cluster; needs pip install 'diffprobe[ray]').")
ADDRESS = typer.Option(None, "--address", help="Ray cluster to join: auto (the one 'ray start --head' made on this "
                       "machine) or ray://HOST:PORT (default: a new local one).")
WORKERS = typer.Option(None, "--workers", help="Ray actors, each with its own copy of the model (default: one per "
                       "GPU of the cluster, else one per CPU).")
GPUS_PER_WORKER = typer.Option(None, "--gpus-per-worker", help="GPUs each Ray actor holds (default: 1 on a cluster "
                               "with GPUs, else 0).")


def backend_from_flags(backend: str, address: str | None, workers: int | None,
                       gpus_per_worker: float | None) -> Backend:
    return make_backend(backend, address=address, workers=workers, gpus_per_worker=gpus_per_worker)


def is_distributed(stats: Sequence[WorkerStats]) -> bool:
    return len(stats) > 1 or any(s.name != "local" for s in stats)


def print_worker_summary(console: Console, stats: Sequence[WorkerStats], unit: str = "images") -> None:
    """One line per worker of a distributed run: its share of the work and its own throughput."""
    if not is_distributed(stats):
        return
    for s in stats:
        died = " (died; its unfinished batches went to the others)" if s.died else ""
        console.print(message(f"{s.name}: {s.items} {unit} in {s.batches} batch(es), "
                              f"{s.items_per_second:.2f} {unit}/s{died}"), highlight=False)


def print_pool_summaries(console: Console, pools: Sequence[tuple[str, Sequence[WorkerStats]]]) -> None:
    """The per-worker lines of every pool a command started (generation, embedding, judging), under its kind."""
    for kind, stats in pools:
        if is_distributed(stats) and any(s.items for s in stats):
            console.print(message(f"{kind}, per worker:"))
            print_worker_summary(console, stats)
