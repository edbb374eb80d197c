"""Questions from prompts: shapes suites, Comp90 numerical and spatial prompts, CC-500, explicit question files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffprobe.errors import InputError
from diffprobe.judges import ObjectSpec, Question
from diffprobe.judges import questions as qs_mod
from diffprobe.judges.questions import object_spec, parse_spatial, plural_of, question_dict, question_for
from diffprobe.prompts import Comp90Object, Prompt, comp90_numerical, load_suite, read_prompt_file


def test_shapes_suite_reuses_its_questions():
    from diffprobe.worlds.shapes import prompts as shapes_prompts

    originals = shapes_prompts("train")
    suite = load_suite("shapes-train")
    assert len(suite) == len(originals)
    for prompt, original in zip(suite, originals, strict=True):
        q, reason = question_for(prompt)
        assert q == original.question, prompt.text
        assert reason == "question recorded with the prompt"


def test_question_instance_in_meta():
    q = Question("count", (ObjectSpec("apple"),), count=2, text="two apples")
    assert question_for(Prompt("two apples", {"question": q})) == (q, "question recorded with the prompt")


def test_comp90_numerical_from_meta(tmp_path):
    (tmp_path / "objects_eval.txt").write_text("apple, an apple, apples\nteddy bear, a teddy bear, teddy bears\n")
    (tmp_path / "backgrounds_eval.txt").write_text("on a sunny beach\n")
    prompts = read_prompt_file(tmp_path / "objects_eval.txt")
    got = {p.text: question_for(p) for p in prompts}
    q, reason = got["three apples, on a sunny beach"]
    # the objects file's plural form travels with the object (the count template asks "How many apples ...")
    assert q == Question("count", (ObjectSpec("apple", plural="apples"),), count=3,
                         text="three apples, on a sunny beach")
    assert reason == "Comp90 numerical prompt"
    assert got["six teddy bears, on a sunny beach"][0].objects == (ObjectSpec("teddy bear", plural="teddy bears"),)
    assert {q.count for q, _ in got.values()} == {2, 3, 4, 5, 6}


def test_comp90_meta_reads_meta_not_text():
    # the text says "three" but the source recorded 4: the recorded count wins (no re-parsing of text)
    p = comp90_numerical([Comp90Object("apple", "an apple", "apples")], ["x"], counts=[4])[0]
    assert question_for(Prompt("three apples, x", p.meta))[0].count == 4


@pytest.mark.parametrize("meta", [{"object": "", "count": 2}, {"object": "apple", "count": -1},
                                  {"object": "apple", "count": "two"}, {"object": "apple", "count": True}])
def test_comp90_bad_meta(meta):
    with pytest.raises(InputError):
        question_for(Prompt("x", meta))


@pytest.mark.parametrize(("text", "relation", "a", "b", "background"), [
    ("a pineapple on the left of a monkey", "left_of", ObjectSpec("pineapple"), ObjectSpec("monkey"), None),
    ("A pineapple on the right of a monkey", "right_of", ObjectSpec("pineapple"), ObjectSpec("monkey"), None),
    ("a cat on the top of a table", "above", ObjectSpec("cat"), ObjectSpec("table"), None),
    ("an apple under a chair.", "below", ObjectSpec("apple"), ObjectSpec("chair"), None),
    ("a red apple to the left of a big blue box", "left_of", ObjectSpec("apple", "red"),
     ObjectSpec("box", "blue", "big"), None),
    ("a dog under a tree, on a sunny beach", "below", ObjectSpec("dog"), ObjectSpec("tree"), "on a sunny beach"),
    ("a mug on top of a book", "above", ObjectSpec("mug"), ObjectSpec("book"), None),
])
def test_parse_spatial(text, relation, a, b, background):
    q, phrase, bg = parse_spatial(text)
    assert (q.kind, q.relation, q.objects, bg) == ("relation", relation, (a, b), background)
    assert phrase in text.lower()


@pytest.mark.parametrize("text", ["three apples, on a sunny beach", "a pineapple and a monkey",
                                  "a pineapple on the left of", "pineapple left",
                                  "a very big old red car under a tree"])
def test_parse_spatial_rejects(text):
    assert parse_spatial(text) is None


def test_spatial_prompt_file(tmp_path):
    f = tmp_path / "spatial_prompts_eval.txt"
    f.write_text("a pineapple on the left of a monkey\n\nA banana on the right of a dog\na cup on the top of a "
                 "plate\na cat under a table\n", encoding="utf-8")
    prompts = qs_mod.read_spatial_prompts(f)
    got = [question_for(p) for p in prompts]
    assert [q.relation for q, _ in got] == ["left_of", "right_of", "above", "below"]
    assert [p.meta["relation_phrase"] for p in prompts] == ["on the left of", "on the right of", "on the top of",
                                                            "under"]
    assert got[0][0].objects == (ObjectSpec("pineapple"), ObjectSpec("monkey"))
    assert got[0][0].text == "a pineapple on the left of a monkey"
    json.dumps([p.meta for p in prompts])  # the meta is JSON-ready (it goes into the run store)


def test_spatial_prompt_file_names_the_bad_line(tmp_path):
    f = tmp_path / "spatial.txt"
    f.write_text("a pineapple on the left of a monkey\n\nthree apples\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"spatial.txt line 3: 'three apples'"):
        qs_mod.read_spatial_prompts(f)
    with pytest.raises(InputError, match="does not exist"):
        qs_mod.read_spatial_prompts(tmp_path / "missing.txt")


def test_cc500_attribute_questions():
    suite = load_suite("cc500")
    q, reason = question_for(suite[0])
    assert suite[0].text == "a green bench and a red car"
    assert q == Question("attribute", (ObjectSpec("bench", "green"), ObjectSpec("car", "red")),
                         text="a green bench and a red car")
    assert reason == "CC-500 noun phrases"
    results = [question_for(p) for p in suite]
    asked = [q for q, _ in results if q is not None]
    assert len(asked) > len(suite) // 2
    assert all(q.kind == "attribute" and len(q.objects) >= 2 for q in asked)
    skipped = [reason for q, reason in results if q is None]
    assert all("noun phrase" in r for r in skipped)


def test_cc500_style_rows():
    p = Prompt("a red book and a gold clock", {"noun_phrases": ["a red book", "a gold clock"],
                                                "nouns": ["book", "clock"]})
    assert question_for(p)[0].objects == (ObjectSpec("book", "red"), ObjectSpec("clock", "gold"))
    p = Prompt("a large blue teddy bear and a cat", {"noun_phrases": "a large blue teddy bear; a cat",
                                                     "nouns": "teddy bear; cat"})
    assert question_for(p)[0].objects == (ObjectSpec("teddy bear", "blue", "large"), ObjectSpec("cat"))
    q, reason = question_for(Prompt("x", {"noun_phrases": ["a book", "a cat"], "nouns": ["book"]}))
    assert q is None and "2 noun phrases but 1 nouns" in reason
    q, reason = question_for(Prompt("x", {"noun_phrases": ["wooden slats"], "nouns": ["slats"]}))
    assert q is None and "needs two noun phrases; the prompt has 1" in reason
    q, reason = question_for(Prompt("x", {"noun_phrases": ["a tiled shower , molded plastic bathtub", "a cat"],
                                          "nouns": ["bathtub", "cat"]}))
    assert q is None and "is not 'a [size] [attribute] <noun>'" in reason


def test_no_question():
    q, reason = question_for(Prompt("a photo of a dog", {"index": 3}))
    assert q is None and "records no question" in reason
    assert question_for(Prompt("a photo"))[0] is None


def test_object_spec():
    assert object_spec("a large red book") == ObjectSpec("book", "red", "large")
    assert object_spec("apple") == ObjectSpec("apple")
    assert object_spec("small apple") == ObjectSpec("apple", None, "small")
    assert object_spec("the old red car") is None
    assert object_spec("") is None and object_spec("a") is None


def _jsonl(tmp_path, rows):
    f = tmp_path / "questions.jsonl"
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return f


def test_question_file(tmp_path):
    f = _jsonl(tmp_path, [
        {"prompt": "three red apples", "kind": "count", "objects": ["red apple"], "count": 3, "id": 7},
        "",
        {"prompt": "a cat left of a dog", "kind": "relation", "objects": ["cat", {"noun": "dog", "color": "brown"}],
         "relation": "on the left of"},
        {"prompt": "a mug on a book", "kind": "relation", "objects": ["mug", "book"], "relation": "above"},
        {"prompt": "a red book and a gold clock", "kind": "attribute", "objects": ["red book", "gold clock"]},
        {"prompt": "two apples", "question": {"kind": "count", "objects": [{"noun": "apple"}], "count": 2}},
    ])
    prompts = qs_mod.read_question_prompts(f)
    qs = [question_for(p)[0] for p in prompts]
    assert qs[0] == Question("count", (ObjectSpec("apple", "red"),), count=3, text="three red apples")
    assert prompts[0].meta["id"] == 7 and "kind" not in prompts[0].meta
    assert qs[1].relation == "left_of" and qs[1].objects[1] == ObjectSpec("dog", "brown")
    assert qs[2].relation == "above"
    assert qs[3].kind == "attribute" and len(qs[3].objects) == 2
    assert qs[4].count == 2
    # read through the plain prompt reader, the same fields give the same questions
    assert [question_for(p)[0] for p in read_prompt_file(f)] == qs
    assert question_for(read_prompt_file(f)[0])[1] == "question fields of the prompt file"


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "x", "kind": "counting", "objects": ["apple"], "count": 2}, r"line 2: 'kind' must be one of"),
    ({"prompt": "x", "kind": "count", "objects": ["apple"]}, r"line 2: 'count' must be a non-negative integer"),
    ({"prompt": "x", "kind": "count", "objects": ["apple"], "count": -1}, r"line 2: 'count'"),
    ({"prompt": "x", "kind": "count", "objects": ["apple"], "count": 2.5}, r"line 2: 'count'"),
    ({"prompt": "x", "kind": "count", "objects": ["apple"], "count": True}, r"line 2: 'count'"),
    ({"prompt": "x", "kind": "count", "objects": ["apple", "pear"], "count": 2}, r"line 2: 'objects' must hold one"),
    ({"prompt": "x", "kind": "count", "objects": [], "count": 2}, r"line 2: 'objects' must be a list"),
    ({"prompt": "x", "kind": "count", "objects": [3], "count": 2}, r"line 2: 'objects'\[0\] must be a string"),
    ({"prompt": "x", "kind": "count", "objects": [{"color": "red"}], "count": 2}, r"'objects'\[0\] needs .*'noun'"),
    ({"prompt": "x", "kind": "count", "objects": [{"noun": "a", "shape": "b"}], "count": 2}, r"unknown key\(s\) shape"),
    ({"prompt": "x", "kind": "count", "objects": [{"noun": "a", "color": 1}], "count": 2}, r"\.color must be"),
    ({"prompt": "x", "kind": "count", "objects": ["the very old red car"], "count": 2}, r"'objects'\[0\]"),
    ({"prompt": "x", "kind": "relation", "objects": ["cat", "dog"], "relation": "near"}, r"line 2: 'relation' must be"),
    ({"prompt": "x", "kind": "relation", "objects": ["cat", "dog"]}, r"line 2: 'relation' must be"),
    ({"prompt": "x", "kind": "relation", "objects": ["cat"], "relation": "under"}, r"'objects' must hold two"),
    ({"prompt": "x", "kind": "attribute", "objects": ["cat"], "relation": "under"}, r"'relation' is only for"),
    ({"prompt": "x", "kind": "attribute", "objects": ["cat"], "count": 1}, r"'count' is only for"),
    ({"prompt": "x", "objects": ["cat"]}, r"line 2: no 'kind' field"),
    ({"prompt": "x", "question": 3}, r"line 2: no 'kind' field"),
])
def test_question_file_errors_name_line_and_field(tmp_path, row, message):
    good = {"prompt": "two apples", "kind": "count", "objects": ["apple"], "count": 2}
    f = _jsonl(tmp_path, [good, row])
    with pytest.raises(InputError, match=message):
        qs_mod.read_question_prompts(f)


def test_question_dict_round_trip():
    q = Question("relation", (ObjectSpec("cat", "red", "big"), ObjectSpec("dog")), relation="below", text="t")
    assert question_for(Prompt("t", {"question": question_dict(q)}))[0] == q
    assert question_for(Prompt("t", {"question": json.loads(json.dumps(question_dict(q)))}))[0] == q
    # a plural is kept where known, and absent from the dict otherwise (older questions keep their stored keys)
    assert "plural" not in question_dict(q)["objects"][0]
    counted = Question("count", (ObjectSpec("mouse", plural="mice"),), count=3, text="three mice")
    assert question_dict(counted)["objects"] == [{"noun": "mouse", "color": None, "size": None, "plural": "mice"}]
    stored = json.loads(json.dumps(question_dict(counted)))
    assert question_for(Prompt("three mice", {"question": stored}))[0] == counted


@pytest.mark.parametrize(("obj", "plural"), [
    (ObjectSpec("apple"), "apples"), (ObjectSpec("box"), "boxes"), (ObjectSpec("mouse"), "mice"),
    (ObjectSpec("knife"), "knives"), (ObjectSpec("strawberry"), "strawberries"), (ObjectSpec("bus"), "buses"),
    (ObjectSpec("sheep"), "sheep"), (ObjectSpec("person"), "people"), (ObjectSpec("teddy bear"), "teddy bears"),
    (ObjectSpec("circle", "red", "big"), "big red circles"),
    # the source's own plural wins over the dictionary's ("dice" is already plural in Comp90's file)
    (ObjectSpec("dice", plural="dice"), "dice"), (ObjectSpec("cottage", plural="cottages"), "cottages"),
])
def test_plural_of(obj, plural):
    assert plural_of(obj) == plural


def test_comp90_plural_reaches_the_question(tmp_path):
    (tmp_path / "objects_eval.txt").write_text("dice, a dice, dice\nmouse, a mouse, mice\n")
    (tmp_path / "backgrounds_eval.txt").write_text("on a sunny beach\n")
    plurals = {plural_of(question_for(p)[0].objects[0]) for p in read_prompt_file(tmp_path / "objects_eval.txt")}
    assert plurals == {"dice", "mice"}
    with pytest.raises(InputError, match="'plural' must be a non-empty string"):
        question_for(Prompt("x", {"object": "apple", "count": 2, "plural": 3}))


def test_question_file_objects_may_give_a_plural(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"prompt": "three geese", "kind": "count", "count": 3,
                             "objects": [{"noun": "goose", "plural": "geese"}]}) + "\n")
    [p] = qs_mod.read_question_prompts(f)
    q, _ = question_for(p)
    assert q.objects == (ObjectSpec("goose", plural="geese"),) and plural_of(q.objects[0]) == "geese"


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 30) | st.floats(allow_nan=False) |
                     st.sampled_from(["count", "relation", "attribute", "apple", "red apple", "under", "left_of", ""]),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                         st.sampled_from(["noun", "color", "size", "x"]), inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["kind", "objects", "count", "relation", "question", "object",
                                        "noun_phrases", "nouns"]), _JSON, max_size=5))
def test_any_meta_gives_a_question_a_reason_or_an_input_error(meta):
    try:
        q, reason = question_for(Prompt("p", meta))
    except InputError:
        return
    assert isinstance(reason, str) and reason
    assert q is None or isinstance(q, Question)
