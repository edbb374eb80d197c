"""The VLM judge against a loopback OpenAI-compatible server that answers with the exact shapes judge.

Every server here is started by the test on 127.0.0.1 (port 0) and stopped by it; retries use a recorded sleep or
Retry-After 0, so no test waits for a backoff.
"""

from __future__ import annotations

import json
import socket
import sqlite3

import pytest
from typer.testing import CliRunner

from diffprobe.cli import app
from diffprobe.commands.judge import BATCH, default_batch_size
from diffprobe.errors import InputError
from diffprobe.judges import make_judge
from diffprobe.judges.base import ObjectSpec, Question
from diffprobe.judges.oracle_server import Faults, OracleServer, QuestionReader, pixel_digest
from diffprobe.judges.questions import question_dict
from diffprobe.judges.vlm import JudgeServerError, VLMJudge, parse_template_option, resolve_template
from diffprobe.spec import RunSpec, SamplerSpec
from diffprobe.store import VERDICTS_TABLE, NewSample, create_run, open_run
from diffprobe.worlds.shapes.grammar import CATEGORIES, make_scene
from diffprobe.worlds.shapes.judge import ShapesJudge
from diffprobe.worlds.shapes.render import render

KEY = "sk-test-7f3a9c1e-secret"
KEY_ENV = "DIFFPROBE_TEST_JUDGE_KEY"


def invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def scenes(per_category: int = 5):
    """(image, question) pairs from the shapes world: each scene with its own caption's question, and every third
    with the next scene's question instead (so some answers are wrong)."""
    made = [make_scene("eval", c, i) for c in CATEGORIES for i in range(per_category)]
    out = []
    for i, (scene, prompt) in enumerate(made):
        q = made[(i + 1) % len(made)][1].question if i % 3 == 2 else prompt.question
        out.append((render(scene, 64), prompt.caption if i % 3 != 2 else made[(i + 1) % len(made)][1].caption, q))
    return out


@pytest.fixture(scope="module")
def items():
    return scenes()


@pytest.fixture
def run(tmp_path, items):
    """A run holding the rendered scenes (and one prompt with no question) without a model."""
    path = tmp_path / "run"
    prompts = sorted({(caption, q) for _, caption, q in items}, key=lambda p: p[0])
    spec = RunSpec(prompts=[p for p, _ in prompts] + ["a green circle"], seeds=[0], sampler=SamplerSpec(steps=1))
    with create_run(path, spec) as store:
        store.add_prompts([(caption, {"question": question_dict(q)}) for caption, q in prompts]
                          + [("a green circle", {})])
        store.add([NewSample(key=f"k{i:03d}", prompt=caption, seed=i, image=image, guidance={"name": "cfg"},
                             provenance={}) for i, (image, caption, _) in enumerate(items)]
                  + [NewSample(key="none", prompt="a green circle", seed=0, image=items[0][0],
                               guidance={"name": "cfg"}, provenance={})])
    return path


@pytest.fixture
def server():
    with OracleServer(model="oracle") as s:
        yield s


def vlm_flags(server_or_url, *extra):
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.url
    return ["--judge", "vlm", "--judge-url", url, "--judge-model", "oracle", "-q", *extra]


def stored(run, identity=None):
    with open_run(run) as store:
        if identity is None:
            return store.verdicts()
        return store.judge_verdicts(identity)


def verdict_rows(run):
    with sqlite3.connect(f"{(run / 'run.sqlite').as_uri()}?mode=ro", uri=True) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name=?", (VERDICTS_TABLE,)).fetchone():
            return 0
        return conn.execute(f"SELECT COUNT(*) FROM {VERDICTS_TABLE}").fetchone()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- questions, templates, identity ------------------------------------------------------------------------


def test_question_text():
    judge = VLMJudge("http://127.0.0.1:1/v1", "m")
    count = Question("count", (ObjectSpec("circle", "red", "small"),), count=3)
    assert judge.question_text(count) == "Answer in one sentence: How many small red circles are in this image?"
    mice = Question("count", (ObjectSpec("mouse"),), count=2)
    assert judge.question_text(mice) == "Answer in one sentence: How many mice are in this image?"
    given = Question("count", (ObjectSpec("fish", plural="fishes"),), count=2)  # a plural the prompt file gave
    assert judge.question_text(given) == "Answer in one sentence: How many fishes are in this image?"
    rel = Question("relation", (ObjectSpec("apple"), ObjectSpec("owl", "orange")), relation="left_of")
    assert judge.question_text(rel) == "Answer yes or no: Is there an apple to the left of an orange owl in this image?"
    attr = Question("attribute", (ObjectSpec("book", "red"), ObjectSpec("clock", "gold"), ObjectSpec("egg")))
    assert judge.question_text(attr) == \
        "Answer yes or no: Does this image contain a red book, a gold clock and an egg?"
    custom = VLMJudge("http://h/v1", "m", templates={"count": "number-count", "relation": "Is {a} {relation} {b}?"})
    assert custom.question_text(count) == "How many small red circles are in this image? Answer with a single number."
    assert custom.question_text(rel) == "Is an apple to the left of an orange owl?"
    # The oracle reads every template's text back into the question it came from.
    reader = QuestionReader({"relation": "Is {a} {relation} {b}?"})
    assert reader.read(custom.question_text(rel)) == Question("relation", rel.objects, relation="left_of")
    assert reader.read(judge.question_text(attr)) == Question("attribute", attr.objects)
    assert reader.read(custom.question_text(count)) == Question("count", count.objects, count=0)


def test_template_errors_name_the_fix():
    with pytest.raises(InputError, match="unknown count template 'nope'.*rrs-count"):
        resolve_template("count", "nope")
    with pytest.raises(InputError, match="is for relation questions, not count"):
        resolve_template("count", "yes-no-relation")
    with pytest.raises(InputError, match=r"uses 'count'.*\{plural\}"):
        resolve_template("count", "Are there {count} {plural}?")  # the answer must not be in the question
    with pytest.raises(InputError, match="not a valid template"):
        resolve_template("count", "How many {plural?")
    with pytest.raises(InputError, match="KIND=NAME"):
        parse_template_option("count")
    assert parse_template_option("count=How many {plural}? Count them.") == ("count", "How many {plural}? Count them.")


def test_identity_keys_what_changes_answers_and_nothing_else(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    base = VLMJudge("http://127.0.0.1:8000/v1", "qwen", api_key_env=KEY_ENV)
    ident = base.identity()
    assert ident == {"name": "vlm", "model": "qwen", "parser": "strict", "temperature": 0.0, "top_p": None,
                     "max_tokens": 300, "detail": None,
                     "templates": {"attribute": "Answer yes or no: Does this image contain {objects}?",
                                   "count": "Answer in one sentence: How many {plural} are in this image?",
                                   "relation": "Answer yes or no: Is there {a} {relation} {b} in this image?"}}
    # Another host, concurrency, timeout or key: the same answers, the same stored verdicts.
    assert VLMJudge("http://gpu-box:9000/v1/", "qwen", concurrency=2, timeout=5).identity() == ident
    assert KEY not in json.dumps(ident)
    for other in (dict(model="llava"), dict(parser="rrs-substring"), dict(temperature=0.8), dict(max_tokens=2048),
                  dict(templates={"count": "number-count"}), dict(top_p=0.8), dict(detail="low")):
        changed = VLMJudge("http://127.0.0.1:8000/v1", **{"model": "qwen", **other}).identity()
        assert changed != ident, other


def test_parsers_read_the_answer():
    judge = VLMJudge("http://h/v1", "m")
    substring = VLMJudge("http://h/v1", "m", parser="rrs-substring")
    two = Question("count", (ObjectSpec("apple"),), count=2)
    assert judge.verdict(two, "There are two apples.").correct is True
    assert judge.verdict(two, "I can see 12 apples.").correct is False
    assert substring.verdict(two, "I can see 12 apples.").correct is True  # P2: "2" is inside "12"
    unparsed = judge.verdict(two, "There are two groups of three apples.")
    assert unparsed.correct is None and "unparsed" in unparsed.reason
    assert unparsed.raw == "There are two groups of three apples."
    rel = Question("relation", (ObjectSpec("apple"), ObjectSpec("owl")), relation="below")
    assert judge.verdict(rel, "No, the apple is above the owl.").correct is False
    assert judge.verdict(rel, "The apple is below.").correct is None


# --- end to end through the oracle server ------------------------------------------------------------------


def test_vlm_judge_agrees_with_the_exact_judge(server, items):
    exact = ShapesJudge()
    judge = VLMJudge(server.url, "oracle", concurrency=4)
    images, questions = [im for im, _, _ in items], [q for _, _, q in items]
    got = judge.judge_many(images, questions)
    want = [exact.judge(im, q) for im, q in zip(images, questions, strict=True)]
    assert [v.correct for v in got] == [w.correct for w in want]
    assert 0 < sum(w.correct for w in want) < len(want)  # both outcomes occur
    counts = [(v, w) for v, w, q in zip(got, want, questions, strict=True) if q.kind == "count"]
    assert counts and all(v.answer == w.answer for v, w in counts)  # the same count read back from a sentence
    assert all(v.raw and v.raw in v.reason for v in got)
    # Every request carried greedy decoding and one question; connections were reused, 4 ran at once at most.
    asked = server.asked[1:]  # after the preflight
    assert len(asked) == len(items) and {a.pixels for a in asked} == {pixel_digest(im) for im in images}
    assert all(dict(a.params) == {"temperature": 0.0, "max_tokens": 300} for a in asked)
    assert server.connections <= 4 and server.max_in_flight <= 4

    # A server that answers wrongly: yes/no swapped, counts one too many; the verdicts follow.
    server.faults.wrong = True
    flipped = judge.judge_many(images, questions)
    for v, w, q in zip(flipped, want, questions, strict=True):
        expect = (int(w.answer) + 1 == q.count) if q.kind == "count" else not w.correct
        assert v.correct == expect
    judge.close()


def test_requests_run_concurrently(server, items):
    server.faults.delay = 0.2  # long enough that requests overlap
    judge = VLMJudge(server.url, "oracle", concurrency=4)
    judge.judge_many([im for im, _, _ in items[:8]], [q for _, _, q in items[:8]])
    assert server.max_in_flight == 4 and server.connections <= 4
    assert default_batch_size(judge) == 16 and default_batch_size(VLMJudge(server.url, "o", concurrency=10)) == 40
    assert default_batch_size(ShapesJudge()) == BATCH
    judge.close()


def test_transient_faults_are_retried(server, items):
    slept = []
    judge = VLMJudge(server.url, "oracle", concurrency=1, retries=5, backoff=0.5, sleep=slept.append)
    judge.preflight()
    server.faults = Faults(drop=1, status_500=1, status_429=2, retry_after="3", malformed=1)
    images, questions = [im for im, _, _ in items[:3]], [q for _, _, q in items[:3]]
    got = judge.judge_many(images, questions)
    exact = ShapesJudge()
    assert [v.correct for v in got] == [exact.judge(im, q).correct for im, q in zip(images, questions, strict=True)]
    # First request: dropped (backoff 0.5 x 2^0 x [1, 2)), 500 (x 2^1), 429 twice (Retry-After 3 s), malformed.
    assert len(slept) == 5
    assert 0.5 <= slept[0] < 1.0 and 1.0 <= slept[1] < 2.0 and slept[2:4] == [3.0, 3.0] and 8.0 <= slept[4] < 16
    judge.close()


def test_lasting_failure_is_one_clear_error_and_stores_nothing(server, run):
    server.faults = Faults(status_429=10_000, retry_after="0")
    judge = VLMJudge(server.url, "oracle", retries=2)
    with pytest.raises(JudgeServerError, match=r"judge server at .*/chat/completions failed \(3 tries; last: HTTP "
                                               r"429\)"):
        judge.judge(*scenes(1)[0][::2])
    res = invoke(["judge", run, *vlm_flags(server, "--retries", "2")])
    assert res.exit_code == 2 and res.output.startswith("error:") and server.url in flat(res.output)
    assert "Traceback" not in res.output and verdict_rows(run) == 0


def test_unparseable_answers_are_unparsed_verdicts(server, run):
    server.faults.unparseable = True
    res = invoke(["judge", run, *vlm_flags(server)])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "scores" / "composition.json").read_text(encoding="utf-8"))
    everything = summary["categories"]["all"]
    assert everything["unparsed"] == everything["images"] == 20 and everything["n"] == 0
    verdicts = stored(run, make_judge("vlm", url=server.url, model="oracle").identity())
    assert len(verdicts) == 20 and all(v.correct is None for v in verdicts)
    assert all(v.raw == "I am not sure what this image shows." and "unparsed" in v.reason for v in verdicts)
    assert "20 unparsed" in res.output


def test_cli_judges_resumes_after_the_server_dies_and_never_asks_twice(run, items, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    exact = invoke(["judge", run, "--judge", "shapes", "-q"])
    assert exact.exit_code == 0, exact.output
    shapes_verdicts = {v.key: v.correct for v in stored(run, {"name": "shapes"})}
    flags = ["--api-key-env", KEY_ENV, "--concurrency", "1", "--batch-size", "4", "--retries", "1"]
    # The server dies after the preflight and 9 answers: two batches of 4 are stored, the third is lost.
    with OracleServer(model="oracle", api_key=KEY, faults=Faults(die_after=10)) as first:
        res = invoke(["judge", run, *vlm_flags(first, *flags)])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"judge server at {first.url}" in flat(res.output) and "stored verdicts are kept" in flat(res.output)
    identity = VLMJudge("http://x/v1", "oracle").identity()
    kept = stored(run, identity)
    assert len(kept) == 8
    with open_run(run) as store:
        pixels = {s.key: pixel_digest(s.image()) for s in store.samples()}
    # Another host and port: the same identity, so the re-run asks only for the 12 images not yet judged.
    with OracleServer(model="oracle", api_key=KEY) as second:
        res = invoke(["judge", run, *vlm_flags(second, *flags)])
        assert res.exit_code == 0, res.output
        assert "12 judged, 8 already judged, 1 skipped" in flat(res.output)
        asked = [a.pixels for a in second.asked[1:]]
    assert len(asked) == 12 and set(asked) == {pixels[k] for k in shapes_verdicts} - {pixels[v.key] for v in kept}
    final = stored(run, identity)
    assert {v.key: v.correct for v in final} == shapes_verdicts  # 100 % agreement with the exact judge
    # A third run asks nothing (not even a preflight) and stores nothing twice.
    with OracleServer(model="oracle", api_key=KEY) as third:
        res = invoke(["judge", run, *vlm_flags(third, *flags)])
        assert res.exit_code == 0 and "0 judged, 20 already judged" in flat(res.output) and third.asked == []
    assert len(stored(run, identity)) == 20
    # The key is nowhere: not in the store, the score files, the identity or what the command printed.
    for path in [*run.rglob("*.sqlite*"), *(run / "scores").iterdir()]:
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in res.output


@pytest.mark.parametrize("case", ["unreachable", "no-key", "wrong-key", "wrong-model", "wrong-model-no-listing",
                                  "not-json", "not-the-api"])
def test_preflight_errors_are_one_line_and_store_nothing(run, case, monkeypatch):
    monkeypatch.delenv("DIFFPROBE_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv(KEY_ENV, "sk-wrong" if case == "wrong-key" else KEY)
    server = OracleServer(model="oracle", api_key=KEY if case in ("no-key", "wrong-key") else None,
                          faults=Faults(not_json=case == "not-json", no_models=case == "wrong-model-no-listing"))
    with server:
        url = {"unreachable": f"http://127.0.0.1:{free_port()}/v1", "not-the-api": server.url[:-3]}.get(case,
                                                                                                       server.url)
        model = "nope" if case.startswith("wrong-model") else "oracle"
        env = [] if case == "no-key" else ["--api-key-env", KEY_ENV]
        res = invoke(["judge", run, "--judge", "vlm", "--judge-url", url, "--judge-model", model, "-q", *env])
    out = flat(res.output)
    assert res.exit_code == 2 and out.startswith("error:") and len(res.output.strip().splitlines()) == 1, out
    assert url in out and "Traceback" not in res.output and KEY not in out and "sk-wrong" not in out
    expected = {"unreachable": "cannot reach the judge server", "no-key": "wants an API key (HTTP 401); put it in "
                "the environment variable DIFFPROBE_JUDGE_API_KEY", "wrong-key": f"refused the API key from ${KEY_ENV}",
                "wrong-model": "does not serve model 'nope'; it serves: oracle",
                "wrong-model-no-listing": "does not serve model 'nope'", "not-json": "is not JSON",
                "not-the-api": "usually ending in /v1"}[case]
    assert expected in out
    assert verdict_rows(run) == 0


def test_flags_are_checked_before_any_work(run, tmp_path):
    for args, message in [
        (["--judge", "shapes", "--judge-url", "http://h/v1", "--temperature", "0.8"],
         "--judge-url, --temperature belong to the VLM judge; add --judge vlm"),
        (["--judge", "vlm", "--judge-model", "m"], "needs the server's URL"),
        (["--judge", "vlm", "--judge-url", "h:8000", "--judge-model", "m"], "is not an http(s) URL"),
        (["--judge", "vlm", "--judge-url", "http://h/v1", "--judge-model", "m", "--temperature", "3"],
         "--temperature must be between 0 and 2"),
        (["--judge", "vlm", "--judge-url", "http://h/v1", "--judge-model", "m", "--parser", "loose"],
         "unknown answer parser 'loose'"),
        (["--judge", "vlm", "--judge-url", "http://h/v1", "--judge-model", "m", "--template", "count=x"],
         "unknown count template 'x'"),
        (["--judge", "vlm", "--judge-url", "http://h/v1", "--judge-model", "m", "--concurrency", "0"],
         "--concurrency must be at least 1"),
        (["--judge", "vlm", "--judge-url", "http://h/v1", "--judge-model", "m", "--api-key-env", "MY KEY"],
         "is not an environment variable name"),
    ]:
        res = invoke(["judge", run, "-q", *args])
        assert res.exit_code == 2 and message in flat(res.output), (args, res.output)
    assert verdict_rows(run) == 0


def test_decoding_flags_reach_the_server_and_the_identity(server, run):
    res = invoke(["judge", run, *vlm_flags(server, "--temperature", "0.8", "--max-tokens", "64", "--parser",
                                           "rrs-substring", "--template", "count=number-count", "--image-detail",
                                           "low")])
    assert res.exit_code == 0, res.output
    asked = server.asked[1:]
    assert len(asked) == 20
    assert all(dict(a.params) == {"temperature": 0.8, "max_tokens": 64, "detail": "low"} for a in asked)
    assert any(a.text.endswith("Answer with a single number.") for a in asked)
    [identity] = [json.loads(j) for j in {v["judge"] for vs in stored(run).values() for v in vs}]
    assert identity["temperature"] == 0.8 and identity["parser"] == "rrs-substring" and identity["max_tokens"] == 64
    assert identity["detail"] == "low"
    assert identity["templates"]["count"].endswith("Answer with a single number.")
    summary = json.loads((run / "scores" / "composition.json").read_text(encoding="utf-8"))
    assert summary["judge"] == identity


def test_slow_replies_time_out_and_are_retried(server, items):
    slept = []
    judge = VLMJudge(server.url, "oracle", timeout=0.3, retries=1, sleep=slept.append)
    judge.preflight()
    server.faults.delay = 1.0
    with pytest.raises(JudgeServerError, match=r"failed \(2 tries; last: no answer within 0.3 s\)"):
        judge.judge(items[0][0], items[0][2])
    assert len(slept) == 1
    server.faults.delay = 0.0
    assert judge.judge(items[0][0], items[0][2]).correct == ShapesJudge().judge(items[0][0], items[0][2]).correct
    judge.close()


def test_agreement_of_the_vlm_judge_with_the_exact_judge(server, run):
    res = invoke(["judge", run, "--agreement", "--judge", "vlm", "--judge-url", server.url, "--judge-model", "oracle",
                  "--against", "shapes", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "scores" / "agreement_vlm_vs_shapes.json").read_text(encoding="utf-8"))
    everything = report["categories"]["all"]
    assert everything["agree"] == everything["both_parsed"] == 20 and everything["accuracy"] == 1.0
    assert everything["kappa"] == pytest.approx(1.0)
    # A server that swaps yes and no, judged under another identity (a new parser): relations and attributes
    # now all disagree with the exact judge.
    server.faults.wrong = True
    res = invoke(["judge", run, "--agreement", "--judge", "vlm", "--judge-url", server.url, "--judge-model", "oracle",
                  "--parser", "rrs-eval", "--against", "shapes", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "scores" / "agreement_vlm_vs_shapes.json").read_text(encoding="utf-8"))
    for name, c in report["categories"].items():
        if name.startswith(("relation", "attribute")):
            assert c["agree"] == 0 and c["both_parsed"] > 0, name


def test_each_judge_gets_only_its_own_options():
    from diffprobe.commands.judge import build_judges
    from diffprobe.judges import judge_options

    vlm, detector = judge_options("vlm"), judge_options("detector")
    assert {"url", "model", "templates", "parser", "temperature", "concurrency"} <= vlm and "detector" not in vlm
    assert {"detector", "box_threshold", "clip"} <= detector and not {"url", "model", "templates"} & detector
    made_vlm, made_shapes = build_judges(["vlm", "shapes"], {"url": "http://h/v1", "model": "m", "temperature": 0.5})
    assert made_vlm.identity()["temperature"] == 0.5 and made_shapes.identity() == {"name": "shapes"}
    with pytest.raises(InputError, match="apply to no chosen judge"):
        build_judges(["shapes"], {"url": "http://h/v1"})
