"""Guiders by name. ``make_guider("cfg", scale=7.5)``; each guider's parameters are its ``Params`` model."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import InputError
from .base import AttentionLayer, BatchContext, Guider, GuiderParams, StepInfo
from .cfg import CFG

# name -> "module:Class" (imported lazily so optional dependencies load only when used)
GUIDERS: dict[str, str] = {
    "cfg": "diffprobe.guidance.cfg:CFG",
    "scfg": "diffprobe.guidance.scfg:SCFG",
    "concept": "diffprobe.guidance.concept:ConceptGuidance",
}


def make_guider(name: str, **params: Any) -> Guider:
    """The guider ``name`` with ``params`` (values as the CLI gives them: JSON-parsed or raw strings are coerced);
    an unknown guider or a bad parameter raises InputError naming it and what is allowed."""
    if name not in GUIDERS:
        raise InputError(f"unknown guidance {name!r}; choose one of: {', '.join(GUIDERS)}")
    module, cls = GUIDERS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**params)


__all__ = ["AttentionLayer", "BatchContext", "CFG", "Guider", "GuiderParams", "StepInfo", "make_guider", "GUIDERS"]
