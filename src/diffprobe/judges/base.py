"""The judge interface: ``judge(image, question) -> Verdict(correct, answer, reason)``.

A :class:`Question` is structured, so every judge (exact shapes judge, detector, VLM) checks the same thing:

* ``count``     -- ``objects[0]`` appears exactly ``count`` times ("three red circles"; "a red circle" is count 1)
* ``attribute`` -- every object in ``objects`` appears with its attributes ("a blue square and a yellow triangle")
* ``relation``  -- some ``objects[0]`` stands in ``relation`` (left_of, right_of, above, below) to some ``objects[1]``
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

QuestionKind = Literal["count", "attribute", "relation"]
RELATION_WORDS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class ObjectSpec:
    """An object: a noun with optional colour and size; ``None`` means "any". ``plural`` is the noun's plural
    where the prompt's source knows it (Comp90 object files list it: "mouse, a mouse, mice"); judges that ask in
    words read it through :func:`diffprobe.judges.questions.plural_of`."""

    noun: str
    color: str | None = None
    size: str | None = None
    plural: str | None = None

    def __str__(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.noun) if w)


@dataclass(frozen=True)
class Question:
    kind: QuestionKind
    objects: tuple[ObjectSpec, ...]
    count: int | None = None
    relation: str | None = None
    text: str = ""  # the caption it came from, for reports

    def __post_init__(self) -> None:
        from ..errors import InputError

        need = {"count": 1, "attribute": 1, "relation": 2}.get(self.kind)
        if need is None:
            raise InputError(f"unknown question kind {self.kind!r}; use count, attribute or relation")
        if len(self.objects) < need or (self.kind != "attribute" and len(self.objects) != need):
            raise InputError(f"a {self.kind} question needs {need} object(s), got {len(self.objects)}")
        if self.kind == "count" and (self.count is None or self.count < 0):
            raise InputError("a count question needs a non-negative count")
        if self.kind == "relation" and self.relation not in RELATION_WORDS:
            raise InputError(f"unknown relation {self.relation!r}; use one of {', '.join(RELATION_WORDS)}")


@dataclass(frozen=True)
class Verdict:
    correct: bool | None  # None: the judge answered but its answer did not parse ("unparsed", never counted wrong)
    answer: str  # what the judge saw, short ("2 red circles")
    reason: str  # a sentence a person can check against the image
    raw: str | None = None  # the judge's full response, for judges that answer in free text (VLMs)


class Judge(ABC):
    name: str

    @abstractmethod
    def judge(self, image: Image.Image, question: Question) -> Verdict: ...

    def identity(self) -> dict[str, Any]:
        """What keys this judge's stored verdicts: a judge whose answers could differ (another model, prompt
        template, answer parser or decoding parameters) must return a different identity. Default: its name."""
        return {"name": self.name}

    def check(self) -> None:
        """Fail early, before any work, when the judge cannot answer (a server that is down). Default: nothing."""
        return None

    def close(self) -> None:
        """Release what the judge holds (connections, models). Default: nothing."""
        return None

    def supports(self, question: Question) -> str | None:
        """Why this judge cannot judge ``question`` (a detector without a CLIP cannot read colours), or None when it
        can. ``diffprobe judge`` skips such questions with this reason; it never counts them as wrong."""
        return None

    def judge_many(self, images: list[Image.Image], questions: list[Question]) -> list[Verdict]:
        from ..errors import InputError

        if len(images) != len(questions):
            raise InputError(f"{len(images)} images but {len(questions)} questions")
        return [self.judge(im, q) for im, q in zip(images, questions, strict=True)]
