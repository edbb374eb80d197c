"""The guider interface: pure arithmetic on per-branch model predictions.

A guider's parameters are one frozen pydantic model (``Guider.Params``), validated once when the guider is made;
``config()`` is that model as data. The sampler drives every guider through the same steps, per batch:

1. ``branches(prompt)``: which texts to encode for each prompt;
2. ``prepare(layers, latent_size)``: the guider plans the batch from the denoiser's attention layers and the latent
   grid, and returns the layers whose maps it needs (none: fused attention everywhere). A guider that uses
   attention maps keeps its plan (which maps go where) from this call; ``combine`` refuses to run without it;
3. ``start(context)``: the prompts, token strings and latent size of the batch; per-batch state is reset here;
4. per step, ONE batched model call over all branches, then ``combine(preds, attention, step)``;
5. ``records()``: per-sample records of the finished batch.

A guider never calls the model.

Batch layout used everywhere: branch-major. For B samples and K branches the model batch is
``[branch 0 of samples 0..B-1, branch 1 of samples 0..B-1, ...]``; ``combine`` receives the predictions
reshaped to ``(K, B, C, H, W)`` and captured attention maps as ``(K * B, queries, keys)`` in the same order.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import annotated_types
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from ..errors import InputError
from ..models.base import AttentionLayer  # re-exported: guiders and their users name layers with it

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


@dataclass(frozen=True)
class StepInfo:
    index: int  # 0-based step number
    num_steps: int
    timestep: float


@dataclass
class BatchContext:
    """What a guider may know about the batch it is guiding (set by the sampler before step 0)."""

    prompts: list[str]
    latent_size: tuple[int, int]  # (height, width) of the latent grid
    # Per branch text, the tokenizer's token strings (for token-aware guiders); may be empty.
    tokens: list[list[str]] = field(default_factory=list)


class GuiderParams(BaseModel):
    """Base of every guider's parameters: typed, frozen, and no parameter the guider does not know."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Guider(ABC):
    """Base class for guiders. Subclasses set ``name`` and ``Params`` and implement ``combine``.

    ``Guider(*args, **params)`` validates the parameters into ``self.params`` (positional arguments bind to the
    fields in declaration order, so ``CFG(7.5)`` is ``CFG(scale=7.5)``); a bad value raises InputError. Each
    parameter also reads as an attribute (``guider.scale``).
    """

    name: str = "guider"
    Params: ClassVar[type[GuiderParams]] = GuiderParams

    def __init__(self, *args: Any, **params: Any):
        fields = list(self.Params.model_fields)
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(fields)} positional parameters")
        for key, value in zip(fields, args, strict=False):
            if key in params:
                raise TypeError(f"{type(self).__name__} got parameter {key!r} twice")
            params[key] = value
        self.params = validate_params(self.name, self.Params, params)

    def __getattr__(self, key: str) -> Any:
        # only called when normal lookup fails: parameters read as attributes
        if key != "params" and key in type(self).Params.model_fields and "params" in self.__dict__:
            return getattr(self.params, key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def branches(self, prompt: str) -> list[str]:
        """Texts to encode for one prompt, in branch order. Default: unconditional then conditional."""
        return ["", prompt]

    def prepare(self, layers: Sequence[AttentionLayer], latent_size: tuple[int, int]) -> list[AttentionLayer]:
        """Plan a batch for a denoiser with these attention ``layers`` and a latent grid of ``latent_size``.

        Returns the layers whose maps ``combine`` needs; the sampler captures exactly those. Called once per
        batch, before ``start``. Default: no maps (fused attention everywhere) and nothing to plan.
        """
        return []

    def start(self, context: BatchContext) -> None:
        """Called once per batch before the first step (after ``prepare``); reset per-batch state here."""
        self.context = context

    @abstractmethod
    def combine(self, preds: torch.Tensor, attention: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        """Combine ``preds`` (K, B, C, H, W) into the guided prediction (B, C, H, W)."""

    def records(self) -> list[dict[str, Any]]:
        """Per-sample records for the finished batch (stored with each image). Default: nothing."""
        return [{} for _ in self.context.prompts]

    def config(self) -> dict[str, Any]:
        """Name and every parameter that changes the output (part of the job key and provenance)."""
        return {"name": self.name, **self.params.model_dump()}


def validate_params(guider: str, params_type: type[GuiderParams], params: Mapping[str, Any]) -> GuiderParams:
    """``params_type(**params)``; a bad or unknown parameter raises InputError naming it and what is allowed."""
    try:
        return params_type(**params)
    except ValidationError as err:
        raise InputError(describe_error(guider, params_type, err, params)) from None


def describe_error(
    guider: str, params_type: type[GuiderParams], err: ValidationError, given: Mapping[str, Any]
) -> str:
    """One line for the first problem of ``err``: the field, the value ``given`` and what the field accepts."""
    first = err.errors()[0]
    if not first["loc"]:  # a check across fields (a model validator)
        return f"bad parameters for guidance {guider!r}: {first['msg'].removeprefix('Value error, ')}"
    key = str(first["loc"][0])
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(params_type.model_fields))
        return f"unknown parameter {key!r} for guidance {guider!r}; allowed: {allowed}"
    info = params_type.model_fields[key]
    choices, kinds = _accepted(info.annotation)
    value = given.get(key, first.get("input"))
    if not kinds:
        return f"bad parameter for guidance {guider!r}: {key}={value!r} is not one of: {', '.join(choices)}"
    if first["type"] == "value_error":  # a field validator's own message
        return f"bad parameter for guidance {guider!r}: {key}={value!r}: {first['msg'].removeprefix('Value error, ')}"
    expected = " or ".join([f"{' or '.join(kinds)}{_range(info)}", *choices])
    return f"bad parameter for guidance {guider!r}: {key} must be {expected}, got {value!r}"


_KIND_NAMES = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}


def _accepted(annotation: Any) -> tuple[list[str], list[str]]:
    """The literal choices and the kinds of value (as words) that a field's annotation accepts."""
    choices: list[str] = []
    kinds: list[str] = []
    for arg in _union_members(annotation):
        if typing.get_origin(arg) is Literal:
            choices += [str(c) for c in typing.get_args(arg)]
        elif arg is type(None):
            choices.append("null")
        elif typing.get_origin(arg) is list or arg is list:
            kinds.append("a list")
        elif typing.get_origin(arg) is collections.abc.Callable:
            kinds.append("a function")
        else:
            kinds.append(_KIND_NAMES.get(arg, getattr(arg, "__name__", str(arg))))
    return choices, kinds


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _union_members(a)]
    return [annotation]


def _range(info: FieldInfo) -> str:
    """`` > 0``, `` >= 1`` or `` in [0, 1]`` from a field's numeric constraints."""
    low = high = None  # (bracket, bound)
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge | annotated_types.Gt):
            low = ("[", m.ge) if isinstance(m, annotated_types.Ge) else ("(", m.gt)
        elif isinstance(m, annotated_types.Le | annotated_types.Lt):
            high = ("]", m.le) if isinstance(m, annotated_types.Le) else (")", m.lt)
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""
