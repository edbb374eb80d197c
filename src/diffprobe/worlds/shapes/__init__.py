"""The shapes world: flat shapes on white, a caption grammar, an exact judge and a small diffusion model.

Everything runs offline on a CPU, and the truth is known, so every diffprobe feature has meaningful numbers here.

Scenes and prompts::

    from diffprobe.worlds import shapes
    scene, prompt = shapes.make_scene("eval", "relation", 7)   # deterministic per (split, category, index)
    image = shapes.render(scene)                                # 64x64 PIL image
    suite = shapes.prompts("eval", "count")                     # list[ShapesPrompt]
    prompt.caption, prompt.question, prompt.heldout_combo, prompt.heldout_phrasing

Categories: ``single``, ``count``, ``binding``, ``relation`` (:data:`CATEGORIES`); splits ``train`` and ``eval``.
``train`` never shows :data:`HELDOUT_COMBOS` or the held-out phrasings; ``eval`` mixes them in and flags them.

Judging (pixels only; works on any resolution and on imperfect images)::

    from diffprobe.judges import make_judge
    judge = make_judge("shapes")
    verdict = judge.judge(image, prompt.question)   # Verdict(correct: bool, answer: str, reason: str)
    shapes.detect(image)                            # list[Detection]: colour, kind, size, x, y, area, fill

Questions are :class:`diffprobe.judges.Question` records (``count``, ``attribute``, ``relation``); build your own with
``Question("count", (ObjectSpec("circle", "red"),), count=3)``.

The model: ``weights_dir()`` is the shipped Stable-Diffusion-style diffusers folder that ``load_model("shapes")``
and ``diffprobe generate --model shapes`` use. ``python -m diffprobe.worlds.shapes.train`` retrains it;
``python -m diffprobe.worlds.shapes.evaluate`` measures it with the judge (see MODEL_CARD.md).
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ModelNotFoundError
from ...models.registry import register_model
from .grammar import CATEGORIES, HELDOUT_COMBOS, SPLITS, ShapesPrompt, make_scene, prompts, training_example
from .judge import Detection, ShapesJudge, detect
from .render import COLORS, SHAPES, SIZES, Scene, Shape, render, render_tensor

_WEIGHTS = Path(__file__).resolve().parent / "weights"


def weights_dir() -> Path:
    """The shipped diffusers folder of the shapes model."""
    if not (_WEIGHTS / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the shapes model weights are missing from {_WEIGHTS}; reinstall diffprobe with its package data, "
            "or train them with `python -m diffprobe.worlds.shapes.train --out DIR` and pass --model DIR/weights"
        )
    return _WEIGHTS


register_model("shapes", weights_dir)  # load_model("shapes") and --model shapes

__all__ = [
    "CATEGORIES", "COLORS", "HELDOUT_COMBOS", "SHAPES", "SIZES", "SPLITS", "Detection", "Scene", "Shape",
    "ShapesJudge", "ShapesPrompt", "detect", "make_scene", "prompts", "render", "render_tensor", "training_example",
    "weights_dir",
]
