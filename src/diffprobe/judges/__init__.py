"""Compositional judges: ``make_judge(name).judge(image, question) -> Verdict``.

Registered: ``shapes`` (exact judge of the shapes world, :mod:`diffprobe.worlds.shapes.judge`), ``detector``
(open-vocabulary detector with box rules, :mod:`diffprobe.judges.detector`; options: ``detector=MODEL``, ``clip``,
``box_threshold``, ``nms_iou``, ``margin``, ``pairs``, ``device``) and ``vlm`` (a vision-language model behind an
OpenAI-compatible server, :mod:`diffprobe.judges.vlm`; options: the keyword parameters of ``VLMJudge``, ``url``,
``model``, ``templates``, ``parser``, ``temperature``, ...).
Reading free-text answers (strict and ``rrs-substring`` parsers): :mod:`diffprobe.judges.answers`.
Questions from prompts (``question_for``, spatial and question-field prompt files): :mod:`diffprobe.judges.questions`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ..errors import InputError
from .answers import PARSERS, AnswerVerdict, Parser, get_parser, parse_count, parse_yes_no
from .base import Judge, ObjectSpec, Question, Verdict
from .questions import question_for, read_question_prompts, read_spatial_prompts

_REGISTRY: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str, factory: Callable[..., Judge]) -> None:
    """``factory(**options) -> Judge``; options are the judge's own settings (URL, model, thresholds, ...)."""
    _REGISTRY[name] = factory


def _shapes() -> Judge:
    from ..worlds.shapes.judge import ShapesJudge

    return ShapesJudge()


register_judge("shapes", _shapes)


class LazyFactory:
    """A judge factory imported on first use (the detector needs torch and transformers) whose signature is the
    real factory's, so :func:`judge_options` lists the options it takes."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def target(self) -> Callable[..., Judge]:
        import importlib

        return getattr(importlib.import_module(self.module), self.name)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.target())

    def __call__(self, **options: object) -> Judge:
        return self.target()(**options)


register_judge("detector", LazyFactory("diffprobe.judges.detector", "make_detector_judge"))
register_judge("vlm", LazyFactory("diffprobe.judges.vlm", "VLMJudge"))


def make_judge(name: str, **options: object) -> Judge:
    if name not in _REGISTRY:
        raise InputError(f"unknown judge {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


def available_judges() -> list[str]:
    return sorted(_REGISTRY)


def judge_options(name: str) -> frozenset[str] | None:
    """The option names judge ``name``'s factory takes (its keyword parameters); None where it takes any."""
    if name not in _REGISTRY:
        raise InputError(f"unknown judge {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


__all__ = ["PARSERS", "AnswerVerdict", "Judge", "ObjectSpec", "Parser", "Question", "Verdict", "available_judges",
           "LazyFactory", "get_parser", "judge_options", "make_judge", "parse_count", "parse_yes_no", "question_for",
           "read_question_prompts", "read_spatial_prompts", "register_judge"]
