"""Agreement of two judges (``diffprobe judge --agreement``), Cohen's kappa, and ``diffprobe score composition``."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from diffprobe.cli import app
from diffprobe.commands.agreement import LABELS, agreement_table, file_name
from diffprobe.commands.judge import build_judges, category_of
from diffprobe.errors import InputError
from diffprobe.judges import Judge, Verdict, judge_options, register_judge
from diffprobe.judges.questions import question_dict, question_for
from diffprobe.metrics.stats import cohen_kappa
from diffprobe.prompts import Prompt
from diffprobe.store import open_run
from diffprobe.worlds.shapes.judge import ShapesJudge

PROMPTS = [
    {"prompt": "two red circles", "kind": "count", "objects": ["red circle"], "count": 2},
    {"prompt": "a blue square to the left of a yellow triangle", "kind": "relation",
     "objects": ["blue square", "yellow triangle"], "relation": "left_of"},
    {"prompt": "a blue square and a yellow triangle", "kind": "attribute",
     "objects": ["blue square", "yellow triangle"]},
    {"prompt": "a green circle"},  # no question: skipped by both judges
]

# --- Cohen's kappa --------------------------------------------------------------------------------------------


def kappa_by_definition(a: list[str], b: list[str]) -> float | None:
    """Kappa from the two label lists, without a table: p_o = P(a_i == b_i), p_e = P(a_i == b_j) over all
    pairs (i, j) of items, i.e. two independent draws from the two raters' label distributions."""
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    p_e = sum(x == y for x in a for y in b) / (n * n)
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def test_kappa_hand_computed():
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15. p_o = 35/50 = 0.7;
    # A says yes 25/50, B 30/50: p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    assert cohen_kappa([[20, 5], [10, 15]]) == pytest.approx(0.4)
    assert cohen_kappa([[7, 0], [0, 3]]) == pytest.approx(1.0)
    # agreement exactly at chance: p_o = 0.5 = p_e
    assert cohen_kappa([[1, 1], [1, 1]]) == pytest.approx(0.0)
    # complete disagreement with balanced marginals: p_o = 0, p_e = 0.5 -> -1
    assert cohen_kappa([[0, 5], [5, 0]]) == pytest.approx(-1.0)
    # undefined: no items, or one label for everything from both raters (p_e = 1)
    assert cohen_kappa([[0, 0], [0, 0]]) is None
    assert cohen_kappa([[0, 0], [0, 9]]) is None
    # one rater constant, the other not: p_e = p_o, kappa 0
    assert cohen_kappa([[0, 0], [3, 9]]) == pytest.approx(0.0)


def test_kappa_matches_the_definition_on_random_tables():
    rng = np.random.default_rng(0)
    for trial in range(200):
        labels = "abcd"[:2 + trial % 3]
        n = int(rng.integers(1, 40))
        a = list(rng.choice(list(labels), n))
        # B copies A 60 % of the time, else draws at random: tables from near-agreement to chance
        b = [x if rng.random() < 0.6 else str(rng.choice(list(labels))) for x in a]
        table = [[sum(x == ra and y == cb for x, y in zip(a, b, strict=True)) for cb in labels] for ra in labels]
        want = kappa_by_definition(a, b)
        got = cohen_kappa(table)
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, abs=1e-12)


def test_kappa_rejects_a_bad_table():
    with pytest.raises(InputError, match="square"):
        cohen_kappa([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(InputError, match="negative"):
        cohen_kappa([[1, -1], [0, 2]])


def test_agreement_table_counts_and_unparsed():
    # the same 12 pairs as the end-to-end test below, worked out by hand there
    pairs = ([("correct", "correct")] * 4 + [("correct", "wrong")] + [("wrong", "correct")] * 2
             + [("wrong", "wrong")] * 3 + [("unparsed", "correct"), ("correct", "unparsed")])
    t = agreement_table(pairs)
    assert t["pairs"] == 12 and t["both_parsed"] == 10 and t["agree"] == 7
    assert t["accuracy"] == pytest.approx(0.7) and t["kappa"] == pytest.approx(0.4)
    assert t["kappa_unparsed_as_label"] == pytest.approx(7 / 27)
    assert t["unparsed"] == {"A": 1, "B": 1, "both": 0}
    assert t["confusion"]["correct"] == {"correct": 4, "wrong": 1, "unparsed": 1}
    assert t["confusion"]["unparsed"] == {"correct": 1, "wrong": 0, "unparsed": 0}
    empty = agreement_table([("unparsed", "correct")])
    assert empty["accuracy"] is None and empty["kappa"] is None and "no pair where both" in empty["note"]
    same = agreement_table([("wrong", "wrong")] * 3)
    assert same["accuracy"] == 1.0 and same["kappa"] is None and "one and the same verdict" in same["note"]


def test_file_name():
    assert file_name("vlm", "shapes") == "agreement_vlm_vs_shapes.json"
    assert file_name("a/b c", "") == "agreement_a-b-c_vs_judge.json"


# --- test-only judges -------------------------------------------------------------------------------------------

SCRIPT: dict[str, dict[str, bool | None]] = {"A": {}, "B": {}}  # pixel hash -> verdict, filled by the fixture


def pixel_hash(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


class Scripted(Judge):
    """Answers what SCRIPT says for each image: a judge with known verdicts, right or wrong on purpose."""

    def __init__(self, side: str, threshold: float | None = None):
        self.name, self.side, self.threshold = f"scripted-{side}", side, threshold

    def identity(self):
        return {"name": self.name, "threshold": self.threshold}

    def judge(self, image, question):
        correct = SCRIPT[self.side][pixel_hash(image)]
        return Verdict(correct, "scripted", f"scripted {self.side}", raw=None if correct is not None else "??")


class ShapesCopy(ShapesJudge):
    """The exact shapes judge under another identity: its verdicts must agree with the shapes judge's."""

    def identity(self):
        return {"name": "shapes", "copy": True}


register_judge("test-scripted-a", lambda threshold=None: Scripted("A", threshold))
register_judge("test-scripted-b", lambda: Scripted("B"))
register_judge("test-shapes-copy", ShapesCopy)

# Verdicts of A and B for the 12 judgeable images, in sample-key order: the 12 pairs of the hand-worked table above.
VERDICTS_A = [True] * 4 + [True] + [False] * 2 + [False] * 3 + [None, True]
VERDICTS_B = [True] * 4 + [False] + [True] * 2 + [False] * 3 + [True, None]


def invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(make_shapes_run):
    path = make_shapes_run("agreement", PROMPTS, seeds="0-3")
    store = open_run(path)
    samples = [s for s in store.samples() if s.prompt != "a green circle"]
    store.close()
    samples.sort(key=lambda s: s.key)
    assert len(samples) == 12
    hashes = [pixel_hash(s.image()) for s in samples]
    assert len(set(hashes)) == 12
    SCRIPT["A"] = dict(zip(hashes, VERDICTS_A, strict=True))
    SCRIPT["B"] = dict(zip(hashes, VERDICTS_B, strict=True))
    return path, samples


def category(sample) -> str:
    q, _ = question_for(Prompt(sample.prompt, sample.prompt_meta))
    return category_of(question_dict(q))


def test_agreement_of_scripted_judges_end_to_end(run):
    run_dir, samples = run
    res = invoke(["judge", "--agreement", run_dir, "--judge", "test-scripted-a", "--against", "test-scripted-b",
                  "-q"])
    assert res.exit_code == 0, res.output
    path = run_dir / "scores" / "agreement_test-scripted-a_vs_test-scripted-b.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    assert result["names"] == {"A": "test-scripted-a", "B": "test-scripted-b"}
    assert result["judges"]["A"] == {"name": "scripted-A", "threshold": None}
    overall = result["categories"]["all"]
    assert overall["pairs"] == 12 and overall["agree"] == 7 and overall["both_parsed"] == 10
    assert overall["kappa"] == pytest.approx(0.4) and overall["kappa_unparsed_as_label"] == pytest.approx(7 / 27)
    assert result["not_in_both"] == {"only_A": 0, "only_B": 0}
    # every skipped image is the prompt without a question, for both judges
    assert [sum(r.values()) for r in result["skipped"].values()] == [4, 4]

    # per category: the confusion table counted here from the script, kappa from its definition
    label = {True: "correct", False: "wrong", None: "unparsed"}
    expected: dict[str, list[tuple[str, str]]] = {}
    for s, a, b in zip(samples, VERDICTS_A, VERDICTS_B, strict=True):
        expected.setdefault(category(s), []).append((label[a], label[b]))
    assert set(result["categories"]) == set(expected) | {"all"}
    assert list(result["categories"])[-1] == "all"
    for name, pairs in expected.items():
        got = result["categories"][name]
        counts = Counter(pairs)
        assert got["confusion"] == {a: {b: counts[(a, b)] for b in LABELS} for a in LABELS}
        parsed = [(a, b) for a, b in pairs if "unparsed" not in (a, b)]
        assert got["both_parsed"] == len(parsed)
        if parsed:
            want = kappa_by_definition([a for a, _ in parsed], [b for _, b in parsed])
            assert (got["kappa"] is None) == (want is None)
            if want is not None:
                assert got["kappa"] == pytest.approx(want)

    # disagreements keep both judges' reasons; the output lists the table
    disagree = [r for r in result["per_image"] if r["A"] != r["B"]]
    assert len(disagree) == 5 and all(r["A_reason"] == "scripted A" and r["B_reason"] == "scripted B"
                                      for r in disagree)
    text = " ".join(res.output.split())
    assert "all: 7/10 agree (70.0 %" in text and "kappa 0.400" in text
    assert "confusion (rows: A, columns: B):" in res.output
    # export joins the per-image agreement (1 agree, 0 disagree; none where a judge did not parse)
    from diffprobe.commands.export import per_image_scores

    joined = {k: v[path.stem] for k, v in per_image_scores(run_dir)[0].items() if path.stem in v}
    assert sorted(joined.values()) == [0.0] * 3 + [1.0] * 7
    # judging for the agreement stored verdicts, so a second call judges nothing
    store = open_run(run_dir)
    assert len(store.judge_verdicts({"name": "scripted-A", "threshold": None})) == 12
    store.close()


def test_shapes_against_a_copy_agrees_fully_and_reuses_stored_verdicts(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "agree.json"
    res = invoke(["judge", "--agreement", run_dir, "--judge", "shapes", "--against", "test-shapes-copy", "-q",
                  "--out", out])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text(encoding="utf-8"))
    overall = result["categories"]["all"]
    assert overall["pairs"] == overall["agree"] == overall["both_parsed"] == 12
    assert overall["accuracy"] == 1.0
    confusion = overall["confusion"]
    assert confusion["correct"]["wrong"] == confusion["wrong"]["correct"] == 0
    if overall["kappa"] is None:  # every image got one verdict from both (a 2-step model rarely draws right)
        assert "one and the same verdict" in overall["note"]
    else:
        assert overall["kappa"] == pytest.approx(1.0)
    # an agreement run writes no composition summary; the shapes verdicts it stored are reused by 'judge'
    again = invoke(["judge", run_dir, "--judge", "shapes", "-q"])
    assert "0 judged, 12 already judged" in " ".join(again.output.split())


def test_agreement_errors_are_one_line(run):
    run_dir, _ = run
    cases = [
        (["--agreement", run_dir, "--judge", "shapes"], "--agreement needs --against NAME"),
        ([run_dir, "--against", "shapes"], "--against is for --agreement"),
        (["--agreement", run_dir, "--judge", "shapes", "--against", "shapes"], "same identity"),
        (["--agreement", run_dir, "--judge", "shapes", "--against", "nope"], "unknown judge 'nope'"),
    ]
    for args, text in cases:
        res = invoke(["judge", *args])
        assert res.exit_code == 2, res.output
        assert text in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_judge_options_go_to_the_judges_that_take_them():
    assert judge_options("test-scripted-a") == frozenset({"threshold"})
    assert judge_options("test-scripted-b") == frozenset()
    a, b = build_judges(["test-scripted-a", "test-scripted-b"], {"threshold": 0.5, "url": None})
    assert a.identity() == {"name": "scripted-A", "threshold": 0.5} and b.threshold is None
    with pytest.raises(InputError, match="option\\(s\\) threshold apply to no chosen judge"):
        build_judges(["test-scripted-b", "shapes"], {"threshold": 0.5})
    with pytest.raises(InputError, match="unknown judge"):
        judge_options("nope")


def test_score_composition_is_the_judge_summary(run, tmp_path):
    run_dir, _ = run
    res = invoke(["judge", run_dir, "--judge", "shapes", "-q"])
    assert res.exit_code == 0, res.output
    judged = json.loads((run_dir / "scores" / "composition.json").read_text(encoding="utf-8"))
    out = tmp_path / "composition.json"
    res = invoke(["score", "composition", run_dir, "--judge", "shapes", "--out", out, "-q"])
    assert res.exit_code == 0, res.output
    scored = json.loads(out.read_text(encoding="utf-8"))
    for key in ("metric", "judge", "categories", "skipped", "skipped_reasons", "per_image"):
        assert scored[key] == judged[key], key
    assert scored["metric"] == "composition"
    assert "all: " in res.output and f"wrote {out}" in " ".join(res.output.split())
    # the categories hold what the stored verdicts say, category by category
    store = open_run(run_dir)
    stored = store.judge_verdicts({"name": "shapes"})
    store.close()
    assert scored["categories"]["all"]["n"] == len(stored) == 12
    assert scored["categories"]["all"]["correct"] == sum(v.correct for v in stored)


def test_pairs_match_on_key_and_question():
    from diffprobe.commands.agreement import agreement

    q1, q2 = {"kind": "count", "count": 1}, {"kind": "count", "count": 2}
    row = {"prompt": "p", "seed": 0, "category": "count 1", "answer": "", "reason": ""}
    rows_a = [{**row, "key": "k1", "question": q1, "correct": True},
              {**row, "key": "k2", "question": q1, "correct": False},
              {**row, "key": "k3", "question": q1, "correct": True}]
    rows_b = [{**row, "key": "k1", "question": q1, "correct": True},
              {**row, "key": "k2", "question": q2, "correct": False},  # another question: not a pair
              {**row, "key": "k3", "question": q1, "correct": False}]
    got = agreement(rows_a, rows_b)
    assert got["not_in_both"] == {"only_A": 1, "only_B": 1}
    assert got["categories"]["all"]["pairs"] == 2 and got["categories"]["all"]["agree"] == 1
    assert [(r["key"], r["A"], r["B"], r["score"]) for r in got["per_image"]] == [
        ("k1", "correct", "correct", 1.0), ("k3", "correct", "wrong", 0.0)]
    unparsed = agreement([{**rows_a[0], "correct": None}], rows_b[:1])["per_image"][0]
    assert "score" not in unparsed and (unparsed["A"], unparsed["B"]) == ("unparsed", "correct")


def test_kappa_is_symmetric_in_the_two_raters():
    """Every 2 x 2 table of counts 0..2: the transposed table (raters swapped) gives the same kappa."""
    for table in itertools.product(range(3), repeat=4):
        m = np.array(table).reshape(2, 2)
        k1, k2 = cohen_kappa(m), cohen_kappa(m.T)
        assert (k1 is None) == (k2 is None)
        if k1 is not None:
            assert k1 == pytest.approx(k2)
