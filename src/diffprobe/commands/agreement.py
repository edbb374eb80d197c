"""``diffprobe judge --agreement RUN --judge A --against B``: how often two judges agree on the same images.

Both judges' verdicts come from the run store; a judge that has not judged an image yet judges it first (through
:func:`~diffprobe.commands.judge.judge_run`, so that work is stored and resumable too). A pair is one image and one
question that both judges have a verdict for. Each verdict is one of three labels: correct, wrong, or unparsed (a
free-text answer that did not parse). Per category (count N, attribute, each relation) and overall:

* ``accuracy`` -- the fraction of pairs where both judges parsed and gave the same verdict, over the pairs where
  both parsed, with a Wilson 95 % interval;
* ``kappa`` -- Cohen's kappa over the same pairs (the 2 x 2 table): agreement corrected for what the two judges'
  rates of "correct" alone would give by chance; 1 is perfect, 0 is chance, below 0 is worse than chance;
* ``kappa_unparsed_as_label`` -- Cohen's kappa over every pair, unparsed counted as a third verdict (3 x 3);
* ``confusion`` -- rows are A's verdict, columns B's (correct, wrong, unparsed).

Written to ``RUN/scores/agreement_<A>_vs_<B>.json`` with every pair (and both reasons where the judges disagree).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import InputError, check_writable
from ..judges.base import Judge
from ..metrics.provenance import provenance, write_json
from ..metrics.stats import cohen_kappa, wilson
from .export import SCORES_DIR

LABELS = ("correct", "wrong", "unparsed")


def label(correct: bool | None) -> str:
    return "unparsed" if correct is None else "correct" if correct else "wrong"


def agreement_table(labels: list[tuple[str, str]]) -> dict[str, Any]:
    """Agreement statistics of (A's label, B's label) pairs (see the module docstring)."""
    index = {name: i for i, name in enumerate(LABELS)}
    table = [[0] * len(LABELS) for _ in LABELS]
    for a, b in labels:
        table[index[a]][index[b]] += 1
    parsed = [row[:2] for row in table[:2]]  # both judges parsed
    n = sum(map(sum, parsed))
    agree = parsed[0][0] + parsed[1][1]
    lo, hi = wilson(agree, n)
    kappa = cohen_kappa(parsed)
    out = {
        "pairs": len(labels), "both_parsed": n, "agree": agree, "accuracy": agree / n if n else None,
        "ci95": [lo, hi], "kappa": kappa, "kappa_unparsed_as_label": cohen_kappa(table),
        "unparsed": {"A": sum(table[2]), "B": sum(row[2] for row in table), "both": table[2][2]},
        "confusion": {a: {b: table[i][j] for j, b in enumerate(LABELS)} for i, a in enumerate(LABELS)},
    }
    if kappa is None:
        out["note"] = ("kappa is undefined: no pair where both judges parsed" if n == 0 else
                       "kappa is undefined: both judges gave every pair one and the same verdict")
    return out


def agreement(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of judge A's per-image rows with judge B's (rows as :func:`judge_run` returns them), per category
    and overall (``all``); pairs are matched by sample key and question."""
    from ..store import canonical_identity
    from .judge import category_order

    def pair_key(row: dict[str, Any]) -> tuple[str, str]:
        return row["key"], canonical_identity(row["question"])

    by_key_b = {pair_key(r): r for r in rows_b}
    pairs = [(r, by_key_b[pair_key(r)]) for r in rows_a if pair_key(r) in by_key_b]
    groups: dict[str, list[tuple[str, str]]] = {}
    for a, b in pairs:
        groups.setdefault(a["category"], []).append((label(a["correct"]), label(b["correct"])))
    categories = {c: agreement_table(groups[c]) for c in sorted(groups, key=category_order)}
    categories["all"] = agreement_table([(label(a["correct"]), label(b["correct"])) for a, b in pairs])
    keys_a = {pair_key(r) for r in rows_a}
    per_image = []
    for a, b in pairs:
        item: dict[str, Any] = {"key": a["key"], "prompt": a["prompt"], "seed": a["seed"],
                                "category": a["category"], "A": label(a["correct"]), "B": label(b["correct"])}
        if a["correct"] is not None and b["correct"] is not None:
            item["score"] = float(a["correct"] == b["correct"])  # 1: the judges agree (export joins it per image)
        if item["A"] != item["B"]:
            item.update(A_answer=a["answer"], A_reason=a["reason"], B_answer=b["answer"], B_reason=b["reason"])
        per_image.append(item)
    return {"categories": categories,
            "not_in_both": {"only_A": len(keys_a - by_key_b.keys()), "only_B": len(by_key_b.keys() - keys_a)},
            "per_image": per_image}


def file_name(name_a: str, name_b: str) -> str:
    """``agreement_<A>_vs_<B>.json`` with characters unsafe in file names replaced."""
    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "judge"

    return f"agreement_{safe(name_a)}_vs_{safe(name_b)}.json"


def agreement_run(run_dir: Path, judge_a: Judge, judge_b: Judge, *, out: Path | None = None,
                  console: Console | None = None, progress: bool = True, batch_size: int | None = None,
                  names: tuple[str, str] | None = None) -> dict[str, Any]:
    """Judge what each judge has not judged yet, then compare their verdicts; writes and returns the result
    (``result["path"]`` is where it went)."""
    from .judge import judge_run

    if judge_a.identity() == judge_b.identity():
        raise InputError(f"both judges have the same identity {judge_a.identity()}: their stored verdicts are the "
                         "same ones; compare judges that differ (another judge, model, template or parser)")
    name_a, name_b = names or (judge_a.name, judge_b.name)
    target = out or Path(run_dir) / SCORES_DIR / file_name(name_a, name_b)
    check_writable(target)
    results = [judge_run(run_dir, judge, console=console, progress=progress, batch_size=batch_size,
                         write=False) for judge in (judge_a, judge_b)]
    result = {"metric": "agreement", "names": {"A": name_a, "B": name_b},
              "judges": {"A": results[0].judge, "B": results[1].judge}, "run": str(results[0].run_dir),
              **agreement(results[0].rows, results[1].rows),
              "skipped": {"A": dict(results[0].skipped), "B": dict(results[1].skipped)},
              "provenance": provenance()}
    result["path"] = str(write_json(result, target))
    return result


def agreement_lines(result: dict[str, Any]) -> list[str]:
    """The result as text: one line per category, then the overall confusion table."""
    def number(x: float | None, digits: int = 3) -> str:
        return "undefined" if x is None else f"{x:.{digits}f}"

    names = result["names"]
    lines = [f"agreement of {names['A']} (A) with {names['B']} (B):"]
    for name, c in result["categories"].items():
        lo, hi = c["ci95"]
        acc = "-" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f} %"
        unparsed = c["unparsed"]
        lines.append(f"{name}: {c['agree']}/{c['both_parsed']} agree ({acc}, 95 % CI {100 * lo:.1f}-{100 * hi:.1f} "
                     f"%), kappa {number(c['kappa'])}"
                     + (f"; unparsed A {unparsed['A']}, B {unparsed['B']} (kappa with unparsed as a verdict "
                        f"{number(c['kappa_unparsed_as_label'])})" if unparsed["A"] or unparsed["B"] else ""))
    confusion = result["categories"]["all"]["confusion"]
    width = max(map(len, LABELS)) + 2
    lines.append("confusion (rows: A, columns: B):")
    lines.append(" " * width + "".join(f"{b:>{width}}" for b in LABELS))
    lines += [f"{a:<{width}}" + "".join(f"{confusion[a][b]:>{width}}" for b in LABELS) for a in LABELS]
    missing = result["not_in_both"]
    if missing["only_A"] or missing["only_B"]:
        lines.append(f"judged by one judge only: {missing['only_A']} by A, {missing['only_B']} by B")
    return lines
