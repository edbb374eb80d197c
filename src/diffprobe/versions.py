"""Library versions, collected in one place for what records them: every generated image (its provenance), every
metric result and ``diffprobe doctor``. Each caller names the packages it records."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed); diffprobe's own is the
    running source's ``__version__``, which a source checkout on ``PYTHONPATH`` may not have installed."""
    if name == "diffprobe":
        from . import __version__

        return __version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions(packages: Iterable[str], *, python: bool = False) -> dict[str, str | None]:
    """``{package: version}`` in the given order, plus ``"python"`` when asked for."""
    out = {name: package_version(name) for name in packages}
    if python:
        out["python"] = platform.python_version()
    return out
