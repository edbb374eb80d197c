"""User-facing errors. The CLI prints their message (no traceback) and exits with code 2."""


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


def exit_on_user_error(main) -> None:
    """Run a command's ``main()``: a :class:`DiffprobeError` prints its message (no traceback) and exits with 2."""
    import sys

    from rich.console import Console

    try:
        main()
    except DiffprobeError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)
