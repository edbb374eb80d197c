"""Caption grammar, scene sampler and prompt suites of the shapes world.

Four categories, modelled on the compositional benchmarks:

* ``single``   -- "a red circle" (colour + kind; optional size word "small"/"big")
* ``count``    -- "three red circles" (2-6 shapes of one colour and kind)
* ``binding``  -- "a blue square and a yellow triangle" (CC-500 style: two objects, different colours and kinds)
* ``relation`` -- "a green circle to the left of a red square" (Comp90 style: left/right/above/below)

Splits. ``train`` never shows the held-out colour-shape combinations (:data:`HELDOUT_COMBOS`) nor the held-out
phrasings (templates marked ``heldout``; all their words occur in training captions elsewhere). ``eval`` draws from
every combination and phrasing, and flags each prompt so results can be split by seen/unseen.

Everything is a pure function of ``(split, category, index)``: the same id gives the same scene and caption anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...judges.base import ObjectSpec, Question
from .render import COLORS, SHAPES, SIZES, Scene, Shape

CATEGORIES: tuple[str, ...] = ("single", "count", "binding", "relation")
SPLITS: tuple[str, ...] = ("train", "eval")
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset({("blue", "triangle"), ("yellow", "circle"),
                                                        ("purple", "square")})
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
SUFFIX = " on a white background"
#: Size of each built-in prompt suite (per split and category).
SUITE_SIZE = 200

# (template, held out?). {o}, {o1}, {o2}: object phrases; {n}: number word; {c}, {s}: colour, plural kind.
TEMPLATES: dict[str, list[tuple[str, bool]]] = {
    "single": [("a {o}", False), ("one {o}", False), ("there is a {o}", False), ("there is one {o}", True)],
    "count": [("{n} {c} {s}", False), ("there are {n} {c} {s}", False), ("{n} {c} {s}" + SUFFIX, True)],
    "binding": [("a {o1} and a {o2}", False), ("there is a {o1} and a {o2}", True)],
    "relation": [("a {o1} to the left of a {o2}", False), ("a {o1} to the right of a {o2}", False),
                 ("a {o1} above a {o2}", False), ("a {o1} below a {o2}", False),
                 ("a {o1} on the left of a {o2}", True), ("a {o1} on the right of a {o2}", True)],
}
_TEMPLATE_RELATION = {"left": "left_of", "right": "right_of", "above": "above", "below": "below"}
_SPLIT_CODE = {"train": 101, "eval": 202}
#: Categories whose scenes can be captioned partially (two shapes of different colours and kinds).
PARTIAL_CATEGORIES: tuple[str, ...] = ("binding", "relation")
_PARTIAL_STREAM = 303  # seeds the partial-caption draws apart from the scene's own stream
_MARGIN = 0.03  # min distance from the border and min gap between boxes (image fractions)


@dataclass(frozen=True)
class ShapesPrompt:
    """A caption with the structured question the judge checks, and where it comes from."""

    caption: str
    category: str
    question: Question
    split: str
    index: int
    heldout_combo: bool = False  # names a colour-shape combination never seen in training
    heldout_phrasing: bool = False  # uses a template never seen in training


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (the tokenizer's vocabulary, without specials)."""
    words = set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBERS.values()) | {"small", "big"}
    for templates in TEMPLATES.values():
        for text, _ in templates:
            words |= {w for w in text.split() if not w.startswith("{")}
    return sorted(words)


def _relation_of(template: str) -> str:
    return next(rel for word, rel in _TEMPLATE_RELATION.items() if word in template.split())


def _phrase(shape: Shape, with_size: bool) -> str:
    size = f"{shape.size} " if with_size and shape.size != "medium" else ""
    return f"{size}{shape.color} {shape.kind}"


def _spec(shape: Shape, with_size: bool) -> ObjectSpec:
    return ObjectSpec(shape.kind, shape.color, shape.size if with_size and shape.size != "medium" else None)


def _pick_objects(rng: np.random.Generator, k: int, allow_heldout: bool, force_heldout: bool) -> list[tuple[str, str]]:
    """k (colour, kind) pairs with distinct colours and kinds; one held-out combination if forced."""
    while True:
        colors = rng.choice(list(COLORS), size=k, replace=False)
        kinds = rng.choice(SHAPES, size=k, replace=False)
        pairs = [(str(c), str(s)) for c, s in zip(colors, kinds, strict=True)]
        n_held = sum(p in HELDOUT_COMBOS for p in pairs)
        if (allow_heldout or n_held == 0) and (not force_heldout or n_held >= 1):
            return pairs


def _place(rng: np.random.Generator, halves: list[float], constraint=None,
           tries: int = 2000) -> list[tuple[float, float]]:
    """Random non-overlapping box centres (rejection sampling); ``constraint(points)`` may veto a layout."""
    for _ in range(tries):
        pts: list[tuple[float, float]] = []
        for h in halves:
            lo, hi = h + _MARGIN, 1 - h - _MARGIN
            for _ in range(50):
                p = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
                if all(max(abs(p[0] - q[0]), abs(p[1] - q[1])) > h + hq + _MARGIN
                       for q, hq in zip(pts, halves, strict=False)):
                    pts.append(p)
                    break
            else:
                break
        if len(pts) == len(halves) and (constraint is None or constraint(pts)):
            return pts
    raise RuntimeError("could not place shapes")  # unreachable for the sizes used here


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """``a relation b`` for box centres (x right, y down): the relation's axis must dominate the offset."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if relation in ("left_of", "right_of"):
        along = dx if relation == "left_of" else -dx
        return along > 0 and along > abs(dy)
    along = dy if relation == "above" else -dy
    return along > 0 and along > abs(dx)


def _scene_rng(split: str, category: str, index: int) -> np.random.Generator:
    if split not in _SPLIT_CODE:
        from ...errors import InputError

        raise InputError(f"unknown shapes split {split!r}; use one of {', '.join(SPLITS)}")
    if category not in CATEGORIES:
        from ...errors import InputError

        raise InputError(f"unknown shapes category {category!r}; use one of {', '.join(CATEGORIES)}")
    return np.random.default_rng([_SPLIT_CODE[split], CATEGORIES.index(category), int(index)])


def make_scene(split: str, category: str, index: int) -> tuple[Scene, ShapesPrompt]:
    """The scene and its caption for ``(split, category, index)``; deterministic."""
    rng = _scene_rng(split, category, index)
    train = split == "train"
    templates = [t for t in TEMPLATES[category] if not (train and t[1])]
    if train:
        template, heldout_phrasing = templates[int(rng.integers(len(templates)))]
    else:  # eval: every other prompt uses a held-out phrasing, every third names a held-out combination
        want = index % 2 == 1
        pool = [t for t in templates if t[1] == want]
        template, heldout_phrasing = pool[int(rng.integers(len(pool)))]
    force_held = (not train) and index % 3 == 2
    sizes = list(SIZES)
    with_size = bool(rng.random() < 0.3) and category != "count"

    if category == "count":
        n = int(rng.integers(2, 7))
        (color, kind), = _pick_objects(rng, 1, not train, force_held)
        size_pool = sizes if n <= 3 else ["small", "medium"] if n <= 5 else ["small"]
        shape_sizes = [str(rng.choice(size_pool)) for _ in range(n)]
        pts = _place(rng, [SIZES[s] for s in shape_sizes])
        scene = tuple(Shape(kind, color, s, x, y) for s, (x, y) in zip(shape_sizes, pts, strict=True))
        caption = template.format(n=NUMBERS[n], c=color, s=kind + "s")
        question = Question("count", (ObjectSpec(kind, color),), count=n, text=caption)
    else:
        k = 1 if category == "single" else 2
        pairs = _pick_objects(rng, k, not train, force_held)
        shape_sizes = [str(rng.choice(sizes)) for _ in range(k)]
        constraint = None
        relation = None
        if category == "relation":
            relation = _relation_of(template)
            constraint = lambda p: relation_holds(p[0], p[1], relation) and _clear(p[0], p[1], relation)  # noqa: E731
        pts = _place(rng, [SIZES[s] for s in shape_sizes], constraint)
        scene = tuple(Shape(kind, color, s, x, y)
                      for (color, kind), s, (x, y) in zip(pairs, shape_sizes, pts, strict=True))
        phrases = [_phrase(sh, with_size) for sh in scene]
        specs = tuple(_spec(sh, with_size) for sh in scene)
        if category == "single":
            caption = template.format(o=phrases[0])
            question = Question("count", specs, count=1, text=caption)
        elif category == "binding":
            caption = template.format(o1=phrases[0], o2=phrases[1])
            question = Question("attribute", specs, text=caption)
        else:
            caption = template.format(o1=phrases[0], o2=phrases[1])
            question = Question("relation", specs, relation=relation, text=caption)
        if train and category in ("single", "binding") and rng.random() < 0.2:
            caption += SUFFIX
            question = Question(question.kind, question.objects, question.count, question.relation, caption)
    heldout_combo = any((sh.color, sh.kind) in HELDOUT_COMBOS for sh in scene)
    prompt = ShapesPrompt(caption, category, question, split, int(index), heldout_combo, heldout_phrasing)
    return scene, prompt


def _clear(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """Ground-truth relations are unambiguous: the dominant offset is at least twice the other one."""
    dx, dy = abs(b[0] - a[0]), abs(b[1] - a[1])
    return dx >= 2 * dy if relation in ("left_of", "right_of") else dy >= 2 * dx


def training_prompt(index: int, partial_captions: float = 0.0) -> tuple[Scene, ShapesPrompt]:
    """The index-th example of the training stream: categories cycle, each with its own id sequence.

    ``partial_captions`` is the fraction of the scenes of :data:`PARTIAL_CATEGORIES` whose caption names only part
    of the scene (see :func:`partial_prompt`). Which scenes, and what their captions name, come from a random
    stream of their own, seeded by the example's id: the scenes and every other caption are those of the
    exhaustive stream, and a scene captioned partially at one fraction is captioned the same way at any larger one.
    """
    if not 0.0 <= partial_captions <= 1.0:
        from ...errors import InputError

        raise InputError(f"partial captions {partial_captions!r}: give a fraction of scenes between 0 and 1")
    category, i = CATEGORIES[index % len(CATEGORIES)], index // len(CATEGORIES)
    scene, prompt = make_scene("train", category, i)
    if partial_captions > 0 and category in PARTIAL_CATEGORIES:
        rng = np.random.default_rng([_SPLIT_CODE["train"], CATEGORIES.index(category), i, _PARTIAL_STREAM])
        if rng.random() < partial_captions:
            prompt = partial_prompt(prompt, rng)
    return scene, prompt


def training_example(index: int, partial_captions: float = 0.0) -> tuple[Scene, str]:
    """The index-th training scene and its caption (:func:`training_prompt`)."""
    scene, prompt = training_prompt(index, partial_captions)
    return scene, prompt.caption


def partial_prompt(prompt: ShapesPrompt, rng: np.random.Generator) -> ShapesPrompt:
    """A caption naming a random non-empty proper subset of ``prompt``'s shapes, with a question about those only.

    The grammar's multi-shape scenes with distinct shapes hold two, so the subset is one of them, worded as a
    single-object training caption ("a red circle", "one big blue square", optionally "... on a white background")
    with its size word where the full caption had one. Its question counts that shape (exactly one, true of the
    scene because the other shape differs in colour and kind); the unnamed shape is allowed, as in any question.
    Count scenes are never captioned partially: their shapes share one description, so naming some of them would
    make the count false.
    """
    if prompt.category not in PARTIAL_CATEGORIES:
        raise ValueError(f"{prompt.category} captions cannot name part of their scene")
    spec = prompt.question.objects[int(rng.integers(len(prompt.question.objects)))]
    templates = [t for t, heldout in TEMPLATES["single"] if not heldout]  # training phrasings only
    caption = templates[int(rng.integers(len(templates)))].format(o=str(spec))
    if rng.random() < 0.2:
        caption += SUFFIX
    question = Question("count", (spec,), count=1, text=caption)
    return ShapesPrompt(caption, "single", question, prompt.split, prompt.index, prompt.heldout_combo, False)


def prompts(split: str, category: str | None = None, n: int = SUITE_SIZE) -> list[ShapesPrompt]:
    """The built-in prompt suite: the first ``n`` prompts of ``split`` for ``category`` (all categories if None)."""
    cats = CATEGORIES if category is None else (category,)
    return [make_scene(split, c, i)[1] for c in cats for i in range(n)]
