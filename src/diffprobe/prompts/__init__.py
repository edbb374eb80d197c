"""Prompt suites: files (txt, csv, tsv, jsonl, json), Comp90 object/background files, and built-in suites.

Built-in suites ship as package data with their licences (see ``data/README.md``):

- ``scs100``: the first 100 prompts of the Semantic Consistency Score paper's prompt file (as the paper used);
  ``scs100-monet-sdxl`` / ``scs100-monet-lora``: its LoRA experiment's prompt pair.
- ``cc500``: CC-500 attribute-binding prompts; each prompt carries the reference ``noun_phrases`` and ``nouns``.
- ``shapes-<split>``: prompts of the shapes world (``diffprobe.worlds.shapes.prompts(split)``).

Comp90 (the reliable-seeds paper's prompts) carries no licence, so it is not bundled: ``comp90-<kind>-<split>:PATH``
reads a copy of the official repository's ``prompt_dataset/`` folder at PATH (:data:`COMP90_SUITES`,
:func:`load_comp90`).

Every loader returns ``list[Prompt]``: the text plus whatever else the source knows about it (``meta``).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

DATA = Path(__file__).parent / "data"
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
               9: "nine", 10: "ten"}
COMP90_COUNTS = (2, 3, 4, 5, 6)


@dataclass(frozen=True)
class Prompt:
    text: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Comp90Object:
    singular: str  # "apple"
    with_article: str  # "an apple"
    plural: str  # "apples"


# --- files ---------------------------------------------------------------------------------------------


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Read prompts from ``.txt`` (one per line), ``.csv``/``.tsv`` or ``.jsonl``/``.json`` (a ``prompt`` field;
    other fields go to ``meta``). Comp90 ``objects_<split>.txt`` files expand to numerical prompts with the
    ``backgrounds_<split>.txt`` next to them. Raises InputError for empty or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist")
    if path.name.startswith("objects_") and path.suffix == ".txt":
        backgrounds = path.with_name("backgrounds_" + path.name[len("objects_"):])
        if not backgrounds.is_file():
            raise InputError(f"{path.name} looks like a Comp90 objects file, but {backgrounds.name} is missing "
                             f"next to it; add it, or rename the file to read it as plain prompts")
        return comp90_numerical(read_comp90_objects(path), read_lines(backgrounds))
    suffix = path.suffix.lower()
    readers = {".txt": _read_txt, ".csv": _read_table, ".tsv": _read_table, ".jsonl": _read_jsonl,
               ".json": _read_json}
    if suffix not in readers:
        raise InputError(f"unsupported prompt file {path.name}; use .txt (one prompt per line), .csv/.tsv or "
                         ".jsonl/.json with a 'prompt' column")
    prompts = readers[suffix](path)
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts")
    return prompts


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise InputError(f"cannot read prompt file {path}: {err.strerror}") from None


def check_prompt(text: str, where: str) -> str:
    """``text`` stripped. A control character (NUL, the separators \\x1c-\\x1f, \\x85, U+2028 ...; a tab is
    allowed) raises InputError naming ``where``: it would be invisible in the prompt, and silently cut it apart
    in tools that split lines on it."""
    text = text.strip()
    if bad := next((c for c in text if c != "\t" and unicodedata.category(c) in ("Cc", "Zl", "Zp")), None):
        raise InputError(f"{where}: the prompt holds the control character {ascii(bad)}; remove it")
    return text


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines. Lines end at \\n only (a \\r before it is dropped):
    str.splitlines would also split at \\x1c, \\x85 and U+2028 inside a line."""
    return [(n, line.strip()) for n, line in enumerate(_text(path).split("\n"), start=1) if line.strip()]


def read_lines(path: str | Path) -> list[str]:
    """Non-blank lines, stripped; a line with a control character raises InputError naming it."""
    path = Path(path)
    return [check_prompt(line, f"{path.name} line {n}") for n, line in _numbered_lines(path)]


def _read_txt(path: Path) -> list[Prompt]:
    return [Prompt(line) for line in read_lines(path)]


def _read_table(path: Path) -> list[Prompt]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = csv.DictReader(io.StringIO(_text(path), newline=""), delimiter=delimiter)
    try:
        if rows.fieldnames is None:
            return []
        if repeated := sorted({name for name in rows.fieldnames if rows.fieldnames.count(name) > 1}):
            raise InputError(f"{path.name} has the column(s) {', '.join(map(repr, repeated))} more than once; "
                             "give every column its own name")
        if "prompt" not in rows.fieldnames:
            raise InputError(f"{path.name} has no 'prompt' column (columns: {', '.join(rows.fieldnames)})")
        prompts = []
        for row in rows:
            where = f"{path.name} line {rows.line_num}"
            if None in row:  # more cells than header names
                raise InputError(f"{where}: more cells than columns; quote cells that contain '{delimiter}'")
            prompts.append(_record(row, where))
    except csv.Error as err:  # e.g. a cell over the csv module's field size limit
        raise InputError(f"{path.name} line {rows.line_num}: {err}") from None
    return prompts


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: invalid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None
    except ValueError as err:  # an integer past Python's digit limit
        raise InputError(f"{where}: invalid JSON ({err})") from None


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for line, raw in enumerate(_text(path).split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path.name} line {line}"
        prompts.append(_record(_json(raw, where), where))
    return prompts


def _read_json(path: Path) -> list[Prompt]:
    data = _json(_text(path), path.name)
    if not isinstance(data, list):
        raise InputError(f"{path.name} must hold a JSON list of prompts or of objects with a 'prompt' field")
    return [Prompt(check_prompt(item, f"{path.name} [{i}]")) if isinstance(item, str) and item.strip()
            else _record(item, f"{path.name} [{i}]") for i, item in enumerate(data)]


def _record(record: Any, where: str) -> Prompt:
    if not isinstance(record, dict) or "prompt" not in record:
        raise InputError(f"{where}: expected an object with a 'prompt' field")
    text = record["prompt"]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: 'prompt' must be a non-empty string")
    phrases = record.get("noun_phrases")
    if phrases is not None and not isinstance(phrases, str) and not (
            isinstance(phrases, list) and all(isinstance(p, str) for p in phrases)):
        raise InputError(f"{where}: 'noun_phrases' must be a string ('a red car; a green bench') or a list of "
                         "strings")
    meta = {k: v for k, v in record.items() if k and k != "prompt" and not k.startswith("Unnamed")}
    return Prompt(check_prompt(text, where), meta)


# --- Comp90 (reliable-seeds paper) -----------------------------------------------------------------------


def read_comp90_objects(path: str | Path) -> list[Comp90Object]:
    """Lines ``"apple, an apple, apples"``: singular, with article, plural."""
    objects = []
    for line, raw in _numbered_lines(Path(path)):
        parts = [check_prompt(p, f"{Path(path).name} line {line}") for p in raw.split(",")]
        if len(parts) != 3 or not all(parts):
            raise InputError(f"{Path(path).name} line {line}: expected 'singular, with article, plural' "
                             f"(e.g. 'apple, an apple, apples'), got {raw!r}")
        objects.append(Comp90Object(*parts))
    if not objects:
        raise InputError(f"Comp90 objects file {path} holds no objects")
    return objects


def comp90_numerical(objects: Sequence[Comp90Object], backgrounds: Sequence[str],
                     counts: Iterable[int] = COMP90_COUNTS) -> list[Prompt]:
    """``"{count word} {plural}, {background}"`` for every background x object x count (the order of the
    official evaluation script)."""
    if not backgrounds:
        raise InputError("Comp90 backgrounds file holds no backgrounds")
    prompts = []
    for background in backgrounds:
        for obj in objects:
            for count in counts:
                if count not in COUNT_WORDS:
                    raise InputError(f"count {count} has no number word; use counts 1..10")
                prompts.append(Prompt(f"{COUNT_WORDS[count]} {obj.plural}, {background}",
                                      {"count": count, "object": obj.singular, "plural": obj.plural,
                                       "background": background}))
    return prompts


# Comp90 suites over a copy of the official repository's ``prompt_dataset/`` folder, with the paper's splits: seed
# mining uses the first 15 train objects x the first 4 train backgrounds, the fine-tuning data all 60 x 8, and the
# evaluation the 30 eval objects x 4 eval backgrounds (disjoint from train).
COMP90_SUITES = {
    "comp90-numerical-mining": "Comp90 numerical, seed-mining subset: first 15 train objects x first 4 train "
                               "backgrounds x counts 2-6 (300 prompts)",
    "comp90-numerical-train": "Comp90 numerical, train: 60 objects x 8 backgrounds x counts 2-6 (2400 prompts)",
    "comp90-numerical-eval": "Comp90 numerical, eval: 30 objects x 4 backgrounds x counts 2-6 (600 prompts)",
    "comp90-spatial-train": "Comp90 spatial, train: spatial_prompts_train.txt (4 relations)",
    "comp90-spatial-eval": "Comp90 spatial, eval: spatial_prompts_eval.txt (4 relations)",
}
COMP90_MINING = (15, 4)  # objects, backgrounds


def comp90_folder(path: str | Path) -> Path:
    """The ``prompt_dataset/`` folder at ``path``: the folder itself or a repository copy that holds it."""
    path = Path(path).expanduser()
    if (path / "prompt_dataset").is_dir():
        path = path / "prompt_dataset"
    if not path.is_dir():
        raise InputError(f"Comp90 folder {path} does not exist; give the official reliable-seeds repository's "
                         "prompt_dataset/ folder (it is not bundled: it carries no licence)")
    return path


def _comp90_file(folder: Path, name: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise InputError(f"{folder} has no {name}; give the official reliable-seeds repository's prompt_dataset/ "
                         "folder")
    return file


def load_comp90(suite: str, path: str | Path) -> list[Prompt]:
    """A Comp90 suite (:data:`COMP90_SUITES`) read from the user's ``prompt_dataset/`` folder at ``path``.
    Numerical prompts carry ``count``, ``object`` and ``plural``; spatial prompts their relation question."""
    if suite not in COMP90_SUITES:
        raise InputError(f"unknown Comp90 suite {suite!r}; use one of {', '.join(COMP90_SUITES)}")
    folder = comp90_folder(path)
    kind, split = suite.split("-")[1:]
    if kind == "spatial":
        from ..judges.questions import read_spatial_prompts  # questions builds on this module

        return read_spatial_prompts(_comp90_file(folder, f"spatial_prompts_{split}.txt"))
    source = "train" if split == "mining" else split
    objects = read_comp90_objects(_comp90_file(folder, f"objects_{source}.txt"))
    backgrounds = read_lines(_comp90_file(folder, f"backgrounds_{source}.txt"))
    if split == "mining":
        n_objects, n_backgrounds = COMP90_MINING
        if len(objects) < n_objects or len(backgrounds) < n_backgrounds:
            raise InputError(f"the mining subset needs {n_objects} train objects and {n_backgrounds} train "
                             f"backgrounds; {folder} has {len(objects)} and {len(backgrounds)}")
        objects, backgrounds = objects[:n_objects], backgrounds[:n_backgrounds]
    return comp90_numerical(objects, backgrounds)


# --- built-in suites -------------------------------------------------------------------------------------

SUITES = {
    "scs100": "SCS paper: 100 prompts (first 100 lines of its prompt file)",
    "scs100-monet-sdxl": "SCS paper LoRA experiment: prompts '... in the style of Monet' (base SDXL)",
    "scs100-monet-lora": "SCS paper LoRA experiment: prompts '... in the style of TOK' (Monet LoRA)",
    "cc500": "CC-500 attribute binding, with reference noun phrases (ConceptDiffusion distribution)",
    "shapes-<split>[-<category>]": "shapes world prompts (needs diffprobe.worlds.shapes)",
    "comp90-<kind>-<split>:PATH": "Comp90 (reliable-seeds paper) prompts from the prompt_dataset/ folder at PATH: "
                                  + ", ".join(COMP90_SUITES),
}


def load_suite(name: str) -> list[Prompt]:
    if name == "scs100":
        return [Prompt(t, {"index": i}) for i, t in enumerate(read_lines(DATA / "scs100" / "prompts.txt")[:100])]
    if name in ("scs100-monet-sdxl", "scs100-monet-lora"):
        file = DATA / "scs100" / f"prompts_monet_{name.rsplit('-', 1)[1]}.txt"
        return [Prompt(t, {"index": i}) for i, t in enumerate(read_lines(file))]
    if name == "cc500":
        prompts = _read_table(DATA / "cc500" / "CC-500.csv")
        return [Prompt(p.text, {"index": i, "noun_phrases": _split(p.meta.get("noun_phrases")),
                                "nouns": _split(p.meta.get("nouns"))}) for i, p in enumerate(prompts)]
    if name.startswith("shapes-"):
        return _shapes_suite(name.removeprefix("shapes-"))
    if name.startswith("comp90-"):
        suite, sep, folder = name.partition(":")
        if not sep or not folder:
            raise InputError(f"{name!r}: give the Comp90 folder after a colon, e.g. {suite}:path/to/prompt_dataset")
        return load_comp90(suite, folder)
    raise InputError(f"unknown prompt suite {name!r}; built-in suites: {', '.join(SUITES)}")


def _split(cell: str | None) -> list[str]:
    return [s.strip() for s in (cell or "").split(";") if s.strip()]


def _shapes_suite(name: str) -> list[Prompt]:
    """``shapes-<split>`` or ``shapes-<split>-<category>`` -> ``diffprobe.worlds.shapes.prompts(split[, category])``."""
    try:
        shapes = importlib.import_module("diffprobe.worlds.shapes")
    except ModuleNotFoundError:
        shapes = None
    make = getattr(shapes, "prompts", None)
    if make is None:
        raise InputError("the shapes world is not available in this installation, so 'shapes-*' suites cannot load")
    split, _, category = name.partition("-")
    try:
        items = make(split, category) if category else make(split)
    except (KeyError, ValueError) as err:
        raise InputError(f"unknown shapes suite 'shapes-{name}' ({err}); use shapes-<split>[-<category>]") from None
    return [_as_prompt(item) for item in items]


def _as_prompt(item: Any) -> Prompt:
    """Accept what a suite hook returns: str, Prompt, a dict with 'prompt', or an object with a
    ``text``/``prompt``/``caption`` attribute (a dataclass's other fields become ``meta``)."""
    if isinstance(item, Prompt):
        return item
    if isinstance(item, str):
        return Prompt(item)
    if isinstance(item, dict):
        return _record(item, "shapes suite")
    names = [n for n in ("text", "prompt", "caption") if isinstance(getattr(item, n, None), str)]
    if not names:
        raise TypeError(f"cannot read a prompt from {item!r}")
    meta = getattr(item, "meta", None)
    if meta is None and dataclasses.is_dataclass(item):
        meta = {k: v for k, v in dataclasses.asdict(item).items() if k != names[0]}
    return Prompt(getattr(item, names[0]), dict(meta or {}))


def builtin_seeds(name: str, n: int | None = None) -> list[int]:
    """Named seed lists. ``scs100``: the SCS paper's seed file (100 seeds); the paper used the first 20."""
    if name != "scs100":
        raise InputError(f"unknown seed list {name!r}; named seed lists: scs100[:N]")
    seeds = [int(s) for s in read_lines(DATA / "scs100" / "random_seeds.txt")]
    n = 20 if n is None else n
    if not 1 <= n <= len(seeds):
        raise InputError(f"scs100 has {len(seeds)} seeds; ask for 1..{len(seeds)} of them")
    return seeds[:n]


def load_prompts(source: str | Path) -> list[Prompt]:
    """A prompt file path or a built-in suite name."""
    path = Path(source)
    if path.exists():
        return read_prompt_file(path)
    name = str(source)
    if name in SUITES or name.startswith(("shapes-", "comp90-")):
        return load_suite(name)
    raise InputError(f"prompt file {source} does not exist and is not a built-in suite "
                     f"({', '.join(SUITES)})")


def unique(prompts: Sequence[Prompt]) -> tuple[list[Prompt], int]:
    """Drop repeated prompt texts (a repeat would have the same job keys); returns (kept, number dropped)."""
    seen: set[str] = set()
    kept = []
    for p in prompts:
        if p.text not in seen:
            seen.add(p.text)
            kept.append(p)
    return kept, len(prompts) - len(kept)


__all__ = ["Prompt", "Comp90Object", "SUITES", "load_prompts", "load_suite", "read_prompt_file",
           "read_comp90_objects", "comp90_numerical", "COMP90_SUITES", "comp90_folder", "load_comp90",
           "builtin_seeds", "unique", "read_lines", "check_prompt",
           "COUNT_WORDS"]
