"""Shapes world: renderer geometry, grammar, splits and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffprobe.errors import InputError
from diffprobe.worlds import shapes
from diffprobe.worlds.shapes import grammar
from diffprobe.worlds.shapes.model import build_tokenizer
from diffprobe.worlds.shapes.render import COLORS, SIZES, Shape, render, render_tensor


@pytest.mark.parametrize(("kind", "area"), [("square", 4.0), ("circle", math.pi), ("triangle", 2.0)])
def test_rendered_area_matches_geometry(kind, area):
    # Shape area in units of half-extent squared: square (2h)^2, circle pi h^2, triangle base 2h x height 2h / 2.
    h = SIZES["big"]
    img = render_tensor([(Shape(kind, "blue", "big", 0.5, 0.5),)], resolution=256)[0]
    blue = np.asarray(COLORS["blue"]) / 255.0
    # Coverage per pixel from the red channel, which moves linearly between white (1) and blue's red value.
    cover = (1 - img[0].numpy()) / (1 - blue[0])
    assert cover.mean() == pytest.approx(area * h * h, rel=0.01)


def test_render_pixels_and_layout():
    scene = (Shape("square", "red", "medium", 0.25, 0.5), Shape("circle", "green", "small", 0.75, 0.25))
    arr = np.asarray(render(scene))
    assert arr.shape == (64, 64, 3)
    assert tuple(arr[32, 16]) == COLORS["red"]  # centre of the square
    assert tuple(arr[16, 48]) == COLORS["green"]  # centre of the circle
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[60, 60]) == (255, 255, 255)
    # Square spans x in [0.25 - 0.12, 0.25 + 0.12] -> pixels 8.32..23.68: column 9 fully inside, column 7 outside.
    assert tuple(arr[32, 9]) == COLORS["red"] and tuple(arr[32, 7]) == (255, 255, 255)


def test_scene_ids_are_deterministic_and_distinct():
    a = grammar.make_scene("eval", "relation", 5)
    b = grammar.make_scene("eval", "relation", 5)
    assert a == b
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(b[0])))
    assert grammar.make_scene("eval", "relation", 6)[0] != a[0]
    assert grammar.make_scene("train", "relation", 5)[0] != a[0]


def test_training_split_hides_heldout_combos_and_phrasings():
    heldout_templates = {t for ts in grammar.TEMPLATES.values() for t, held in ts if held}
    for i in range(800):
        scene, caption = grammar.training_example(i)
        assert not any((s.color, s.kind) in grammar.HELDOUT_COMBOS for s in scene), caption
    for cat in grammar.CATEGORIES:
        for p in grammar.prompts("train", cat, 100):
            assert not p.heldout_combo and not p.heldout_phrasing
            assert "on the left of" not in p.caption and not p.caption.startswith("there is one")
    assert heldout_templates  # the grammar does hold phrasings out
    ev = grammar.prompts("eval", n=60)
    assert any(p.heldout_combo for p in ev) and any(p.heldout_phrasing for p in ev)
    assert any(not p.heldout_combo for p in ev) and any(not p.heldout_phrasing for p in ev)


def test_captions_describe_their_scenes():
    for i in range(40):
        scene, p = grammar.make_scene("eval", "count", i)
        n = p.question.count
        assert len(scene) == n and 2 <= n <= 6
        assert grammar.NUMBERS[n] in p.caption.split()
        assert all(s.color == p.question.objects[0].color and s.kind == p.question.objects[0].noun for s in scene)
        scene, p = grammar.make_scene("eval", "relation", i)
        a, b = scene
        assert grammar.relation_holds((a.x, a.y), (b.x, b.y), p.question.relation)
        assert p.caption.startswith("a ") and a.color in p.caption.split()[:3]


def test_relation_geometry():
    assert grammar.relation_holds((0.2, 0.5), (0.8, 0.5), "left_of")
    assert grammar.relation_holds((0.8, 0.5), (0.2, 0.5), "right_of")
    assert grammar.relation_holds((0.5, 0.2), (0.5, 0.8), "above")  # y grows downwards
    assert grammar.relation_holds((0.5, 0.8), (0.5, 0.2), "below")
    assert not grammar.relation_holds((0.2, 0.2), (0.4, 0.8), "left_of")  # vertical offset dominates
    assert not grammar.relation_holds((0.5, 0.5), (0.5, 0.5), "left_of")


def test_every_caption_word_is_in_the_tokenizer():
    tok = build_tokenizer()
    unk = tok.unk_token_id
    for p in grammar.prompts("eval", n=50) + grammar.prompts("train", n=50):
        ids = tok(p.caption).input_ids
        assert unk not in ids, p.caption
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    padded = tok("two red circles", padding="max_length", max_length=tok.model_max_length).input_ids
    assert padded[:5] == tok("two red circles").input_ids and set(padded[5:]) == {tok.eos_token_id}


def test_bad_split_or_category_is_a_clear_error():
    with pytest.raises(InputError, match="split"):
        shapes.prompts("test", "count")
    with pytest.raises(InputError, match="category"):
        shapes.prompts("eval", "colour")
