"""``loss.csv``: one row per ``every`` optimisation steps, and a progress line per row."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

HEADER = ["phase", "step", "loss", "elapsed_s"]


class LossLog:
    """``loss.csv`` (phase, step, mean loss over the last ``every`` steps, elapsed seconds) and a progress line per row.

    Losses are summed on the device and read back only when a row is written: no GPU sync per step.
    ``quiet`` writes the rows without printing them (a process other than the main one, or a command with its own
    progress display).
    """

    def __init__(self, path: Path, every: int, quiet: bool = False):
        self.path, self.every, self.quiet, self.t0 = Path(path), every, quiet, time.time()
        self.file = open(self.path, "w", newline="")  # noqa: SIM115 - closed by close()
        self.writer = csv.writer(self.file)
        self.writer.writerow(HEADER)
        self.phase, self.running = "", 0.0

    @classmethod
    def resume(cls, path: Path, every: int, phase: str, step: int, running: float, elapsed: float,
               quiet: bool = False) -> LossLog:
        """Continue ``path`` after a checkpoint at ``step`` of ``phase``: rows written after that checkpoint (by a
        run that was killed later) are dropped, the partial sum and the clock continue from the checkpoint."""
        rows = []
        if Path(path).is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r["phase"] != phase or int(r["step"]) <= step]
        log = cls(path, every, quiet)
        for r in rows:
            log.writer.writerow([r[k] for k in HEADER])
        log.file.flush()
        log.phase, log.running, log.t0 = phase, running, time.time() - elapsed
        return log

    def add(self, phase: str, step: int, loss: torch.Tensor) -> None:
        if phase != self.phase:  # a row never mixes the losses of two phases
            self.phase, self.running = phase, 0.0
        self.running += loss.detach()
        if step % self.every == 0:
            mean, elapsed = float(self.running) / self.every, self.elapsed()
            self.writer.writerow([phase, step, f"{mean:.6f}", f"{elapsed:.1f}"])
            self.file.flush()
            if not self.quiet:
                print(f"{phase} {step}: {mean:.5f} ({elapsed:.0f}s)", flush=True)
            self.running = 0.0

    def partial_sum(self) -> float:
        """The losses summed since the last row (checkpointed, so a resumed run writes the same rows)."""
        return float(self.running)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def close(self) -> None:
        self.file.close()


def read_loss_csv(path: Path) -> list[dict]:
    """The rows of a ``loss.csv`` as dicts with ``step`` int and ``loss`` float."""
    with open(path, newline="") as f:
        return [{**r, "step": int(r["step"]), "loss": float(r["loss"])} for r in csv.DictReader(f)]
