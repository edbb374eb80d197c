"""The judge interface and the exact shapes judge: ground truth, wrong answers, imperfect images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffprobe.errors import InputError
from diffprobe.judges import ObjectSpec, Question, make_judge
from diffprobe.worlds.shapes import detect, grammar
from diffprobe.worlds.shapes.render import Shape, render, render_tensor, to_pil


def _judge_ground_truth(n_per_cell: int, resolution: int = 64) -> tuple[int, int, list[str]]:
    judge = make_judge("shapes")
    wrong, total, why = 0, 0, []
    for split in grammar.SPLITS:
        for cat in grammar.CATEGORIES:
            items = [grammar.make_scene(split, cat, i) for i in range(n_per_cell)]
            images = to_pil(render_tensor([s for s, _ in items], resolution))
            for (_, p), im in zip(items, images, strict=True):
                v = judge.judge(im, p.question)
                total += 1
                if not v.correct:
                    wrong += 1
                    why.append(f"{p.caption}: {v.reason}")
    return wrong, total, why


def test_ground_truth_is_judged_correct():
    wrong, total, why = _judge_ground_truth(20)
    assert wrong / total <= 0.01, why[:5]


@pytest.mark.slow
def test_ground_truth_accuracy_over_thousands_of_scenes():
    wrong, total, why = _judge_ground_truth(400)  # 3200 scenes
    assert total == 3200
    assert wrong / total <= 0.01, why[:5]


@pytest.mark.parametrize("resolution", [48, 128])
def test_other_resolutions(resolution):
    wrong, total, why = _judge_ground_truth(5, resolution)
    assert wrong == 0, why[:3]


def test_detections_report_colour_kind_size_position():
    scene = (Shape("triangle", "orange", "big", 0.3, 0.7), Shape("circle", "purple", "small", 0.8, 0.2),
             Shape("square", "yellow", "medium", 0.5, 0.4))
    dets = detect(render(scene, 128))
    assert [(d.color, d.kind, d.size) for d in dets] == [("orange", "triangle", "big"), ("yellow", "square", "medium"),
                                                        ("purple", "circle", "small")]
    for d, s in zip(dets, [scene[0], scene[2], scene[1]], strict=True):
        assert d.x == pytest.approx(s.x, abs=0.02) and d.y == pytest.approx(s.y, abs=0.02)


def _two(a: Shape, b: Shape) -> Image.Image:
    return render((a, b))


def test_wrong_answers_are_rejected_with_reasons():
    judge = make_judge("shapes")
    img = _two(Shape("circle", "red", "medium", 0.25, 0.5), Shape("square", "blue", "medium", 0.75, 0.5))
    red_circle, blue_square = ObjectSpec("circle", "red"), ObjectSpec("square", "blue")
    v = judge.judge(img, Question("count", (red_circle,), count=2))
    assert not v.correct and v.answer == "1" and "expected 2 red circles, found 1" in v.reason
    assert judge.judge(img, Question("relation", (red_circle, blue_square), relation="left_of")).correct
    v = judge.judge(img, Question("relation", (red_circle, blue_square), relation="right_of"))
    assert not v.correct and "is not to the right of" in v.reason
    v = judge.judge(img, Question("attribute", (ObjectSpec("circle", "blue"), blue_square)))
    assert not v.correct and "missing blue circle" in v.reason
    assert judge.judge(img, Question("attribute", (red_circle, blue_square))).correct
    assert not judge.judge(img, Question("count", (ObjectSpec("circle", "red", "big"),), count=1)).correct


def test_blurred_images_are_still_read():
    scene, p = grammar.make_scene("eval", "relation", 3)
    img = render(scene).filter(ImageFilter.GaussianBlur(1.0))
    assert make_judge("shapes").judge(img, p.question).correct


def test_merged_partial_and_empty_images_do_not_crash():
    judge = make_judge("shapes")
    q = Question("count", (ObjectSpec("square", "red"),), count=2)
    # Two touching red squares merge into one wide region: reported as a blob, not two squares.
    merged = _two(Shape("square", "red", "medium", 0.38, 0.5), Shape("square", "red", "medium", 0.62, 0.5))
    v = judge.judge(merged, q)
    assert not v.correct and "red blob" in v.reason
    # A circle cut by the border, an empty image, noise: answers, never exceptions.
    partial = render((Shape("circle", "green", "big", 0.02, 0.5),))
    assert [d.color for d in detect(partial)] == ["green"]
    assert judge.judge(Image.new("RGB", (64, 64), "white"), q).reason.endswith("saw no shapes")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert judge.judge(Image.fromarray(noise), q).correct is False
    # Float arrays in 0..1 work like images.
    arr = np.asarray(render((Shape("square", "red", "big", 0.5, 0.5),)), np.float32) / 255
    assert judge.judge(arr, Question("count", (ObjectSpec("square", "red"),), count=1)).correct


def test_bad_questions_and_inputs_raise_input_errors():
    with pytest.raises(InputError):
        Question("colour", (ObjectSpec("circle"),))
    with pytest.raises(InputError):
        Question("relation", (ObjectSpec("circle"),), relation="left_of")
    with pytest.raises(InputError):
        Question("relation", (ObjectSpec("circle"), ObjectSpec("square")), relation="near")
    with pytest.raises(InputError):
        Question("count", (ObjectSpec("circle"),))
    with pytest.raises(InputError):
        make_judge("oracle")
    with pytest.raises(InputError):
        make_judge("shapes").judge(np.zeros((8, 8)), Question("count", (ObjectSpec("circle"),), count=1))
    judge = make_judge("shapes")
    with pytest.raises(InputError):
        judge.judge_many([Image.new("RGB", (8, 8))], [])
