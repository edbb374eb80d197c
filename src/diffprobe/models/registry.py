"""Built-in models by name: ``load_model("shapes")`` finds its checkpoint folder here.

A provider registers a name with a function that returns the model's local diffusers folder
(``register_model("shapes", shapes.weights_dir)``). The models package must not import the packages that provide
models (the shapes world imports models, not the other way round), so the registry imports the modules listed in
:data:`BUILTIN_PROVIDERS` by name, once, the first time a name is looked up. That keeps ``import diffprobe`` light
(no world is imported until a built-in model is asked for) and needs nothing from the user. Other packages register
their own models by calling :func:`register_model` when they are imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

# Modules that call register_model() when imported; imported by name so that models/ does not depend on them.
BUILTIN_PROVIDERS = ("diffprobe.worlds.shapes",)

_REGISTRY: dict[str, Callable[[], Path]] = {}
_providers_loaded = False


def register_model(name: str, folder: Callable[[], Path]) -> None:
    """Make ``load_model(name)`` load the diffusers folder that ``folder()`` returns (called at load time, so a
    missing folder is reported only when the model is asked for)."""
    _REGISTRY[name] = folder


def _load_providers() -> None:
    global _providers_loaded
    if not _providers_loaded:
        _providers_loaded = True
        for module in BUILTIN_PROVIDERS:
            importlib.import_module(module)


def registered_folder(name: str) -> Callable[[], Path] | None:
    """The folder function registered for ``name``, or None when no model has that name."""
    if name not in _REGISTRY:
        _load_providers()
    return _REGISTRY.get(name)


def available_models() -> list[str]:
    _load_providers()
    return sorted(_REGISTRY)
