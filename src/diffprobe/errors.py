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


def exit_on_user_error(main) -> None:
    """Run a module's ``main()`` as the CLI does: a :class:`DiffprobeError` prints its message and exits with 2."""
    import sys

    try:
        main()
    except DiffprobeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
