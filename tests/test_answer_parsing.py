"""The strict answer parser and the reliable-seeds substring (mining) and regex (evaluation) rules, on a table of
real-looking VLM answers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffprobe.errors import InputError
from diffprobe.judges.answers import PARSERS, get_parser, parse_count, parse_count_rrs_eval, parse_yes_no

# (answer, expected count, strict parse_count, substring rule's verdict for the expected count)
COUNT_TABLE = [
    ("There are two groups of three apples.", 3, None, True),
    ("There are two groups of three apples.", 2, None, True),
    ("12", 2, 12, True),
    ("12", 12, 12, True),
    ("2D shapes", 2, None, True),
    ("sixteen", 6, 16, True),
    ("sixteen", 16, 16, True),
    ("No apples are visible.", 0, 0, False),
    ("No apples are visible.", 2, 0, False),
    ("I can see 3.", 3, 3, True),
    ("three or four", 3, None, True),
    ("three or four", 4, None, True),
    ("There is a single apple.", 1, 1, False),
    ("Two.", 2, 2, True),
    ("There are 2 apples in this image.", 2, 2, True),
    ("None.", 0, 0, False),
    ("There are three apples in this image.", 3, 3, True),
    ("There are three apples in this image.", 4, 3, False),
    ("The image shows five bananas on a sunny beach.", 5, 5, True),
    ("There are 4 cats in the image.", 4, 4, True),
    ("I count six oranges.", 6, 6, True),
    ("Six", 6, 6, True),
    ("6", 6, 6, True),
    ("There are 3 (three) apples.", 3, 3, True),
    ("There are three apples. The three apples are red.", 3, 3, True),
    ("There is an apple.", 1, 1, False),
    ("There's an apple on the table.", 1, 1, False),
    ("An apple.", 1, 1, False),
    ("There is only one dog in this image.", 1, 1, True),
    ("There is a bowl of apples.", 3, None, False),
    ("There are several apples in this image.", 3, None, False),
    ("There are many apples on a snowy mountain.", 4, None, False),
    ("There are a few apples.", 3, None, False),
    ("There are at least 3 apples.", 3, None, True),
    ("More than two apples are visible.", 2, None, True),
    ("There are 3-4 apples.", 3, None, True),
    ("There are 2 to 3 apples.", 2, None, True),
    ("There are 2.5 apples.", 2, None, True),
    ("No, there are 3 apples.", 3, 3, True),
    ("No.", 0, 0, False),
    ("There are no apples in this image.", 0, 0, False),
    ("There are zero apples.", 0, 0, True),
    ("There are none.", 0, 0, False),
    ("THERE ARE FOUR APPLES.", 4, 4, True),
    ("There are 3D rendered apples, 4 of them.", 4, 4, True),
    ("There are 3D rendered apples, 4 of them.", 3, 4, True),  # "3" inside "3D"
    ("Someone placed apples here.", 1, None, True),  # "one" inside "someone": a substring hit, not a count
    ("The apples are often red.", 10, None, True),  # "ten" inside "often"
    ("There are twenty apples.", 2, 20, False),  # "twenty" holds neither "two" nor "2"
    ("There are 1,000 apples.", 1000, 1000, False),  # "1000" is not in "1,000"
    ("I'm sorry, I cannot determine the number of apples.", 2, None, False),
    ("", 2, None, False),
    ("There are 5 apples on 2 plates.", 5, None, True),
    ("There are seven apples, about seven.", 7, 7, True),
    ("The image contains a red apple.", 1, 1, False),
    ("Eleven apples are in the image.", 11, 11, True),
    ("There is not a single apple in this image.", 0, 0, False),
    ("Not one apple is visible.", 1, 0, True),
    ("There aren't three apples, I see four.", 4, None, True),
    ("There are not 3 apples.", 3, None, True),
    ("I see 2, maybe 3 apples in the image.", 3, None, True),
    ("Apart from 2 bowls, the image shows 3 apples.", 3, None, True),
    ("There are no objects in this image.", 0, 0, False),
    ("There are seventeen apples.", 7, 17, True),
]

# What the official evaluation's regex rules (``rrs-eval``) read from each answer above, worked out by hand: the
# first rule that matches ("there are/is N", "N ... in the image", "the image shows N", then N anywhere), N being
# digits or one..ten with no word boundaries; no number: 0 if "no" and "object"/"item" occur, else None.
EVAL_TABLE = {
    "There are two groups of three apples.": 2,  # "there are two"
    "12": 12,
    "2D shapes": 2,
    "sixteen": 6,  # "six" inside "sixteen"
    "No apples are visible.": None,  # no "object"/"item", so the "no" rule does not apply
    "I can see 3.": 3,
    "three or four": 3,
    "There is a single apple.": None,
    "Two.": 2,
    "There are 2 apples in this image.": 2,
    "None.": 1,  # "one" inside "none"
    "There are three apples in this image.": 3,
    "The image shows five bananas on a sunny beach.": 5,
    "There are 4 cats in the image.": 4,
    "I count six oranges.": 6,
    "Six": 6,
    "6": 6,
    "There are 3 (three) apples.": 3,
    "There are three apples. The three apples are red.": 3,
    "There is an apple.": None,
    "There's an apple on the table.": None,
    "An apple.": None,
    "There is only one dog in this image.": 1,
    "There is a bowl of apples.": None,
    "There are several apples in this image.": None,
    "There are many apples on a snowy mountain.": None,  # "no" inside "snowy", but no "object"/"item"
    "There are a few apples.": None,
    "There are at least 3 apples.": 3,
    "More than two apples are visible.": 2,
    "There are 3-4 apples.": 3,
    "There are 2 to 3 apples.": 2,
    "There are 2.5 apples.": 2,
    "No, there are 3 apples.": 3,
    "No.": None,
    "There are no apples in this image.": None,
    "There are zero apples.": None,  # "zero" is not one of its number words
    "There are none.": 1,  # "one" inside "none"
    "THERE ARE FOUR APPLES.": 4,
    "There are 3D rendered apples, 4 of them.": 3,  # "there are 3" (of "3D")
    "Someone placed apples here.": 1,
    "The apples are often red.": 10,
    "There are twenty apples.": None,  # "twenty" holds none of one..ten
    "There are 1,000 apples.": 1,  # "there are 1"
    "I'm sorry, I cannot determine the number of apples.": None,
    "": None,
    "There are 5 apples on 2 plates.": 5,
    "There are seven apples, about seven.": 7,
    "The image contains a red apple.": None,
    "Eleven apples are in the image.": None,  # "eleven" is not one of its number words
    "There is not a single apple in this image.": None,
    "Not one apple is visible.": 1,
    "There aren't three apples, I see four.": 3,
    "There are not 3 apples.": 3,
    "I see 2, maybe 3 apples in the image.": 3,  # "N ... in the image": "2," is not followed by a space
    "Apart from 2 bowls, the image shows 3 apples.": 3,  # "the image shows N" comes before "N anywhere"
    "There are no objects in this image.": 0,  # no number; "no" and "object"
    "There are seventeen apples.": 7,  # "there are seven"
}


def test_table_is_large_enough():
    assert len({a for a, *_ in COUNT_TABLE}) >= 40


@pytest.mark.parametrize(("answer", "expected", "strict", "substring"), COUNT_TABLE)
def test_count_parsers(answer, expected, strict, substring):
    assert parse_count(answer) == strict
    verdict = get_parser("strict").count_verdict(answer, expected)
    assert verdict.parsed == strict
    assert verdict.correct == (None if strict is None else strict == expected)
    assert verdict.unparsed == (strict is None)
    sub = get_parser("rrs-substring").count_verdict(answer, expected)
    assert sub.correct is substring
    assert sub.parsed == (expected if substring else None)


def test_eval_table_covers_the_count_table():
    assert {a for a, *_ in COUNT_TABLE} == set(EVAL_TABLE)


@pytest.mark.parametrize(("answer", "expected", "strict", "substring"), COUNT_TABLE)
def test_rrs_eval_parser(answer, expected, strict, substring):
    read = EVAL_TABLE[answer]
    assert parse_count_rrs_eval(answer) == read
    verdict = get_parser("rrs-eval").count_verdict(answer, expected)
    assert verdict.parsed == read
    assert verdict.correct is (read == expected)  # no number: wrong, as the official evaluation counts it
    assert not verdict.unparsed


def test_the_three_count_parsers_disagree_where_the_spec_says():
    """P2: one answer, three readings (strict: unparsed; substring: correct for 2 and 3; eval: 2)."""
    answer = "There are two groups of three apples."
    verdicts = {name: [get_parser(name).count_verdict(answer, n).correct for n in (2, 3)] for name in PARSERS}
    assert verdicts == {"strict": [None, None], "rrs-substring": [True, True], "rrs-eval": [True, False]}


YES_NO_TABLE = [
    ("Yes.", True), ("yes", True), ("Yes, the pineapple is on the left of the monkey.", True),
    ("**Yes**", True), ("YES!", True), ("No.", False), ("no", False),
    ("No, the monkey is on the left.", False), ("Nope", False), ("  - No -", False),
    ("The pineapple is on the left of the monkey.", None), ("Maybe.", None), ("", None),
    ("I think yes.", None), ("Not really.", None),
]


@pytest.mark.parametrize(("answer", "said"), YES_NO_TABLE)
def test_yes_no(answer, said):
    assert parse_yes_no(answer) == said
    for name in PARSERS:
        for expected in (True, False):
            v = get_parser(name).yes_no_verdict(answer, expected)
            assert v.parsed == said
            assert v.correct == (None if said is None else said == expected)


def test_registry():
    assert get_parser().name == "strict"
    assert set(PARSERS) == {"strict", "rrs-substring", "rrs-eval"}
    with pytest.raises(InputError, match="rrs-substring"):
        get_parser("fuzzy")


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(min_value=0, max_value=30))
def test_any_text_gives_a_verdict_not_an_exception(text, expected):
    n = parse_count(text)
    assert n is None or (isinstance(n, int) and n >= 0)
    assert parse_yes_no(text) in (True, False, None)
    for parser in PARSERS.values():
        assert parser.count_verdict(text, expected).correct in (True, False, None)
        assert parser.yes_no_verdict(text).correct in (True, False, None)
