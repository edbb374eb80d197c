"""Detector judge: box rules with a fake detector (chosen boxes), and a tiny random OWL-ViT / OWLv2 saved to disk and
loaded back through the real loading code (plumbing: verdicts, identity, batching, CLI)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffprobe.cli import app
from diffprobe.errors import InputError, ModelNotFoundError
from diffprobe.judges import ObjectSpec, Question, Verdict, make_judge
from diffprobe.judges.boxes import Boxes, box_iou, keep_boxes, nms, relations
from diffprobe.judges.detector import COLORS, ColorClassifier, DetectorJudge, ZeroShotDetector
from diffprobe.models.tiny import build_tiny_owl

# --- a fake detector and a fake CLIP -------------------------------------------------------------------------


class FakeDetector:
    """Returns chosen boxes: ``scenes[name]`` maps a noun to its (score, xyxy) boxes; an image names its scene in
    ``image.info["scene"]``. Queries are bare nouns (``kind`` grounding-dino: template "{noun}")."""

    kind = "grounding-dino"

    def __init__(self, scenes):
        self.scenes = scenes
        self.calls: list[int] = []

    def identity(self):
        return {"model": "fake"}

    def detect(self, images, queries):
        self.calls.append(len(images))
        out = []
        for im, qs in zip(images, queries, strict=True):
            scene = self.scenes[im.info["scene"]]
            found = [(qs.index(noun), s, xyxy) for noun, boxes in scene.items() if noun in qs for s, xyxy in boxes]
            out.append(Boxes.of([f[0] for f in found], [f[1] for f in found], [f[2] for f in found]))
        return out


def scene_image(name, color=(128, 128, 128), boxes=()):
    """A 100x100 image of one colour, with rectangles (xyxy, rgb) painted on it."""
    arr = np.zeros((100, 100, 3), np.uint8) + np.asarray(color, np.uint8)
    for (x0, y0, x1, y1), rgb in boxes:
        arr[y0:y1, x0:x1] = rgb
    im = Image.fromarray(arr)
    im.info["scene"] = name
    return im


RGB = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20), "white": (250, 250, 250)}


class MeanColorClip:
    """A CLIP stand-in that is exact on solid colours: an image embeds as the one-hot of its nearest colour in
    :data:`RGB`, a text as the one-hot of the colour word it contains (each of COLORS gets its own axis)."""

    id = "fake-clip"

    def embed(self, images):
        out = np.zeros((len(images), len(COLORS)), np.float32)
        names = list(RGB)
        for i, im in enumerate(images):
            mean = np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3).mean(0)
            nearest = names[int(np.argmin([np.linalg.norm(mean - np.asarray(RGB[n])) for n in names]))]
            out[i, COLORS.index(nearest)] = 1
        return out

    def embed_text(self, texts):
        out = np.full((len(texts), len(COLORS)), 0.01, np.float32)
        for i, t in enumerate(texts):
            out[i, next(k for k, c in enumerate(COLORS) if f" {c} " in f" {t.replace('-', ' ')} ")] = 1
        return out


def count_q(noun, n, color=None):
    return Question("count", (ObjectSpec(noun, color),), count=n)


def rel_q(a, rel, b):
    return Question("relation", (ObjectSpec(a), ObjectSpec(b)), relation=rel)


def judge_of(scenes, **kw):
    return DetectorJudge(FakeDetector(scenes), **kw)


# --- box geometry by hand ------------------------------------------------------------------------------------


def test_box_iou_by_hand():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]], float)
    iou = box_iou(a, b)
    assert iou[0, 0] == pytest.approx(50 / 150)
    assert iou[0, 1] == 0 and iou[1, 0] == 0 and iou[1, 1] == 0  # empty box: no division by zero


def brute_nms(boxes, t):
    order = sorted(range(len(boxes)), key=lambda i: -boxes.scores[i])
    kept = []
    for i in order:
        if all(boxes.labels[k] != boxes.labels[i] or box_iou(boxes.xyxy[[k]], boxes.xyxy[[i]])[0, 0] <= t
               for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_a_brute_force_greedy_nms(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 50, (40, 2))
    wh = rng.uniform(5, 30, (40, 2))
    boxes = Boxes.of(rng.integers(0, 3, 40), rng.permutation(40) / 40, np.concatenate([xy, xy + wh], 1))
    for t in (0.0, 0.3, 0.5, 0.9, 1.0):
        assert nms(boxes, t).tolist() == brute_nms(boxes, t)
    assert len(nms(boxes, 1.0)) == 40


def test_keep_boxes_threshold_is_strict_and_nms_is_class_wise():
    boxes = Boxes.of([0, 0, 1, 0], [0.9, 0.8, 0.7, 0.3],
                     [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    kept = keep_boxes(boxes, 0.3, 0.5)  # 0.3 is not above 0.3; box 1 duplicates box 0; box 2 is another label
    assert kept.scores.tolist() == [0.9, 0.7] and kept.labels.tolist() == [0, 1]
    assert len(keep_boxes(boxes, 0.29, 1.0)) == 4


def box_at(cx, cy, w=20, h=20):
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], float)


def test_relations_by_hand_and_ties_at_the_margin():
    # Pure horizontal offset of 50 between 20-wide boxes: shrunk by 0.1 * 40 = 4, 46 / 50 > 0.5.
    assert relations(box_at(10, 50), box_at(60, 50), 0.1) == {"left_of"}
    assert relations(box_at(60, 50), box_at(10, 50), 0.1) == {"right_of"}
    assert relations(box_at(50, 10), box_at(50, 60), 0.1) == {"above"}  # y grows downwards
    assert relations(box_at(50, 60), box_at(50, 10), 0.1) == {"below"}
    # margin 0.1: |d| - 4 > |d| / 2 needs |d| > 8; exactly 8 is a tie and gives no relation.
    assert relations(box_at(42, 50), box_at(50, 50), 0.1) == set()
    assert relations(box_at(41, 50), box_at(50, 50), 0.1) == {"left_of"}
    # margin 0.5: |d| > 40 needed
    assert relations(box_at(10, 50), box_at(50, 50), 0.5) == set()
    assert relations(box_at(9, 50), box_at(50, 50), 0.5) == {"left_of"}
    # A 45 degree offset with no margin is both left and above (cos 45 > 0.5); a steep one only above.
    assert relations(box_at(10, 10), box_at(50, 50), 0.0) == {"left_of", "above"}
    assert relations(box_at(40, 10), box_at(50, 40), 0.0) == {"above"}
    assert relations(box_at(50, 50), box_at(50, 50), 0.0) == set()  # same centre


# --- counting rules ------------------------------------------------------------------------------------------


def test_count_merges_duplicates_ignores_weak_boxes_and_other_nouns():
    scenes = {"s": {"apple": [(0.9, [0, 0, 20, 20]), (0.85, [1, 1, 21, 21]),  # a duplicate (IoU ~0.82)
                              (0.8, [50, 50, 70, 70]), (0.3, [80, 0, 99, 20]), (0.1, [80, 80, 99, 99])],
                    "pear": [(0.95, [0, 0, 20, 20]), (0.9, [30, 30, 40, 40])]}}
    judge = judge_of(scenes)
    im = scene_image("s")
    [v2, v3, v0, vp] = judge.judge_many([im] * 4, [count_q("apple", 2), count_q("apple", 3), count_q("plum", 0),
                                                   count_q("pear", 2)])
    assert isinstance(v2, Verdict) and v2.correct is True and v2.answer == "2"
    assert v3.correct is False and v3.answer == "2" and "expected 3 apple, found 2" in v3.reason
    assert v0.correct is True and v0.answer == "0" and "saw nothing" in v0.reason
    assert vp.correct is True  # the pear box on the apple box is another noun: NMS leaves both
    assert json.loads(v2.raw) == [{"noun": "apple", "score": 0.9, "xyxy": [0, 0, 20, 20]},
                                  {"noun": "apple", "score": 0.8, "xyxy": [50, 50, 70, 70]}]
    # Lower the threshold and the 0.3 box counts; NMS off and the duplicate counts too.
    assert judge_of(scenes, box_threshold=0.2).judge(im, count_q("apple", 3)).correct is True
    assert judge_of(scenes, nms_iou=1.0).judge(im, count_q("apple", 3)).correct is True


def test_zero_objects_and_an_empty_image():
    judge = judge_of({"empty": {}})
    im = scene_image("empty")
    assert judge.judge(im, count_q("dog", 0)).correct is True
    v = judge.judge(im, count_q("dog", 1))
    assert v.correct is False and v.answer == "0"
    v = judge.judge(im, rel_q("dog", "left_of", "cat"))
    assert v.correct is False and "missing dog, cat" in v.reason


# --- relation rules ------------------------------------------------------------------------------------------


def test_relation_with_several_instances_of_each_object():
    scenes = {"s": {"dog": [(0.9, box_at(80, 50)), (0.6, box_at(10, 50))], "cat": [(0.8, box_at(45, 50))]}}
    im = scene_image("s")
    v = judge_of(scenes).judge(im, rel_q("dog", "left_of", "cat"))
    assert v.correct is True and v.answer == "yes" and "dog 0.60" in v.reason.split(";")[0]
    assert judge_of(scenes).judge(im, rel_q("dog", "right_of", "cat")).correct is True
    assert judge_of(scenes).judge(im, rel_q("dog", "above", "cat")).correct is False
    # GenEval's pairing compares the best box of each only: the 0.9 dog is right of the cat.
    top = judge_of(scenes, pairs="top")
    v = top.judge(im, rel_q("dog", "left_of", "cat"))
    assert v.correct is False and "is to the right of" in v.reason
    assert top.judge(im, rel_q("dog", "right_of", "cat")).correct is True


def test_relation_tie_at_the_margin_and_one_object_missing():
    scenes = {"tie": {"dog": [(0.9, box_at(42, 50))], "cat": [(0.9, box_at(50, 50))]},
              "past": {"dog": [(0.9, box_at(41, 50))], "cat": [(0.9, box_at(50, 50))]},
              "nocat": {"dog": [(0.9, box_at(10, 50))], "cat": [(0.2, box_at(80, 50))]}}
    judge = judge_of(scenes)
    q = rel_q("dog", "left_of", "cat")
    assert judge.judge(scene_image("tie"), q).correct is False
    assert judge.judge(scene_image("past"), q).correct is True
    assert judge_of(scenes, margin=0.0).judge(scene_image("tie"), q).correct is True
    v = judge.judge(scene_image("nocat"), q)
    assert v.correct is False and "missing cat" in v.reason


def test_relation_between_two_instances_of_one_noun():
    scenes = {"two": {"cat": [(0.9, box_at(10, 50)), (0.8, box_at(80, 50))]}, "one": {"cat": [(0.9, box_at(10, 50))]}}
    q = rel_q("cat", "left_of", "cat")
    for pairs in ("any", "top"):
        judge = judge_of(scenes, pairs=pairs)
        assert judge.judge(scene_image("two"), q).correct is True
        v = judge.judge(scene_image("one"), q)  # a box is never beside itself
        assert v.correct is False and v.reason.startswith("only one cat")


# --- attributes and what the judge cannot judge --------------------------------------------------------------


def test_colour_questions_are_skipped_without_clip_and_presence_is_judged():
    scenes = {"s": {"cup": [(0.9, [0, 0, 20, 20])], "plate": [(0.9, [50, 50, 90, 90])]}}
    judge = judge_of(scenes)
    colored = Question("attribute", (ObjectSpec("cup", "red"), ObjectSpec("plate", "blue")))
    reason = judge.supports(colored)
    assert reason and "need a CLIP" in reason and "red cup" in reason
    assert judge.supports(count_q("cup", 2, "red")) == reason.replace(", blue plate", "")
    with pytest.raises(InputError, match="need a CLIP"):
        judge.judge(scene_image("s"), colored)
    plain = Question("attribute", (ObjectSpec("cup"), ObjectSpec("plate")))
    assert judge.supports(plain) is None
    assert judge.judge(scene_image("s"), plain).correct is True
    missing = Question("attribute", (ObjectSpec("cup"), ObjectSpec("fork")))
    v = judge.judge(scene_image("s"), missing)
    assert v.correct is False and "missing fork" in v.reason
    assert "sizes" in judge.supports(Question("count", (ObjectSpec("cup", size="big"),), count=1))


def test_colours_by_clip_on_box_crops():
    red, blue = RGB["red"], RGB["blue"]
    boxes = {"cup": [(0.9, [0, 0, 20, 20]), (0.8, [30, 0, 50, 20])], "plate": [(0.9, [50, 50, 90, 90])]}
    scenes = {"s": boxes}
    im = scene_image("s", RGB["white"], [((0, 0, 20, 20), red), ((30, 0, 50, 20), blue), ((50, 50, 90, 90), blue)])
    clip = MeanColorClip()
    fake = FakeDetector(scenes)
    judge = DetectorJudge(fake, colors=ColorClassifier(clip))
    qs = [Question("attribute", (ObjectSpec("cup", "red"), ObjectSpec("plate", "blue"))),
          Question("attribute", (ObjectSpec("cup", "blue"), ObjectSpec("plate", "red"))),
          count_q("cup", 1, "red"), count_q("cup", 2), count_q("cup", 2, "blue")]
    assert all(judge.supports(q) is None for q in qs)
    verdicts = judge.judge_many([im] * len(qs), qs)
    assert [v.correct for v in verdicts] == [True, False, True, True, False]
    assert "missing red plate" in verdicts[1].reason and "red cup 0.90" in verdicts[0].reason
    assert fake.calls == [len(qs)]  # one detector call for the batch
    assert judge.supports(count_q("cup", 1, "gold")).startswith("colour(s) gold are not among")
    assert judge.identity()["clip"] == "fake-clip" and judge.identity()["colors"] == list(COLORS)


def test_identity_records_every_threshold_and_bad_values_are_input_errors():
    base = judge_of({})
    ident = base.identity()
    assert ident == {"name": "detector", "model": "fake", "query_template": "{noun}", "box_threshold": 0.3,
                     "nms_iou": 0.5, "margin": 0.1, "pairs": "any", "clip": None}
    for kw in ({"box_threshold": 0.2}, {"nms_iou": 0.7}, {"margin": 0.0}, {"pairs": "top"},
               {"query_template": "a {noun}"}):
        assert judge_of({}, **kw).identity() != ident
    for kw, msg in (({"box_threshold": 1.5}, "between 0 and 1"), ({"nms_iou": -0.1}, "between 0 and 1"),
                    ({"margin": -1}, "at least 0"), ({"pairs": "all"}, "unknown relation pairing"),
                    ({"query_template": "a cat"}, "must contain")):
        with pytest.raises(InputError, match=msg):
            judge_of({}, **kw)


# --- a tiny random OWL-ViT / OWLv2 through the real loading code ---------------------------------------------


@pytest.fixture(scope="module")
def owl_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("owl")
    return {v: build_tiny_owl(root / v, v) for v in ("owlvit", "owlv2")}


def noise_images(n, seed=0, size=(80, 64)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("version", ["owlvit", "owlv2"])
def test_tiny_owl_boxes_match_the_processors_post_processing(owl_paths, version):
    import torch

    det = ZeroShotDetector(str(owl_paths[version]), device="cpu")
    images = noise_images(2)
    queries = [["a photo of a cat", "a photo of a dog"]] * 2
    ours = det.detect(images, queries)
    inputs = det.processor(text=queries, images=images, return_tensors="pt")
    with torch.inference_mode():
        outputs = det.model(**inputs)
    w, h = images[0].size
    side = (max(w, h), max(w, h)) if version == "owlv2" else (h, w)  # OWLv2 boxes are fractions of the padded square
    theirs = det.processor.post_process_grounded_object_detection(outputs, threshold=-1.0, target_sizes=[side] * 2)
    for mine, ref in zip(ours, theirs, strict=True):
        assert len(mine) == (64 // 16) ** 2
        assert mine.labels.tolist() == ref["labels"].tolist()
        np.testing.assert_allclose(mine.scores, ref["scores"].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mine.xyxy, ref["boxes"].numpy(), rtol=1e-5, atol=1e-4)
    assert det.identity()["model_type"] == version and len(det.identity()["weights_sha256"]) == 64


def test_tiny_owl_judge_end_to_end_batched_like_one_by_one(owl_paths):
    judge = make_judge("detector", detector=str(owl_paths["owlvit"]), device="cpu", box_threshold=0.2, batch_size=2)
    ident = judge.identity()
    assert ident["name"] == "detector" and ident["model"] == str(owl_paths["owlvit"].resolve())
    assert ident["box_threshold"] == 0.2 and ident["query_template"] == "a photo of a {noun}"
    images = noise_images(5, seed=1)
    both = Question("attribute", (ObjectSpec("cat"), ObjectSpec("dog")))
    qs = [count_q("cat", 1), rel_q("cat", "left_of", "dog"), both, count_q("dog", 0), rel_q("dog", "above", "dog")]
    forwards = []
    hook = judge.detector.model.register_forward_hook(lambda *_: forwards.append(1))
    batched = judge.judge_many(images, qs)
    hook.remove()
    assert len(forwards) == math.ceil(5 / 2)  # one forward per batch of 2 images, the model loaded once
    assert all(isinstance(v, Verdict) and v.correct in (True, False) and v.reason for v in batched)
    one_by_one = [judge.judge(im, q) for im, q in zip(images, qs, strict=True)]
    assert [(v.correct, v.answer) for v in batched] == [(v.correct, v.answer) for v in one_by_one]
    # The count is what the rules make of the raw boxes, recomputed by brute force.
    raw = judge.detector.detect([images[0]], [["a photo of a cat"]])[0]
    above = [i for i in range(len(raw)) if raw.scores[i] > 0.2]
    sub = raw.take(np.asarray(above, int))
    assert batched[0].answer == str(len(brute_nms(sub, 0.5)))


def test_tiny_grounding_dino_scores_a_query_by_its_tokens(tmp_path):
    import torch

    from diffprobe.models.tiny import build_tiny_grounding_dino

    det = ZeroShotDetector(str(build_tiny_grounding_dino(tmp_path / "gd")), device="cpu")
    assert det.kind == "grounding-dino" and det.identity()["model_type"] == "grounding-dino"
    images = noise_images(3, seed=2, size=(60, 40))
    queries = [["cat"], ["red cat", "dog"], ["circle", "square", "triangle"]]
    ours = det.detect(images, queries)
    # By hand: the caption "red cat. dog." is [CLS] red cat . dog . [SEP]; "red cat" owns tokens 1-2, "dog" token 4.
    enc = det.processor.tokenizer(["red cat. dog."], return_tensors="pt")
    pix = det.processor.image_processor([images[1]], return_tensors="pt")
    with torch.inference_mode():
        out = det.model(**enc, **pix)
    per_query = torch.stack([out.logits[0][:, 1:3].amax(-1), out.logits[0][:, 4]], -1)
    best, label = per_query.max(-1)
    assert ours[1].labels.tolist() == label.tolist()
    np.testing.assert_allclose(ours[1].scores, best.sigmoid().numpy(), rtol=1e-5, atol=1e-6)
    cx, cy, w, h = out.pred_boxes[0].unbind(-1)
    np.testing.assert_allclose(ours[1].xyxy[:, 0], ((cx - w / 2) * 60).numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ours[1].xyxy[:, 3], ((cy + h / 2) * 40).numpy(), rtol=1e-5, atol=1e-4)
    # Batched like one by one, and the judge's default query is the bare noun.
    for batched, im, q in zip(ours, images, queries, strict=True):
        alone = det.detect([im], [q])[0]
        assert batched.labels.tolist() == alone.labels.tolist()
        np.testing.assert_allclose(batched.scores, alone.scores, rtol=1e-4, atol=1e-6)
    assert DetectorJudge(det).query_template == "{noun}"
    with pytest.raises(InputError, match="more than the 32"):
        det.detect(images[:1], [["cat"] * 20])


def test_missing_or_wrong_detector_is_a_clear_error(tmp_path, monkeypatch, owl_paths):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = r"'diffprobe-test/no-such-detector'.*HF_HUB_OFFLINE is set.*hf download"
    with pytest.raises(ModelNotFoundError, match=missing):
        ZeroShotDetector("diffprobe-test/no-such-detector", device="cpu")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        ZeroShotDetector(str(tmp_path), device="cpu")
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor a hub id"):
        ZeroShotDetector("no such thing", device="cpu")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(InputError, match="'clip' model; the detector judge runs owlvit"):
        ZeroShotDetector(str(tmp_path / "clip"), device="cpu")
    with pytest.raises(InputError, match="needs a detector model"):
        make_judge("detector")


# --- the CLI on a tiny shapes run -----------------------------------------------------------------------------

PROMPTS = [
    {"prompt": "two circles", "kind": "count", "objects": ["circle"], "count": 2},
    {"prompt": "a square to the left of a triangle", "kind": "relation", "objects": ["square", "triangle"],
     "relation": "left_of"},
    {"prompt": "a red square and a blue circle", "kind": "attribute", "objects": ["red square", "blue circle"]},
    {"prompt": "a big circle", "kind": "count", "objects": ["big circle"], "count": 1},
]


def invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def shapes_run(make_shapes_run):
    return make_shapes_run("detector-run", PROMPTS)


def test_cli_judges_a_run_with_the_tiny_detector_and_resumes(shapes_run, owl_paths, tmp_path):
    det = owl_paths["owlvit"]
    res = invoke(["judge", shapes_run, "--judge", "detector", "--detector", det, "--judge-device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "4 judged, 0 already judged, 4 skipped" in text
    assert "need a CLIP" in text and "does not judge sizes" in text
    rows = [json.loads(line) for line in (shapes_run / "scores" / "composition.jsonl").read_text().splitlines()]
    assert sorted(r["category"] for r in rows) == ["count 2", "count 2", "relation left_of", "relation left_of"]
    summary = json.loads((shapes_run / "scores" / "composition.json").read_text())
    assert summary["judge"]["name"] == "detector" and summary["judge"]["box_threshold"] == 0.3
    assert summary["skipped"] == 4 and summary["categories"]["all"]["n"] == 4

    again = invoke(["judge", shapes_run, "--judge", "detector", "--detector", det, "--judge-device", "cpu", "-q"])
    assert "0 judged, 4 already judged" in " ".join(again.output.split())
    other = invoke(["judge", shapes_run, "--judge", "detector", "--detector", det, "--judge-device", "cpu",
                    "--box-threshold", "0.9", "--margin", "0.2", "--nms-iou", "0.3", "-q"])
    assert "4 judged, 0 already judged" in " ".join(other.output.split())  # another identity: judged anew


def test_cli_with_a_clip_judges_colours(shapes_run, owl_paths, tmp_path):
    from test_clipscore import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    res = invoke(["judge", shapes_run, "--judge", "detector", "--detector", owl_paths["owlv2"], "--clip", clip,
                  "--judge-device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert "6 judged, 0 already judged, 2 skipped" in " ".join(res.output.split())
    summary = json.loads((shapes_run / "scores" / "composition.json").read_text())
    assert summary["categories"]["attribute"]["n"] == 2 and summary["judge"]["clip"].startswith("clip:")


def test_cli_detector_flag_mistakes_exit_2(shapes_run, tmp_path):
    res = invoke(["judge", shapes_run, "--judge", "detector"])
    assert res.exit_code == 2 and "needs --detector MODEL" in res.output
    res = invoke(["judge", shapes_run, "--detector", "x/y", "--margin", "0.2"])
    assert res.exit_code == 2 and "--detector, --margin belong to the detector judge" in res.output
    res = invoke(["judge", shapes_run, "--judge", "detector", "--detector", tmp_path / "missing"])
    assert res.exit_code == 2 and "neither a local folder nor a hub id" in res.output
    res = invoke(["judge", tmp_path, "--judge", "detector", "--detector", "x/y", "--judge-device", "nope"])
    assert res.exit_code == 2 and "is not a diffprobe run directory" in res.output  # before any model loads
    res = invoke(["judge", shapes_run, "--judge", "detector", "--detector", "x/y", "--judge-device", "nope"])
    assert res.exit_code == 2 and "unknown device 'nope'" in res.output
