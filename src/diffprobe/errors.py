"""User-facing errors. The CLI prints their message (no traceback) and exits with code 2."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


class DiffprobeError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


class ModelNotFoundError(DiffprobeError):
    """Unknown model name, or weights not available (offline, missing folder)."""


class InputError(DiffprobeError):
    """Malformed input: prompt files, seed ranges, image folders, options."""


class ResolutionError(DiffprobeError):
    """Height/width not compatible with the model."""


class RunMismatchError(DiffprobeError):
    """An existing run directory was made with a different spec."""


class StorageError(DiffprobeError):
    """The disk is full or read-only, or a file cannot be written."""


class WorkerError(DiffprobeError):
    """A worker of a distributed backend failed (could not load its model, or died too often); finished work is
    kept."""


def print_user_error(err: DiffprobeError) -> None:
    """One line on stderr: ``error: <message>`` (the message is plain text, never read as rich markup)."""
    from rich.console import Console

    from .console import message

    Console(stderr=True, soft_wrap=True).print(message(str(err), "error:", "bold red"))


def exit_on_user_error(main) -> None:
    """Run a command's ``main()``: a :class:`DiffprobeError` prints its message (no traceback) and exits with 2."""
    import sys

    try:
        main()
    except DiffprobeError as err:
        print_user_error(err)
        sys.exit(2)


# --- output paths -------------------------------------------------------------------------------------------


def cannot_write(path: str | Path, reason: str) -> InputError:
    return InputError(f"cannot write {path} ({reason}); choose another output path")


def check_writable(path: str | Path, *, directory: bool = False) -> Path:
    """Check, before any work, that the file ``path`` (a folder with ``directory``) can be created or replaced:
    raises InputError "cannot write PATH (reason)" when a file stands where a folder is needed (or the other way
    round), or its nearest existing folder refuses new entries (/proc, read-only, no permission). Leaves nothing
    behind."""
    path = Path(path)
    if "\0" in str(path):
        raise cannot_write(repr(str(path)), "a path cannot hold a NUL character")
    if directory and path.exists() and not path.is_dir():
        raise cannot_write(path, "it is a file, and a folder is needed")
    if not directory and path.is_dir():
        raise cannot_write(path, "it is a directory; give a file name")
    folder = path if directory else path.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise cannot_write(path, f"{folder} is not a directory")
    try:  # the only reliable test of "may create entries here" (os.access is wrong for root and for /proc)
        Path(tempfile.mkdtemp(prefix=".diffprobe-probe-", dir=folder)).rmdir()
    except OSError as err:
        raise cannot_write(path, err.strerror or str(err)) from None
    return path


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """Around code that writes the file ``path``: checks it first (``check_writable``), makes its folder, and turns
    an OSError while writing into InputError "cannot write PATH (reason)"."""
    path = check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
    except OSError as err:
        raise cannot_write(path, err.strerror or str(err)) from None
