"""Structured questions from prompts: ``question_for(prompt) -> (Question | None, reason)``.

A prompt gets a :class:`~diffprobe.judges.base.Question` wherever its source knows one, read from ``meta`` (never
guessed from free text):

* ``meta["question"]`` -- a Question, or its dict form (shapes-world suites; :func:`read_spatial_prompts`).
* explicit fields ``kind``, ``objects``, ``count``, ``relation`` (a jsonl prompt file; :func:`read_question_prompts`
  validates them and names the line and field of a bad value).
* Comp90 numerical prompts -- ``meta["count"]`` and ``meta["object"]`` (``"three apples, on a sunny beach"`` ->
  count 3 of apple), recorded by :func:`diffprobe.prompts.comp90_numerical`.
* CC-500 -- ``meta["noun_phrases"]`` and ``meta["nouns"]`` (``"a red book and a gold clock"`` -> attribute question
  with red book and gold clock). A row with fewer than two phrases, or a phrase that is not
  ``a/an/the [size] [attribute] <noun>``, has no question (with that reason).

A prompt with none of these gets ``(None, reason)``: it is skipped with the reason, never judged wrong.

Relations: the reliable-seeds paper's four ("on the left of", "on the right of", "on the top of" (sic), "under") map
onto the judges' names ``left_of``, ``right_of``, ``above``, ``below`` (:data:`RELATION_PHRASES`); the phrase the
prompt used is kept in ``meta["relation_phrase"]``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..prompts import Prompt, read_lines, read_prompt_file
from .base import RELATION_WORDS, ObjectSpec, Question

RELATION_PHRASES: dict[str, str] = {
    "on the left of": "left_of", "to the left of": "left_of", "left of": "left_of",
    "on the right of": "right_of", "to the right of": "right_of", "right of": "right_of",
    "on the top of": "above", "on top of": "above", "above": "above",
    "under": "below", "below": "below", "beneath": "below",
}
SIZES = frozenset({"small", "big", "large", "tiny", "medium", "huge"})
_ARTICLES = ("a", "an", "the")
_KINDS = ("count", "attribute", "relation")
_FIELDS = ("kind", "objects", "count", "relation")

_REL = "|".join(sorted(map(re.escape, RELATION_PHRASES), key=len, reverse=True))
_SPATIAL = re.compile(rf"^(?:a|an|the)\s+(?P<a>[^,.;]+?)\s+(?P<rel>{_REL})\s+(?:a|an|the)\s+(?P<b>[^,.;]+?)"
                      r"\s*(?:[,;]\s*(?P<background>.*?))?\s*\.?$", re.IGNORECASE)


def question_for(prompt: Prompt) -> tuple[Question | None, str]:
    """The prompt's question and where it came from, or ``(None, why it has none)``. Bad explicit question data
    raises InputError (a user's file is wrong); a source that simply knows no question gives None."""
    meta = prompt.meta or {}
    where = f"prompt {prompt.text!r}"
    if "question" in meta and meta["question"] is not None:
        q = meta["question"]
        if isinstance(q, Question):
            return q, "question recorded with the prompt"
        if not isinstance(q, Mapping):
            raise InputError(f"{where}: 'question' must be an object with kind/objects/count/relation")
        return question_from_fields(q, where, prompt.text), "question recorded with the prompt"
    if "kind" in meta:
        return question_from_fields(meta, where, prompt.text), "question fields of the prompt file"
    if "object" in meta and "count" in meta:
        return _comp90_count(meta, where, prompt.text), "Comp90 numerical prompt"
    if "noun_phrases" in meta:
        return _cc500(meta, prompt.text)
    return None, "the prompt's source records no question (no question, kind, Comp90 or CC-500 fields)"


def _comp90_count(meta: Mapping[str, Any], where: str, text: str) -> Question:
    obj, count = meta["object"], meta["count"]
    if not isinstance(obj, str) or not obj.strip():
        raise InputError(f"{where}: 'object' must be a non-empty string")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InputError(f"{where}: 'count' must be a non-negative integer, got {count!r}")
    plural = meta.get("plural")
    if plural is not None and (not isinstance(plural, str) or not plural.strip()):
        raise InputError(f"{where}: 'plural' must be a non-empty string, got {plural!r}")
    return Question("count", (ObjectSpec(obj.strip(), plural=plural.strip() if plural else None),), count=count,
                    text=text)


@functools.lru_cache(maxsize=1)
def _inflect_engine() -> Any:
    import inflect

    return inflect.engine()


def plural_of(obj: ObjectSpec) -> str:
    """The object in the plural, with its size and colour: ``"big red circles"``, ``"apples"``, ``"mice"``.
    The noun's plural is ``obj.plural`` where the prompt's source gave one (Comp90 object files do), else
    ``inflect``'s plural of the noun."""
    plural = obj.plural or _inflect_engine().plural_noun(obj.noun) or obj.noun
    return " ".join(w for w in (obj.size, obj.color, plural) if w)


def object_spec(phrase: str) -> ObjectSpec | None:
    """``"a large red book"`` -> ObjectSpec("book", "red", "large"); ``"red book"`` works too (no article).
    The last word is the noun; before it at most a size word and one attribute (colour or material).
    None where the phrase has more than that (use the explicit ``objects`` field for such prompts)."""
    words = phrase.lower().split()
    if words and words[0] in _ARTICLES:
        words = words[1:]
    if not words or not all(re.fullmatch(r"[a-z][a-z_'-]*", w) for w in words):
        return None
    *mods, noun = words
    size = mods.pop(0) if mods and mods[0] in SIZES else None
    if len(mods) > 1:
        return None
    return ObjectSpec(noun, mods[0] if mods else None, size)


def _strings(value: Any, field: str, text: str) -> list[str] | None:
    """A ``"a; b"`` string or a list of strings as a list; None stays None; anything else is an InputError."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(";") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    raise InputError(f"prompt {text!r}: {field!r} must be a string ('a red car; a green bench') or a list of "
                     f"strings, got {value!r}")


def _cc500(meta: Mapping[str, Any], text: str) -> tuple[Question | None, str]:
    phrases = _strings(meta.get("noun_phrases"), "noun_phrases", text)
    nouns = _strings(meta.get("nouns"), "nouns", text)
    if not phrases or len(phrases) < 2:
        return None, f"attribute binding needs two noun phrases; the prompt has {len(phrases or [])}"
    if nouns is not None and len(nouns) != len(phrases):
        return None, f"{len(phrases)} noun phrases but {len(nouns)} nouns"
    specs = []
    for i, phrase in enumerate(phrases):
        words = phrase.split()
        noun = nouns[i].strip().lower() if nouns else None
        if noun and " " in noun and phrase.lower().endswith(noun):  # a noun of two words ("teddy bear")
            words = phrase[: len(phrase) - len(noun)].split() + [noun.replace(" ", "_")]
        spec = object_spec(" ".join(words))
        if spec is None or (noun and spec.noun != noun.replace(" ", "_")):
            return None, f"noun phrase {phrase!r} is not 'a [size] [attribute] <noun>'"
        specs.append(ObjectSpec(spec.noun.replace("_", " "), spec.color, spec.size))
    return Question("attribute", tuple(specs), text=text), "CC-500 noun phrases"


def _objects(value: Any, where: str) -> tuple[ObjectSpec, ...]:
    if isinstance(value, (str, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(f"{where}: 'objects' must be a list of objects ('red apple' or "
                         "{{\"noun\": \"apple\", \"color\": \"red\"}})")
    specs = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            spec = object_spec(item)
            if spec is None:
                raise InputError(f"{where}: 'objects'[{i}] {item!r} is not '[size] [attribute] <noun>'; "
                                 "give it as {\"noun\": ..., \"color\": ..., \"size\": ...}")
        elif isinstance(item, Mapping):
            extra = sorted(set(item) - {"noun", "color", "size", "plural"})
            if extra:
                raise InputError(f"{where}: 'objects'[{i}] has unknown key(s) {', '.join(extra)}; "
                                 "use noun, color, size, plural")
            noun = item.get("noun")
            if not isinstance(noun, str) or not noun.strip():
                raise InputError(f"{where}: 'objects'[{i}] needs a non-empty string 'noun'")
            for key in ("color", "size", "plural"):
                if item.get(key) is not None and not isinstance(item[key], str):
                    raise InputError(f"{where}: 'objects'[{i}].{key} must be a string or null")
            spec = ObjectSpec(noun.strip(), item.get("color") or None, item.get("size") or None,
                              (item.get("plural") or "").strip() or None)
        else:
            raise InputError(f"{where}: 'objects'[{i}] must be a string or an object with a 'noun'")
        specs.append(spec)
    return tuple(specs)


def question_from_fields(fields: Mapping[str, Any], where: str, text: str = "") -> Question:
    """A Question from ``kind``, ``objects``, ``count``, ``relation``; InputError naming ``where`` and the field."""
    kind = fields.get("kind")
    if kind not in _KINDS:
        raise InputError(f"{where}: 'kind' must be one of {', '.join(_KINDS)}, got {kind!r}")
    objects = _objects(fields.get("objects"), where)
    count = fields.get("count")
    if kind == "count":
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InputError(f"{where}: 'count' must be a non-negative integer for a count question, got {count!r}")
        if len(objects) != 1:
            raise InputError(f"{where}: 'objects' must hold one object for a count question, got {len(objects)}")
    elif count is not None:
        raise InputError(f"{where}: 'count' is only for count questions (kind is {kind!r})")
    relation = fields.get("relation")
    if kind == "relation":
        if not isinstance(relation, str):
            raise InputError(f"{where}: 'relation' must be one of {', '.join(RELATION_WORDS)}, got {relation!r}")
        name = relation.strip().lower()
        name = RELATION_PHRASES.get(name, name.replace(" ", "_"))
        if name not in RELATION_WORDS:
            raise InputError(f"{where}: 'relation' must be one of {', '.join(RELATION_WORDS)} (or a phrase such as "
                             f"'on the left of'), got {relation!r}")
        if len(objects) != 2:
            raise InputError(f"{where}: 'objects' must hold two objects for a relation question, got {len(objects)}")
        relation = name
    elif relation is not None:
        raise InputError(f"{where}: 'relation' is only for relation questions (kind is {kind!r})")
    return Question(kind, objects, count=count, relation=relation, text=text or str(fields.get("text") or ""))


def question_dict(q: Question) -> dict[str, Any]:
    """The dict form kept in ``Prompt.meta["question"]`` (JSON-ready; :func:`question_for` reads it back)."""
    return {"kind": q.kind, "objects": [_object_dict(o) for o in q.objects],
            "count": q.count, "relation": q.relation, "text": q.text}


def _object_dict(o: ObjectSpec) -> dict[str, Any]:
    """An object's dict form; ``plural`` only where it is known, so questions without one keep their keys."""
    return {"noun": o.noun, "color": o.color, "size": o.size, **({"plural": o.plural} if o.plural else {})}


def parse_spatial(text: str) -> tuple[Question, str, str | None] | None:
    """``"a pineapple on the left of a monkey[, <background>]"`` -> (relation question, the relation phrase as
    written, the background or None); None where the text is not '<object> <relation> <object>'."""
    m = _SPATIAL.match(text.strip())
    if not m:
        return None
    specs = [object_spec(m[k]) for k in ("a", "b")]
    if None in specs:
        return None
    phrase = " ".join(m["rel"].lower().split())
    q = Question("relation", tuple(specs), relation=RELATION_PHRASES[phrase], text=text.strip())  # type: ignore[arg-type]
    return q, phrase, (m["background"] or None)


def read_spatial_prompts(path: str | Path) -> list[Prompt]:
    """A Comp90-style spatial prompt file, one prompt per line (``"a pineapple on the left of a monkey"``); each
    prompt's meta holds its relation ``question``, ``relation_phrase`` and ``background`` (text after a comma).
    A line that does not read as '<object> <relation> <object>' raises InputError naming it."""
    path = Path(path)
    lines = read_lines(path) if path.is_file() else None
    if lines is None:
        raise InputError(f"spatial prompt file {path} does not exist")
    prompts = []
    for n, line in _line_numbers(path, lines):
        parsed = parse_spatial(line)
        if parsed is None:
            raise InputError(f"{path.name} line {n}: {line!r} is not '<object> <relation> <object>' with a relation "
                             f"of: {', '.join(sorted(set(RELATION_PHRASES)))}")
        q, phrase, background = parsed
        prompts.append(Prompt(line, {"question": question_dict(q), "relation_phrase": phrase,
                                     "background": background}))
    if not prompts:
        raise InputError(f"spatial prompt file {path} holds no prompts")
    return prompts


def _line_numbers(path: Path, lines: list[str]) -> list[tuple[int, str]]:
    """Pair the non-blank lines (as :func:`read_lines` returns them) with their line numbers in the file."""
    raw = path.read_text(encoding="utf-8-sig").split("\n")
    numbers = [n for n, line in enumerate(raw, start=1) if line.strip()]
    return list(zip(numbers, lines, strict=True))


def read_question_prompts(path: str | Path) -> list[Prompt]:
    """A prompt file whose records carry explicit question fields (``.jsonl``: one object a line with ``prompt``,
    ``kind``, ``objects``, ``count``, ``relation``). Every record is validated: a bad value raises InputError
    naming the line and the field. Each prompt's meta gets the validated ``question``."""
    path = Path(path)
    prompts = read_prompt_file(path)
    if path.suffix.lower() == ".jsonl":
        wheres = [f"{path.name} line {n}" for n, _ in _line_numbers(path, [p.text for p in prompts])]
    else:
        wheres = [f"{path.name} record {i + 1}" for i in range(len(prompts))]
    out = []
    for where, p in zip(wheres, prompts, strict=True):
        fields = p.meta.get("question") if isinstance(p.meta.get("question"), Mapping) else p.meta
        if "kind" not in fields:
            raise InputError(f"{where}: no 'kind' field; give kind (count, attribute or relation) and objects")
        q = question_from_fields(fields, where, p.text)
        out.append(Prompt(p.text, {**{k: v for k, v in p.meta.items() if k not in _FIELDS},
                                   "question": question_dict(q)}))
    return out


__all__ = ["RELATION_PHRASES", "object_spec", "parse_spatial", "plural_of", "question_dict", "question_for",
           "question_from_fields", "read_question_prompts", "read_spatial_prompts"]
