"""Reading a VLM's free-text answer: a strict parser (the default) and the reliable-seeds code's two rules.

Three parsers share one interface, so one judge can use any of them (``get_parser(name)``):

* ``strict`` (default) -- :func:`parse_count` reads *the* count of an answer with word boundaries: number words
  zero..twenty, digits, "no <noun>"/"none" -> 0, "a single"/"one" -> 1, "a"/"an" -> 1 where it is the count
  ("There is an apple."), "not one"/"not a single" -> 0. An answer with two different numbers ("two groups of
  three apples", "three or four"), a vague quantity ("several"), a bound ("at least 3"), a negated count ("not
  three") or no number at all is *unparsed* (``None``): it is counted and shown as such, never silently judged
  wrong. :func:`parse_yes_no` reads yes/no at the start of an answer.
* ``rrs-substring`` -- parity with the official reliable-seeds code (``get_top_seeds.analyze_responses``, spec
  ``reliable_seeds.md`` section 2.3 and pitfall P2): an answer is correct iff, lower-cased, it *contains* the
  expected count's word or its digits as a substring ("2" matches "12" and "2D", "six" matches "sixteen",
  "two groups of three" is correct for both 2 and 3). It never reads a number, so it can only say correct or
  incorrect for an expected count, never "unparsed". The official code has no yes/no rule (its spatial pipeline is
  not published), so this parser's yes/no reading is the strict one.

* ``rrs-eval`` -- parity with the official reliable-seeds *evaluation* (``final_evaluation.py``, spec section 5):
  a list of regexes read one number (:func:`parse_count_rrs_eval`), correct iff it equals the expected count; an
  answer without a number is wrong there, so here too.

All expose ``count_verdict(answer, expected) -> AnswerVerdict`` and ``yes_no_verdict(answer, expected)``:
``correct`` is True/False, or None where the answer is unparsed; ``parsed`` is what was read (the strict count or
yes/no; for the substring rule the expected count when it matched, else None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from ..errors import InputError

NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
WORD_OF = {i: w for w, i in NUMBER_WORDS.items()}

# Words that replace an exact count: an answer holding one is unparsed.
_VAGUE = frozenset("several many multiple numerous few couple dozen dozens lots plenty countless hundreds "
                   "thousands various".split())
# Words before a number that make it a bound, not a count ("at least 3", "more than two").
_BOUNDS = (("at", "least"), ("at", "most"), ("more", "than"), ("less", "than"), ("fewer", "than"), ("up", "to"),
           ("over",), ("upwards", "of"))
# "a"/"an" followed by one of these is not a count of one ("a group of apples", "a bowl of apples").
_NOT_ONE = frozenset("group bunch pile few lot lots couple number variety collection set cluster bowl basket plate "
                     "box bag crate dozen pair row stack heap handful total bit series line tray pack bundle "
                     "mix mixture assortment range selection array variety".split())
# Words before "a"/"an" that put it in the count's place ("there is an apple", "I can see a single apple").
_ONE_BEFORE = frozenset("is 's was see shows show contains contain has have depicts depict features feature only "
                        "just exactly".split())

# A number is a run of digits (with "," or "." groups) not glued to letters: "2D", "1st", "x2" are words.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*(?![a-z0-9])|[a-z0-9]+(?:'[a-z]+)?|'s|[^\w\s]")
_DIGITS = re.compile(r"\d+")
_DECIMAL = re.compile(r"\d+(?:[.,]\d+)+")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def _is_bound(tokens: list[str], i: int) -> bool:
    return any(tuple(tokens[max(0, i - len(b)):i]) == b for b in _BOUNDS)


def parse_count(text: str) -> int | None:
    """The count an answer states, or None where it states none or more than one (see the module docstring)."""
    tokens = _tokens(text)
    if any(t in _VAGUE for t in tokens):
        return None
    found: set[int] = set()
    one_by_article = False
    for i, t in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        value: int | None = None
        if _DIGITS.fullmatch(t.replace(",", "")):
            value = int(t.replace(",", ""))
        elif _DECIMAL.fullmatch(t):  # 2.5: not a count
            return None
        elif t in NUMBER_WORDS:
            value = NUMBER_WORDS[t]
        elif t == "none":
            value = 0
        elif t == "no" and re.fullmatch(r"[a-z]+", nxt or "") and nxt not in ("doubt",):
            value = 0  # "no apples", "there are no apples"; a bare "No." is handled below, "No, ..." is not a count
        elif t in ("a", "an") and nxt == "single":
            value = 1
        elif t in ("a", "an"):
            before = tokens[i - 1] if i else ""
            if re.fullmatch(r"[a-z]+", nxt) and nxt not in _NOT_ONE and (
                    i == 0 or before in _ONE_BEFORE or before.endswith("'s")):
                one_by_article = True
            continue
        if value is None:
            continue
        if _is_bound(tokens, i):
            return None
        before = tokens[i - 1] if i else ""  # "not one", "not a single", "aren't three"
        if before == "not" or before.endswith("n't"):
            if value != 1:
                return None  # "there are not three apples": says what the count is not
            value = 0  # "not a single apple", "not one apple"
        found.add(value)
    if not found and tokens and tokens[0] == "no" and all(not re.fullmatch(r"[a-z\d]+", t) for t in tokens[1:]):
        return 0  # the whole answer is "No." / "no"
    if len(found) > 1:
        return None
    if found:
        return found.pop()
    return 1 if one_by_article else None


_YES = frozenset({"yes", "yeah", "yep", "correct", "true"})
_NO = frozenset({"no", "nope", "incorrect", "false"})


def parse_yes_no(text: str) -> bool | None:
    """True for an answer that starts with yes, False for one that starts with no (case and punctuation ignored:
    "Yes.", "**No**, the apple is ...", "yes - ..."); None otherwise ("The apple is left of ...", "Maybe")."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    return None


@dataclass(frozen=True)
class AnswerVerdict:
    """What a parser made of one answer: ``correct`` (None: unparsed), ``parsed`` (what it read) and a reason."""

    correct: bool | None
    parsed: int | bool | None
    reason: str

    @property
    def unparsed(self) -> bool:
        return self.correct is None


class Parser(Protocol):
    name: str

    def count_verdict(self, answer: str, expected: int) -> AnswerVerdict: ...

    def yes_no_verdict(self, answer: str, expected: bool = True) -> AnswerVerdict: ...


def _yes_no(answer: str, expected: bool) -> AnswerVerdict:
    said = parse_yes_no(answer)
    if said is None:
        return AnswerVerdict(None, None, "the answer does not start with yes or no")
    word = "yes" if said else "no"
    return AnswerVerdict(said == expected, said, f"answered {word}, expected {'yes' if expected else 'no'}")


class StrictParser:
    """The default parser: one exact count (or yes/no) read with word boundaries, else unparsed."""

    name = "strict"

    def count_verdict(self, answer: str, expected: int) -> AnswerVerdict:
        n = parse_count(answer)
        if n is None:
            return AnswerVerdict(None, None, "no single count in the answer")
        return AnswerVerdict(n == expected, n, f"answered {n}, expected {expected}")

    def yes_no_verdict(self, answer: str, expected: bool = True) -> AnswerVerdict:
        return _yes_no(answer, expected)


class SubstringParser:
    """``rrs-substring``: the official reliable-seeds rule, correct iff the lower-cased answer contains the
    expected count's word or digits anywhere (no word boundaries). Yes/no: the strict rule (no official one)."""

    name = "rrs-substring"

    def count_verdict(self, answer: str, expected: int) -> AnswerVerdict:
        text = answer.lower()
        needles = [str(expected)] + ([WORD_OF[expected]] if expected in WORD_OF else [])
        hit = next((n for n in needles if n in text), None)
        if hit is None:
            return AnswerVerdict(False, None, f"neither {' nor '.join(map(repr, needles))} occurs in the answer")
        return AnswerVerdict(True, expected, f"{hit!r} occurs in the answer")

    def yes_no_verdict(self, answer: str, expected: bool = True) -> AnswerVerdict:
        return _yes_no(answer, expected)


# The official evaluation's number: a digit run or a word one..ten, matched without word boundaries.
_RRS_NUMBER = r"(\d+|one|two|three|four|five|six|seven|eight|nine|ten)"
_RRS_EVAL_RULES = tuple(re.compile(rule) for rule in (
    rf"there (?:are|is) {_RRS_NUMBER}",
    rf"{_RRS_NUMBER} .+ in the image",
    rf"the image shows {_RRS_NUMBER}",
    _RRS_NUMBER,  # anywhere
))


def parse_count_rrs_eval(text: str) -> int | None:
    """The count the reliable-seeds evaluation reads (``final_evaluation.extract_number_from_response``): the
    first of its rules that matches the lower-cased answer gives the number, without word boundaries ("None" reads
    1 through "one", "sixteen" 6, "2D" 2, "two groups of three" 2). Its rule "I can see N" is written with a
    capital I and matched against lower-cased text, so it never fires (the last rule reads such answers anyway).
    With no number at all: 0 where the answer holds "no" and "object" or "item" (substrings), else None."""
    lower = text.lower()
    for rule in _RRS_EVAL_RULES:
        if m := rule.search(lower):
            word = m.group(1)
            return NUMBER_WORDS[word] if word in NUMBER_WORDS else int(word)
    if "no" in lower and ("object" in lower or "item" in lower):
        return 0
    return None


class EvalRegexParser:
    """``rrs-eval``: the official reliable-seeds *evaluation* rule (spec ``reliable_seeds.md`` section 5), unlike
    mining's substring rule: read one number with :func:`parse_count_rrs_eval`; correct iff it equals the
    expected count. An answer with no number is wrong, as the official evaluation counts it (never "unparsed").
    Yes/no: the strict rule (no official one)."""

    name = "rrs-eval"

    def count_verdict(self, answer: str, expected: int) -> AnswerVerdict:
        n = parse_count_rrs_eval(answer)
        if n is None:
            return AnswerVerdict(False, None, "no number in the answer (the official evaluation counts it wrong)")
        return AnswerVerdict(n == expected, n, f"read {n}, expected {expected}")

    def yes_no_verdict(self, answer: str, expected: bool = True) -> AnswerVerdict:
        return _yes_no(answer, expected)


PARSERS: dict[str, Parser] = {"strict": StrictParser(), "rrs-substring": SubstringParser(),
                              "rrs-eval": EvalRegexParser()}
DEFAULT_PARSER = "strict"


def get_parser(name: str = DEFAULT_PARSER) -> Parser:
    if name not in PARSERS:
        raise InputError(f"unknown answer parser {name!r}; available: {', '.join(PARSERS)}")
    return PARSERS[name]


__all__ = ["AnswerVerdict", "DEFAULT_PARSER", "EvalRegexParser", "NUMBER_WORDS", "PARSERS", "Parser", "StrictParser",
           "SubstringParser", "get_parser", "parse_count", "parse_count_rrs_eval", "parse_yes_no"]
