"""Seed mining arithmetic: from judged images to per-seed accuracy, a chi-square test and the top seeds.

Input rows are judged images (``seed``, ``category``, ``correct``; ``correct`` None means the judge's answer did not
parse, which is counted apart, never as wrong). Mined categories are the count and relation categories
(``count 3``, ``relation left_of``); others (``attribute``) are reported as not mined.

Ranking within a category: accuracy, high first; ties go to the seed with more correct images (more evidence at
the same rate), then to the smaller seed. The official code ranks by accuracy alone (a stable sort over seeds in
order), which gives the same order whenever every seed has the same number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..metrics.stats import wilson

MINED_KINDS = ("count", "relation")
TOP_N = 3  # the paper's top_n
ALPHA = 0.05


def is_mined(category: str) -> bool:
    return category.partition(" ")[0] in MINED_KINDS


def category_order(category: str) -> tuple[int, int, str]:
    """count categories by number, then relations by name."""
    kind, _, rest = category.partition(" ")
    rank = MINED_KINDS.index(kind) if kind in MINED_KINDS else len(MINED_KINDS)
    return rank, int(rest) if kind == "count" and rest.isdigit() else 0, rest


@dataclass
class SeedTally:
    seed: int
    correct: int = 0
    n: int = 0  # parsed verdicts
    unparsed: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    def as_dict(self) -> dict[str, Any]:
        lo, hi = wilson(self.correct, self.n)
        return {"seed": self.seed, "n": self.n, "correct": self.correct, "unparsed": self.unparsed,
                "accuracy": self.accuracy, "ci95": [lo, hi]}


@dataclass
class CategoryResult:
    category: str
    tallies: dict[int, SeedTally]
    prompts: int
    ranking: list[int] = field(default_factory=list)
    top: list[int] = field(default_factory=list)
    chi2: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        n = sum(t.n for t in self.tallies.values())
        k = sum(t.correct for t in self.tallies.values())
        lo, hi = wilson(k, n)
        return {"prompts": self.prompts, "images": n + sum(t.unparsed for t in self.tallies.values()), "n": n,
                "correct": k, "accuracy": k / n if n else None, "ci95": [lo, hi],
                "seeds": [self.tallies[s].as_dict() for s in sorted(self.tallies)],
                "ranking": self.ranking, "top": self.top, "chi2": self.chi2}


def tally(rows: Iterable[Mapping[str, Any]], seeds: Sequence[int]) -> tuple[dict[str, CategoryResult], dict[str, int]]:
    """Per mined category, one tally per seed of ``seeds`` (a seed without images has n = 0); and the number of
    images per category that is not mined."""
    results: dict[str, CategoryResult] = {}
    prompts: dict[str, set[str]] = {}
    not_mined: dict[str, int] = {}
    for row in rows:
        category = row["category"]
        if not is_mined(category):
            not_mined[category] = not_mined.get(category, 0) + 1
            continue
        if category not in results:
            results[category] = CategoryResult(category, {s: SeedTally(s) for s in seeds}, 0)
            prompts[category] = set()
        seed = int(row["seed"])
        if seed not in results[category].tallies:
            continue  # a seed outside the mined list (an extended run)
        prompts[category].add(row.get("prompt", ""))
        t = results[category].tallies[seed]
        if row["correct"] is None:
            t.unparsed += 1
        else:
            t.n += 1
            t.correct += bool(row["correct"])
    for category, result in results.items():
        result.prompts = len(prompts[category])
    ordered = {c: results[c] for c in sorted(results, key=category_order)}
    return ordered, dict(sorted(not_mined.items()))


def rank(tallies: Mapping[int, SeedTally]) -> list[int]:
    """Seeds with at least one parsed verdict, best first (see the module docstring for ties)."""
    scored = [t for t in tallies.values() if t.n]
    return [t.seed for t in sorted(scored, key=lambda t: (-t.correct / t.n, -t.correct, t.seed))]


def chi_square(tallies: Mapping[int, SeedTally], alpha: float = ALPHA) -> dict[str, Any]:
    """``scipy.stats.chi2_contingency`` on the seeds x (correct, wrong) table (seeds without parsed verdicts
    left out). Where the test is undefined (under two seeds, or every verdict the same) statistic and p are None
    and ``note`` says why. ``low_expected`` is the share of expected cells below 5 (the approximation is rough
    when it is large)."""
    from scipy.stats import chi2_contingency

    rows = [(t.correct, t.n - t.correct) for t in tallies.values() if t.n]
    out: dict[str, Any] = {"statistic": None, "p": None, "dof": None, "yates": False, "significant": None,
                           "alpha": alpha, "seeds": len(rows), "low_expected": None, "note": None}
    if len(rows) < 2:
        out["note"] = f"needs at least two seeds with parsed verdicts (this category has {len(rows)})"
        return out
    correct = sum(r[0] for r in rows)
    wrong = sum(r[1] for r in rows)
    if correct == 0 or wrong == 0:
        out["note"] = (f"every verdict is {'wrong' if correct == 0 else 'correct'}, so success cannot depend on "
                       "the seed; no test")
        return out
    res = chi2_contingency(rows)
    dof = int(res.dof)
    out.update(statistic=float(res.statistic), p=float(res.pvalue), dof=dof, yates=dof == 1,
               significant=bool(res.pvalue < alpha),
               low_expected=float((res.expected_freq < 5).mean()))
    return out


def mine(rows: Iterable[Mapping[str, Any]], seeds: Sequence[int], *, top_n: int = TOP_N,
         alpha: float = ALPHA) -> tuple[dict[str, CategoryResult], dict[str, int]]:
    """Per mined category: tallies, ranking, top ``top_n`` seeds and the chi-square test.

    Raises InputError when no row is in a mined category, or a category has no parsed verdict at all (its
    seeds cannot be ranked)."""
    if top_n < 1:
        raise InputError(f"--top must be at least 1 (got {top_n})")
    results, not_mined = tally(rows, seeds)
    if not results:
        what = f" (judged categories: {', '.join(not_mined)})" if not_mined else ""
        raise InputError(f"no judged image is in a count or relation category{what}; mining ranks seeds per count "
                         "and relation category, so give prompts with count or relation questions")
    for result in results.values():
        if not any(t.n for t in result.tallies.values()):
            unparsed = sum(t.unparsed for t in result.tallies.values())
            raise InputError(f"category '{result.category}' has no verdicts to rank seeds by: the judge's answer "
                             f"did not parse for any of its {unparsed} image(s); check the judge (its answers are "
                             "in RUN/scores/composition.jsonl), or leave those prompts out")
        result.ranking = rank(result.tallies)
        result.top = result.ranking[:top_n]
        result.chi2 = chi_square(result.tallies, alpha)
    return results, not_mined
