"""Partial captions of the shapes world: the training-stream option, its truth, the judge's meaning of a question
when a scene holds shapes its caption does not name, and the training record."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from diffprobe.errors import InputError
from diffprobe.judges.base import ObjectSpec, Question
from diffprobe.worlds.shapes import grammar, render
from diffprobe.worlds.shapes.judge import ShapesJudge
from diffprobe.worlds.shapes.model import build_tokenizer
from diffprobe.worlds.shapes.render import Shape, pack

# Digests of the exhaustive training stream, taken before partial captions existed (every shipped run trained on
# it): the first 2000 examples (packed scenes and captions), and batch 3 of size 16 at run 2's data offset.
STREAM_DIGEST = "9dea1871dfdb6bcb9ffc26e597985d914c817db4b828e283f81131dd9a68c84b"
BATCH_DIGEST = "95fa6e0eefb073060eac0dd218e66a72ffba953e0d4246286ca33039f87019d8"


def _digest(examples: list) -> str:
    params, colors = pack([s for s, _ in examples], 6)
    h = hashlib.sha256(params.numpy().tobytes() + colors.numpy().tobytes())
    h.update("\n".join(c for _, c in examples).encode())
    return h.hexdigest()


def test_stream_without_partial_captions_is_the_one_every_run_trained_on():
    from diffprobe.worlds.shapes.train import _Batches

    assert _digest([grammar.training_example(i) for i in range(2000)]) == STREAM_DIGEST
    assert _digest([grammar.training_example(i, 0.0) for i in range(2000)]) == STREAM_DIGEST
    params, colors, captions = _Batches(16, 743936)[3]
    h = hashlib.sha256(params.numpy().tobytes() + colors.numpy().tobytes() + "\n".join(captions).encode())
    assert h.hexdigest() == BATCH_DIGEST


def _partial(exhaustive: dict[int, str], fraction: float) -> set[int]:
    """Indices whose caption at ``fraction`` differs from the exhaustive caption."""
    return {i for i, caption in exhaustive.items() if grammar.training_prompt(i, fraction)[1].caption != caption}


def test_partial_captions_touch_only_two_shape_scenes_at_the_asked_rate():
    n = 1200
    exhaustive = {i: grammar.training_example(i)[1] for i in range(n)}
    two_shape = {i for i in range(n) if grammar.CATEGORIES[i % 4] in grammar.PARTIAL_CATEGORIES}
    half = _partial(exhaustive, 0.5)
    assert half <= two_shape  # single and count captions never change
    # 600 two-shape scenes: binomial counts (sd 12.2 at 0.5, 11.2 at 0.3 and 0.7); 4 sd either side.
    assert abs(len(half) - 300) < 49
    low, high = _partial(exhaustive, 0.3), _partial(exhaustive, 0.7)
    assert low <= half <= high  # nested: a larger fraction keeps the scenes a smaller one captioned partially
    assert abs(len(low) - 180) < 45 and abs(len(high) - 420) < 45
    assert _partial({i: exhaustive[i] for i in sorted(two_shape)[:200]}, 1.0) == set(sorted(two_shape)[:200])
    for i in range(40):  # scenes never change, and the same index gives the same caption every time
        scene, p = grammar.training_prompt(i, 0.5)
        assert scene == grammar.training_example(i)[0]
        assert grammar.training_prompt(i, 0.5)[1] == p


def test_partial_captions_name_one_shape_of_the_scene_truthfully():
    judge, tok = ShapesJudge(), build_tokenizer()
    exhaustive_prompts = []
    seen_templates = set()
    for i in [i for i in range(400) if grammar.CATEGORIES[i % 4] in grammar.PARTIAL_CATEGORIES]:
        scene, p = grammar.training_prompt(i, 1.0)
        full = grammar.make_scene("train", grammar.CATEGORIES[i % 4], i // 4)[1]
        exhaustive_prompts.append(full)
        (spec,) = p.question.objects
        assert p.question.kind == "count" and p.question.count == 1 and p.question.text == p.caption
        assert spec in full.question.objects  # one of the shapes the full caption names, size word and all
        assert str(spec) in p.caption and tok.unk_token_id not in tok(p.caption).input_ids
        other = next(o for o in full.question.objects if o != spec)
        assert other.color not in p.caption.split() and other.noun not in p.caption.split()
        image = render(scene)
        assert judge.judge(image, p.question).correct, (p.caption, judge.judge(image, p.question).reason)
        assert judge.judge(image, full.question).correct
        seen_templates.add(p.caption.split(str(spec))[0])
    assert seen_templates == {"a ", "one ", "there is a "}  # the training single-object phrasings, no held-out one
    assert len(exhaustive_prompts) == 200


def test_a_bad_fraction_is_a_clear_error(tmp_path):
    from diffprobe.worlds.shapes.train import main, train

    with pytest.raises(InputError, match="between 0 and 1"):
        grammar.training_example(1, 1.5)
    with pytest.raises(InputError, match="--partial-captions"):
        train(tmp_path, steps=1, device="cpu", workers=0, partial_captions=-0.1)
    with pytest.raises(InputError, match="--partial-captions"):
        main(["--out", str(tmp_path), "--partial-captions", "2"])
    assert not (tmp_path / "weights").exists()


# --- the judge: a question is about the shapes it names ----------------------------------------------------------


def _image(*shapes):
    return render(tuple(shapes))


def test_count_questions_count_the_named_shapes_only():
    judge = ShapesJudge()
    image = _image(Shape("circle", "red", "small", 0.15, 0.15), Shape("circle", "red", "small", 0.5, 0.15),
                   Shape("circle", "red", "small", 0.85, 0.15), Shape("square", "blue", "small", 0.15, 0.8),
                   Shape("square", "red", "small", 0.5, 0.8), Shape("circle", "green", "small", 0.85, 0.8))
    red_circles = ObjectSpec("circle", "red")
    # Three red circles beside a blue square, a red square and a green circle: the unnamed shapes do not count.
    assert [judge.judge(image, Question("count", (red_circles,), count=n)).correct for n in (2, 3, 4)] == \
        [False, True, False]
    assert judge.judge(image, Question("count", (red_circles,), count=3)).answer == "3"
    # "a blue square" (count 1) holds beside five other shapes; "a red circle" does not: three are named by it.
    assert judge.judge(image, Question("count", (ObjectSpec("square", "blue"),), count=1)).correct
    assert not judge.judge(image, Question("count", (red_circles,), count=1)).correct


def test_binding_and_relation_questions_allow_unnamed_shapes():
    judge = ShapesJudge()
    image = _image(Shape("circle", "red", "medium", 0.2, 0.5), Shape("square", "blue", "medium", 0.8, 0.5),
                   Shape("triangle", "green", "medium", 0.5, 0.15))
    red, blue = ObjectSpec("circle", "red"), ObjectSpec("square", "blue")
    assert judge.judge(image, Question("attribute", (red, blue))).correct
    assert not judge.judge(image, Question("attribute", (red, ObjectSpec("square", "purple")))).correct
    assert judge.judge(image, Question("relation", (red, blue), relation="left_of")).correct
    assert not judge.judge(image, Question("relation", (red, blue), relation="right_of")).correct


def test_no_suite_question_says_only():
    # Questions allow shapes they do not name; no caption of the grammar asks for "only" those it names.
    words = {w for ts in grammar.TEMPLATES.values() for t, _ in ts for w in t.split()} | set(grammar.SUFFIX.split())
    assert "only" not in words and "just" not in words and "nothing" not in words


def test_suite_verdicts_on_their_own_scenes_are_unchanged():
    # Every suite question is true of its own rendered scene, as before partial captions existed.
    judge = ShapesJudge()
    for category in grammar.CATEGORIES:
        for i in range(25):
            scene, p = grammar.make_scene("eval", category, i)
            assert judge.judge(render(scene), p.question).correct, p.caption


# --- the training record and the model card ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny trained folder to continue (one autoencoder step, one denoiser step)."""
    from diffprobe.worlds.shapes.train import train

    out = tmp_path_factory.mktemp("parent")
    record = train(out, seed=1, vae_steps=1, steps=1, batch=2, device="cpu", workers=0, log_every=1)
    return out, record


def test_a_continuation_records_its_partial_captions(tmp_path, monkeypatch, parent):
    from diffprobe.worlds.shapes import train as training
    from diffprobe.worlds.shapes.record import same_settings

    folder, record0 = parent
    seen: list[float] = []
    original = training._Batches.__init__

    def spy(self, batch, offset=0, partial_captions=0.0):
        seen.append(partial_captions)
        original(self, batch, offset, partial_captions)

    assert record0["partial_captions"] == 0.0
    assert "Partial captions" not in (folder / "MODEL_CARD.md").read_text()
    monkeypatch.setattr(training._Batches, "__init__", spy)
    record = training.train(tmp_path / "b", seed=2, steps=1, batch=2, device="cpu", workers=0, log_every=1,
                            init=folder / "weights", warmup=1, ema_decay=0.5, partial_captions=0.5)
    assert seen[-1] == 0.5  # the denoiser's batches read the partial stream (the autoencoder's never do)
    saved = json.loads((tmp_path / "b" / "training.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["partial_captions"] == 0.5 and saved["init"]["partial_captions"] == 0.0
    assert "0.5 of binding and relation scenes captioned partially" in saved["data"]
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "--partial-captions 0.5" in card and "Partial captions: 0.5 of the binding and relation scenes" in card
    # A record written before the setting existed replays as exhaustive captions.
    old = {k: v for k, v in record0.items() if k != "partial_captions"}
    assert same_settings(record0, old)
    assert not same_settings({**record, "partial_captions": 0.0}, record)


def test_a_killed_continuation_resumes_from_its_checkpoint(tmp_path, monkeypatch, parent):
    from diffusers import UNet2DConditionModel

    from diffprobe.worlds.shapes import train as training
    from diffprobe.worlds.shapes.train import train

    folder, _ = parent
    args = dict(seed=3, steps=2, batch=2, device="cpu", workers=0, log_every=1, init=folder / "weights", warmup=1,
                ema_decay=0.5, partial_captions=0.5, checkpoint_every=1)
    whole = train(tmp_path / "whole", **args)
    assert whole["resumed_from_step"] is None and not (tmp_path / "whole" / "checkpoints").exists()

    original = training._Batches.__getitem__

    def killed(self, i):
        if i == 1:  # the batch of step 2, after the checkpoint of step 1
            raise KeyboardInterrupt
        return original(self, i)

    monkeypatch.setattr(training._Batches, "__getitem__", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "killed", **args)
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-1").is_dir()
    monkeypatch.setattr(training._Batches, "__getitem__", original)
    resumed = train(tmp_path / "killed", **args)
    assert resumed["resumed_from_step"] == 1 and resumed["unet_steps"] == 2
    a = UNet2DConditionModel.from_pretrained(tmp_path / "whole" / "weights" / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(tmp_path / "killed" / "weights" / "unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights as the uninterrupted run
    rows = lambda d: [r.split(",")[:3] for r in (tmp_path / d / "loss.csv").read_text().splitlines()]  # noqa: E731
    assert rows("killed") == rows("whole")
    with pytest.raises(InputError, match="--init"):
        train(tmp_path / "scratch", steps=1, device="cpu", workers=0, checkpoint_every=2)


def test_partial_batches_hold_the_partial_stream():
    from diffprobe.worlds.shapes.train import _Batches

    _, _, captions = _Batches(8, 40, 0.7)[2]
    assert captions == [grammar.training_example(j, 0.7)[1] for j in range(56, 64)]
    assert np.array_equal(_Batches(8, 40, 0.7)[2][0].numpy(), _Batches(8, 40)[2][0].numpy())  # same scenes


# --- the experiment's decision rule (examples/partial_captions.py) ------------------------------------------------


def _example():
    import importlib.util
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    if str(examples) not in sys.path:
        sys.path.insert(0, str(examples))  # the example imports examples/experiment.py, as it does when run
    path = examples / "partial_captions.py"
    spec = importlib.util.spec_from_file_location("partial_captions_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quality(single: float, count: float) -> dict:
    return {"models": {"control": {"single": {"accuracy": 0.90}, "count": {"accuracy": 0.50}},
                       "partial-0.5": {"single": {"accuracy": single}, "count": {"accuracy": count}}}}


def _curves(concept: list[tuple[float, float]], scfg: list[tuple[float, float]]) -> dict:
    rows = lambda pts: [{"point": f"p{i}", "all": {"difference": d, "p": p}} for i, (d, p) in enumerate(pts)]  # noqa: E731
    return {"curves": {"concept": rows(concept), "scfg": rows(scfg)}}


def test_the_decision_rule_needs_quality_within_3_points_and_a_helping_point_after_holm():
    ex = _example()
    curves = _curves([(0.05, 0.004), (0.02, 0.2), (-0.10, 0.001)], [(0.03, 0.01), (0.0, 0.9), (0.04, 0.03)])
    # Holm over the six p-values: 0.001 x 6 = 0.006 (a harmful point), 0.004 x 5 = 0.02, 0.01 x 4 = 0.04,
    # 0.03 x 3 = 0.09, then 0.2 x 2 = 0.4 and 0.9.
    d = ex.decision(_quality(0.88, 0.48), curves, "partial-0.5")
    assert d["within_3_points"] and d["ship"]
    assert [(h["method"], h["point"]) for h in d["helping_points"]] == [("concept", "p0"), ("scfg", "p0")]
    assert [h["p_holm_6"] for h in d["helping_points"]] == pytest.approx([0.02, 0.04])
    assert d["single_count_vs_control"] == pytest.approx({"single": -0.02, "count": -0.02})
    assert not ex.decision(_quality(0.88, 0.46), curves, "partial-0.5")["ship"]  # count 4 points below
    assert ex.decision(_quality(0.93, 0.53), curves, "partial-0.5")["ship"]  # exactly 3 points above
    harmful_only = _curves([(-0.05, 0.001), (0.0, 1.0), (0.0, 1.0)], [(0.02, 0.04), (0.0, 1.0), (0.0, 1.0)])
    assert not ex.decision(_quality(0.90, 0.50), harmful_only, "partial-0.5")["ship"]  # 0.04 x 5 = 0.2 after Holm


def test_per_prompt_gain_pairs_images_by_prompt_and_seed():
    from types import SimpleNamespace as NS

    ex = _example()
    base = NS(images={("a", 0): NS(correct=True), ("a", 1): NS(correct=False), ("b", 0): NS(correct=False),
                      ("b", 1): NS(correct=None), ("c", 0): NS(correct=True)})
    arm = NS(images={("a", 0): NS(correct=True), ("a", 1): NS(correct=True), ("b", 0): NS(correct=True),
                     ("b", 1): NS(correct=True)})
    assert ex.per_prompt_gain(base, arm) == {"a": 0.5, "b": 1.0}  # b's seed 1 is unjudged in base; c has no pair
