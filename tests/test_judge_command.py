"""``diffprobe judge``: verdicts stored in the run (resumable, idempotent), per-image JSONL, per-category summary."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest
from typer.testing import CliRunner

from diffprobe.cli import app
from diffprobe.judges import make_judge
from diffprobe.judges.questions import question_dict, question_for
from diffprobe.metrics.stats import wilson
from diffprobe.prompts import Prompt
from diffprobe.store import VERDICTS_TABLE, VerdictRow, canonical_identity, open_run

PROMPTS = [
    {"prompt": "two red circles", "kind": "count", "objects": ["red circle"], "count": 2},
    {"prompt": "a blue square to the left of a yellow triangle", "kind": "relation",
     "objects": ["blue square", "yellow triangle"], "relation": "left_of"},
    {"prompt": "a blue square and a yellow triangle",
     "question": {"kind": "attribute", "objects": [{"noun": "square", "color": "blue"},
                                                   {"noun": "triangle", "color": "yellow"}]}},
    {"prompt": "a green circle"},  # no question: skipped with the reason
]
NO_QUESTION = "the prompt's source records no question"


def invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def image_hashes(run):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "images").glob("*/*.png"))}


def tables(run):
    with sqlite3.connect(f"{(run / 'run.sqlite').as_uri()}?mode=ro", uri=True) as conn:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.fixture(scope="module")
def run(make_shapes_run):
    return make_shapes_run("judge", PROMPTS)


def test_judge_stores_verdicts_resumes_and_summarizes(run, tmp_path):
    # Readers never create the verdicts table.
    store = open_run(run)
    assert store.verdicts() == {} and store.judged({"name": "shapes"}) == set()
    samples = store.samples()
    store.close()
    assert VERDICTS_TABLE not in tables(run)
    before = image_hashes(run)
    judge = make_judge("shapes")
    identity = judge.identity()
    assert identity == {"name": "shapes"}

    # A judge killed after its first batch: one verdict stored, which the next call keeps.
    first = next(s for s in samples if s.prompt == "two red circles")
    q, _ = question_for(Prompt(first.prompt, first.prompt_meta))
    v = judge.judge(first.image(), q)
    writer = open_run(run, write=True)
    writer.add_verdicts([VerdictRow(first.key, first.image_sha256, identity, question_dict(q), v.correct, v.answer,
                                    v.reason)])
    writer.close()

    out = tmp_path / "verdicts.jsonl"
    res = invoke(["judge", run, "--judge", "shapes", "--out", out, "-q"])
    assert res.exit_code == 0, res.output
    assert "5 judged, 1 already judged, 2 skipped" in " ".join(res.output.split())

    store = open_run(run)
    stored = store.judge_verdicts(identity)
    judgeable = [s for s in samples if s.prompt != "a green circle"]
    assert len(stored) == len(judgeable) == 6
    assert {v.key for v in stored} == {s.key for s in judgeable}
    assert all(v.correct in (True, False) and v.reason for v in stored)
    assert store.judged(identity) == {(v.image_sha256, canonical_identity(v.question)) for v in stored}

    # Per-image JSONL, GenEval-style.
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 6
    assert {"key", "prompt", "seed", "category", "correct", "answer", "reason"} <= set(rows[0])
    by_key = {v.key: v for v in stored}
    assert all(r["correct"] == by_key[r["key"]].correct and r["reason"] == by_key[r["key"]].reason for r in rows)

    # Summary against a hand count from the stored verdicts.
    summary = json.loads((run / "scores" / "composition.json").read_text(encoding="utf-8"))
    cats = summary["categories"]
    assert list(cats) == ["count 2", "attribute", "relation left_of", "all"]
    prompt_of = {s.key: s.prompt for s in samples}
    for name, prompt in [("count 2", "two red circles"), ("attribute", "a blue square and a yellow triangle"),
                         ("relation left_of", "a blue square to the left of a yellow triangle")]:
        mine = [v.correct for v in stored if prompt_of[v.key] == prompt]
        k = sum(mine)
        assert cats[name]["n"] == len(mine) == 2 and cats[name]["correct"] == k
        assert cats[name]["ci95"] == pytest.approx(list(wilson(k, 2)))
    assert cats["all"]["n"] == 6 and cats["all"]["correct"] == sum(v.correct for v in stored)
    assert cats["all"]["unparsed"] == 0
    assert summary["skipped"] == 2
    [(reason, n)] = summary["skipped_reasons"].items()
    assert n == 2 and reason.startswith(NO_QUESTION)
    assert NO_QUESTION in res.output and "skipped: 2 image(s)" in res.output

    # Export joins the verdicts onto each sample.
    exported = {r["key"]: r for r in store.export_rows()}
    store.close()
    for s in samples:
        vs = exported[s.key]["verdicts"]
        if s.prompt == "a green circle":
            assert vs == []
        else:
            assert len(vs) == 1 and bool(vs[0]["correct"]) == by_key[s.key].correct
            assert json.loads(vs[0]["judge"]) == identity

    # A second call judges nothing new and stores nothing twice; the images are untouched.
    again = invoke(["judge", run, "--judge", "shapes", "-q"])
    assert again.exit_code == 0, again.output
    assert "0 judged, 6 already judged, 2 skipped" in " ".join(again.output.split())
    store = open_run(run)
    assert len(store.judge_verdicts(identity)) == 6
    store.close()
    assert image_hashes(run) == before


def test_bad_inputs_are_one_line_and_exit_2(run, tmp_path):
    res = invoke(["judge", tmp_path / "nothing-here"])
    assert res.exit_code == 2 and "is not a diffprobe run directory" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = invoke(["judge", run, "--judge", "nope"])
    assert res.exit_code == 2 and "unknown judge 'nope'" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_wilson_interval_against_hand_computed_values():
    # 3 of 4, z = 1.96: centre (0.75 + z^2/8) / (1 + z^2/4), half-width z sqrt(3/64 + z^2/64) / (1 + z^2/4).
    lo, hi = wilson(3, 4)
    assert lo == pytest.approx(0.30064, abs=1e-4) and hi == pytest.approx(0.95441, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 2)[0] == 0.0 and wilson(0, 2)[1] == pytest.approx(0.65762, abs=1e-4)
