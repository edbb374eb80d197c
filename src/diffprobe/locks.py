"""One writer per folder: a run directory has one generate driver, a training folder one trainer. POSIX advisory
locks (``flock``), released when the holder closes the file or dies; where flock is unavailable, a single writer is
the user's responsibility."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from .errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def take(file: Path, busy: str) -> BinaryIO | None:
    """Hold the lock ``file`` (created if missing) until the returned file is closed; ``InputError(busy)`` when
    another holder has it. OSError (an unwritable folder) is left to the caller, who knows what the folder is for."""
    if fcntl is None:
        return None
    f = open(file, "ab")  # noqa: SIM115 - held for the writer's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise InputError(busy) from None
    return f


def held(file: Path) -> bool:
    """Whether someone holds the lock ``file``; creates nothing (a missing file was never held)."""
    if fcntl is None or not file.is_file():
        return False
    try:
        with open(file, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
