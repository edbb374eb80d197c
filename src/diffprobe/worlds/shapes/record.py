"""Training records (``training.json``): the chain of runs behind a record and the training examples it consumed.

A run started with ``--init`` stores its parent's record under ``init``, so one record holds the whole chain.
"""

from __future__ import annotations

# The settings that decide what a run trains; a replay reuses a finished run only when all of them agree.
REPLAYED = ("seed", "vae_steps", "unet_steps", "batch", "lr", "warmup", "ema_decay")


def chain(record: dict) -> list[dict]:
    """The runs behind a training record, first run first (``--init`` links them)."""
    return (chain(record["init"]) if record.get("init") else []) + [record]


def examples_seen(record: dict | None) -> int:
    """Training examples consumed by phase 2 over a chain of runs (a continuation reads the examples after them)."""
    return sum(run["unet_steps"] * run["batch"] for run in chain(record)) if record else 0


def same_settings(done: dict, run: dict) -> bool:
    """Whether a finished run's record ``done`` was trained with ``run``'s recorded settings."""
    return all(done.get(key) == run[key] for key in REPLAYED)
