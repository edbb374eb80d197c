"""Training records (``training.json``): the chain of runs behind a record and the training examples it consumed.

A run started with ``--init`` stores its parent's record under ``init``, so one record holds the whole chain.
"""

from __future__ import annotations

# The settings that decide what a run trains; a replay reuses a finished run only when all of them agree.
REPLAYED = ("seed", "vae_steps", "unet_steps", "batch", "lr", "warmup", "ema_decay", "partial_captions")
#: Values of settings that records written before the setting existed leave out.
DEFAULTS = {"partial_captions": 0.0}


def chain(record: dict) -> list[dict]:
    """The runs behind a training record, first run first (``--init`` links them)."""
    return (chain(record["init"]) if record.get("init") else []) + [record]


def examples_seen(record: dict | None) -> int:
    """Training examples consumed by phase 2 over a chain of runs (a continuation reads the examples after them)."""
    return sum(run["unet_steps"] * run["batch"] for run in chain(record)) if record else 0


def same_settings(done: dict, run: dict) -> bool:
    """Whether a finished run's record ``done`` was trained with ``run``'s recorded settings."""
    return all(setting(done, key) == setting(run, key) for key in REPLAYED)


def setting(run: dict, key: str):
    """A run's recorded value of ``key``, or the value every run had before ``key`` was recorded."""
    return run.get(key, DEFAULTS.get(key))
