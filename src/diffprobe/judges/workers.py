"""Judging on a distributed backend: a worker that builds the judge once where it runs and judges batches of
encoded image files, so workers need no access to the run directory."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .base import Judge, Question, Verdict


@dataclass(frozen=True)
class JudgeRecipe:
    """What ``make_judge`` was called with: enough for another process to make the same judge."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Judge:
        from . import make_judge

        return make_judge(self.name, **self.options)


class JudgingWorker:
    def __init__(self, recipe: JudgeRecipe):
        self.recipe = recipe
        self.judge: Judge | None = None

    @property
    def kind(self) -> str:
        return f"judging ({self.recipe.name})"

    def __getstate__(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "judge": None}

    def pool_key(self) -> str:
        return repr(self.recipe)

    def setup(self) -> dict[str, Any]:
        self.judge = self.recipe.build()
        return self.judge.identity()

    def run(self, batch: Sequence[tuple[str, bytes, Question]]) -> list[Verdict]:
        """(name, image file bytes, question) per image."""
        assert self.judge is not None, "setup() runs first"
        images = []
        for _, data, _ in batch:
            with Image.open(io.BytesIO(data)) as im:  # as Sample.image() reads the file
                images.append(im.convert("RGB"))
        return self.judge.judge_many(images, [q for _, _, q in batch])
