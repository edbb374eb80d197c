"""Compositional judges: ``make_judge(name).judge(image, question) -> Verdict``.

Registered: ``shapes`` (exact judge of the shapes world, :mod:`diffprobe.worlds.shapes.judge`) and ``detector``
(open-vocabulary detector with box rules, :mod:`diffprobe.judges.detector`; options: ``detector=MODEL``, ``clip``,
``box_threshold``, ``nms_iou``, ``margin``, ``pairs``, ``device``).
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


def _detector(**options: object) -> Judge:
    from .detector import make_detector_judge

    return make_detector_judge(**options)  # type: ignore[arg-type]


register_judge("detector", _detector)


def make_judge(name: str, **options: object) -> Judge:
    """The judge registered as ``name``; its ``recipe`` lets a worker of a distributed backend make the same one."""
    from .workers import JudgeRecipe

    if name not in _REGISTRY:
        raise InputError(f"unknown judge {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    judge = _REGISTRY[name](**options)
    judge.recipe = JudgeRecipe(name, dict(options))
    return judge


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
           "get_parser", "judge_options", "make_judge", "parse_count", "parse_yes_no", "question_for",
           "read_question_prompts", "read_spatial_prompts", "register_judge"]
