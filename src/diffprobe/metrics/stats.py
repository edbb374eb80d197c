"""Paired comparison of two models' per-prompt scores (the SCS paper's analysis, plus effect sizes and a CI).

Pairs are matched by prompt. Tests: Wilcoxon signed-rank and two-sample Kolmogorov-Smirnov with SciPy's
defaults (as in the official SCS analysis), a percentile-bootstrap CI of the mean paired difference, Cohen's
d_z and the matched-pairs rank-biserial correlation.

A score result (the JSON ``diffprobe score scs|clip`` writes) is validated once, by :class:`ScoreResult`, before
any statistics: a malformed file, a non-numeric or non-finite score or a repeated prompt is an ``InputError``.
"""

from __future__ import annotations

import json
import math
import reprlib
import warnings as _warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator
from scipy import stats

from ..errors import InputError
from .scs import normality, summarize

PAIR_BY = ("prompt", "id", "order")


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (z = 1.96: 95 %); (0, 1) when n is 0."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def cohen_kappa(confusion: Sequence[Sequence[int]] | np.ndarray) -> float | None:
    """Cohen's kappa of two raters from their K x K confusion table (rows: rater A's label, columns: B's).

    kappa = (p_o - p_e) / (1 - p_e), with p_o the fraction of items on the diagonal and p_e the agreement expected
    by chance from the two raters' marginals, sum_k (row_k / n) (col_k / n). None where it is undefined: no items,
    or both raters gave every item one and the same label (p_e = 1)."""
    m = np.asarray(confusion, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise InputError(f"a confusion table must be square, got shape {m.shape}")
    if (m < 0).any():
        raise InputError("a confusion table holds counts; it has a negative entry")
    n = m.sum()
    if n == 0:
        return None
    p_o = np.trace(m) / n
    p_e = float((m.sum(axis=1) / n) @ (m.sum(axis=0) / n))
    if math.isclose(p_e, 1.0):
        return None
    return float((p_o - p_e) / (1 - p_e))


SCORE_KEYS = {"scs": "scs", "clip_score": "clip_score"}  # metric -> the per-prompt row's score field
ALPHA = 0.05  # the significance level the small-sample warning refers to

T = TypeVar("T")


# --- score results ---------------------------------------------------------------------------------------------

Score = Annotated[float | None, Field(strict=True, allow_inf_nan=False)]  # None: undefined (a single image)


class PromptScore(BaseModel):
    """One row of a score result's ``per_prompt`` list (its score field is named after the metric)."""

    model_config = ConfigDict(frozen=True)

    prompt_id: StrictStr
    prompt: StrictStr | None = None
    n_images: Annotated[StrictInt, Field(ge=0)] | None = None
    score: Score


class Generation(BaseModel):
    """What made the scored images, as far as they record it (runs record both; manifests may record seeds)."""

    model_config = ConfigDict(frozen=True)

    seeds: list[StrictInt] | None = None
    sampler: list[dict[str, Any]] | None = None


class ScoreResult(BaseModel):
    """The part of a ``diffprobe score`` JSON that ``compare`` reads."""

    model_config = ConfigDict(frozen=True)

    metric: Literal["scs", "clip_score"]
    per_prompt: list[PromptScore] = Field(min_length=1)
    embedder: dict[str, Any] | None = None
    generation: Generation | None = None

    @model_validator(mode="before")
    @classmethod
    def _score_field(cls, data: Any) -> Any:
        """Rows name their score after the metric (``scs``, ``clip_score``); read it as ``score``."""
        if not isinstance(data, dict) or data.get("metric") not in SCORE_KEYS or not isinstance(
            data.get("per_prompt"), list
        ):
            return data
        key = SCORE_KEYS[data["metric"]]
        rows = [{**row, "score": row[key]} if isinstance(row, dict) and key in row else row
                for row in data["per_prompt"]]
        return {**data, "per_prompt": rows}

    @property
    def score_key(self) -> str:
        return SCORE_KEYS[self.metric]


def _describe_error(err: ValidationError, score_key: str) -> str:
    """The first validation problem as ``per_prompt[3].scs: Input should be a finite number (got nan)``."""
    first = err.errors()[0]
    parts = [score_key if part == "score" else part for part in first["loc"]]
    loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")
    shown = "" if first["type"] == "missing" else f" (got {reprlib.repr(first.get('input'))})"
    more = f"; {err.error_count() - 1} more problem(s)" if err.error_count() > 1 else ""
    return f"{loc or 'top level'}: {first['msg']}{shown}{more}"


def read_score_result(data: Any, source: str | Path = "score result") -> ScoreResult:
    """Validate a score result (the parsed JSON of ``diffprobe score scs|clip``); each prompt id appears once."""
    try:
        result = ScoreResult.model_validate(data)
    except ValidationError as err:
        key = SCORE_KEYS.get(data.get("metric"), "score") if isinstance(data, dict) else "score"
        raise InputError(
            f"{source} is not a per-prompt score result: {_describe_error(err, key)}; expected the JSON that "
            f"`diffprobe score scs` or `diffprobe score clip` writes (metric one of {', '.join(SCORE_KEYS)}, and "
            "per_prompt rows with prompt_id, prompt, n_images and a numeric score or null)"
        ) from None
    rows: dict[str, list[int]] = {}
    for i, row in enumerate(result.per_prompt):
        rows.setdefault(row.prompt_id, []).append(i)
    if repeated := {k: v for k, v in rows.items() if len(v) > 1}:
        pid, where = next(iter(repeated.items()))
        raise InputError(
            f"{source} lists prompt id {pid!r} {len(where)} times (per_prompt rows {', '.join(map(str, where))})"
            + (f" and {len(repeated) - 1} other id(s) more than once" if len(repeated) > 1 else "")
            + "; each prompt must appear once: rescore the images, or remove the repeated rows"
        )
    return result


def load_result(path: str | Path) -> ScoreResult:
    """Read and validate a score JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or not UTF-8
        raise InputError(f"cannot read score JSON {path}: {err}") from None
    return read_score_result(data, path)


def keyed_rows(result: ScoreResult, pair_by: str, side: str = "A") -> list[tuple[str, PromptScore]]:
    """(pairing key, row) per prompt. ``pair_by="prompt"`` keys by text (the id where a row has none) and refuses
    a text that two prompts share, since pairing by text cannot tell them apart."""
    if pair_by not in PAIR_BY:
        raise InputError(f"--pair-by must be one of {', '.join(PAIR_BY)}")
    if pair_by == "id":
        return [(row.prompt_id, row) for row in result.per_prompt]
    keyed = [(row.prompt or row.prompt_id, row) for row in result.per_prompt]
    if pair_by == "prompt":
        ids: dict[str, list[str]] = {}
        for key, row in keyed:
            ids.setdefault(key, []).append(row.prompt_id)
        if repeated := {k: v for k, v in ids.items() if len(v) > 1}:
            shown = "; ".join(f"{k!r} (ids {', '.join(v)})" for k, v in list(repeated.items())[:3])
            raise InputError(
                f"{side} has {len(repeated)} prompt text(s) shared by several prompts: {shown}"
                + (f" and {len(repeated) - 3} more" if len(repeated) > 3 else "")
                + "; pairing by text would merge them: pass --pair-by id to pair by prompt id"
            )
    return keyed


# --- pairing ---------------------------------------------------------------------------------------------------


@dataclass
class Pairing(Generic[T]):
    """Items of A and B matched one to one; ``keys[i]`` names pair i."""

    keys: list[str]
    a: list[T]
    b: list[T]
    only_a: list[str] = field(default_factory=list)  # left out by intersection
    only_b: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def drop(self, unwanted: Callable[[T, T], bool]) -> tuple[Pairing[T], list[str]]:
        """The pairs ``unwanted`` rejects removed; returns the new pairing and the keys removed."""
        keep = [i for i in range(len(self)) if not unwanted(self.a[i], self.b[i])]
        kept_set = set(keep)
        dropped = [k for i, k in enumerate(self.keys) if i not in kept_set]
        kept = Pairing([self.keys[i] for i in keep], [self.a[i] for i in keep], [self.b[i] for i in keep],
                       self.only_a, self.only_b)
        return kept, dropped

    def map(self, fn: Callable[[T], Any]) -> Pairing:
        return Pairing(self.keys, [fn(x) for x in self.a], [fn(y) for y in self.b], self.only_a, self.only_b)


def _items(scores: Mapping[str, T] | Sequence[tuple[str, T]]) -> list[tuple[str, T]]:
    return list(scores.items()) if isinstance(scores, Mapping) else list(scores)


def pair(
    a: Mapping[str, T] | Sequence[tuple[str, T]],
    b: Mapping[str, T] | Sequence[tuple[str, T]],
    *,
    intersection: bool = False,
    by_order: bool = False,
) -> Pairing[T]:
    """Match A's items with B's by key. Different key sets are refused unless ``intersection`` is set;
    ``by_order`` pairs the i-th item of A with the i-th of B (for prompt lists that differ on purpose,
    such as a style token)."""
    a, b = _items(a), _items(b)
    if by_order:
        if len(a) != len(b):
            raise InputError(f"cannot pair by order: A has {len(a)} prompts, B has {len(b)}")
        keys = [ka if ka == kb else f"{ka} | {kb}" for (ka, _), (kb, _) in zip(a, b, strict=True)]
        return Pairing(keys, [x for _, x in a], [y for _, y in b])
    for side, items in (("A", a), ("B", b)):
        counts = Counter(k for k, _ in items)
        if repeated := [k for k, c in counts.items() if c > 1]:
            raise InputError(f"{side} holds {repeated[0]!r} {counts[repeated[0]]} times; each key must be unique "
                             "(or pair by order)")
    da, db = dict(a), dict(b)
    only_a, only_b = [k for k in da if k not in db], [k for k in db if k not in da]
    if (only_a or only_b) and not intersection:
        example = (only_a or only_b)[0]
        raise InputError(
            f"prompt sets differ: {len(only_a)} only in A, {len(only_b)} only in B (e.g. '{example}'); "
            "pass --intersection to compare the shared prompts, or --pair-by order"
        )
    keys = [k for k in da if k in db]
    return Pairing(keys, [da[k] for k in keys], [db[k] for k in keys], only_a, only_b)


# --- statistics ------------------------------------------------------------------------------------------------


def bootstrap_mean_ci(d: np.ndarray, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0):
    """Percentile bootstrap CI of mean(d), resampling prompts with replacement."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of paired successes ``a`` and ``b`` (one pair per item): only discordant pairs count, and
    under the null each is equally likely to favour either side, so the two-sided p is the binomial test's."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"McNemar needs two equally long 1-d lists of paired outcomes (got {a.shape} and {b.shape})")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(stats.binomtest(only_b, n, 0.5).pvalue)
    return {"n_pairs": int(a.size), "a_only": only_a, "b_only": only_b, "p": p}


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (W+ - W-) / (W+ + W-) over non-zero differences."""
    d = d[d != 0]
    if len(d) == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def min_wilcoxon_p(n_nonzero: int) -> float:
    """The smallest two-sided p the exact signed-rank test can give over ``n_nonzero`` non-zero differences.

    The most extreme outcome is every difference having the same sign, probability 2^-n under the null
    (with or without tied magnitudes), so the two-sided p is at least 2^(1-n).
    """
    return min(1.0, 2.0 ** (1 - n_nonzero))


def min_pairs_for(alpha: float = ALPHA) -> int:
    """The fewest non-zero differences with which the exact signed-rank test can reach p < ``alpha``."""
    return max(1, math.floor(1 - math.log2(alpha)) + 1)


def compare_paired(
    pairing: Pairing[float],
    *,
    names: tuple[str, str] = ("A", "B"),
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired statistics for B versus A over matched scores; differences are B - A."""
    if len(pairing) < 2:
        raise InputError(f"need at least 2 paired prompts to compare, got {len(pairing)}")
    keys, x, y = pairing.keys, np.array(pairing.a, float), np.array(pairing.b, float)
    d = y - x
    with np.errstate(over="ignore", invalid="ignore"):
        spread = [x.var(), y.var(), d.var()]
    if not np.all(np.isfinite(spread)):
        raise InputError("scores too large to compare (their spread overflows a float); rescale them")
    warnings = []
    n_nonzero = int((d != 0).sum())
    min_p = min_wilcoxon_p(n_nonzero)
    if min_p >= ALPHA:
        warnings.append(
            f"only {n_nonzero} paired prompt(s) differ: the Wilcoxon signed-rank test cannot reach p < {ALPHA} "
            f"with them (smallest possible two-sided p = {min_p:.4g}, when every difference has the same sign); "
            f"compare at least {min_pairs_for(ALPHA)} prompts"
        )
    out: dict = {
        "names": {"A": names[0], "B": names[1]},
        "n_pairs": len(keys),
        "dropped": {"only_A": len(pairing.only_a), "only_B": len(pairing.only_b)},
        "A": {**summarize(x), "normality": normality(x)},
        "B": {**summarize(y), "normality": normality(y)},
        "difference": {
            "definition": "B - A, per prompt",
            "mean": float(d.mean()),
            "median": float(np.median(d)),
            "sd": float(d.std(ddof=1)),
            "bootstrap_ci": {
                "confidence": confidence,
                "n_boot": n_boot,
                "seed": seed,
                "low": None,
                "high": None,
            },
            "b_higher": int((d > 0).sum()),
            "a_higher": int((d < 0).sum()),
            "ties": int((d == 0).sum()),
        },
    }
    lo, hi = bootstrap_mean_ci(d, n_boot, confidence, seed)
    out["difference"]["bootstrap_ci"].update(low=lo, high=hi)
    if n_nonzero == 0:
        out["wilcoxon"] = {"statistic": None, "p": 1.0, "note": "all paired differences are zero"}
    else:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore", UserWarning)  # scipy warns about ties/small n; recorded below
            w = stats.wilcoxon(x, y)
        out["wilcoxon"] = {
            "statistic": float(w.statistic),
            "p": float(w.pvalue),
            "settings": "scipy.stats.wilcoxon defaults: two-sided, zero_method='wilcox'",
        }
    out["wilcoxon"]["min_attainable_p"] = min_p
    ks = stats.ks_2samp(x, y)
    out["ks_2samp"] = {"statistic": float(ks.statistic), "p": float(ks.pvalue)}
    sd = d.std(ddof=1)
    out["effect_size"] = {
        "cohens_dz": float(d.mean() / sd) if sd > 0 else None,
        "rank_biserial": rank_biserial(d),
    }
    out["pairs"] = [{"prompt": k, "A": float(xa), "B": float(yb)} for k, xa, yb in zip(keys, x, y, strict=True)]
    out["warnings"] = warnings
    return out


def compare_scores(
    a: Mapping[str, float] | Sequence[tuple[str, float]],
    b: Mapping[str, float] | Sequence[tuple[str, float]],
    *,
    names: tuple[str, str] = ("A", "B"),
    intersection: bool = False,
    by_order: bool = False,
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired statistics for B versus A from key -> score maps (or (key, score) lists); differences are B - A."""
    pairing = pair(a, b, intersection=intersection, by_order=by_order)
    return compare_paired(pairing, names=names, n_boot=n_boot, confidence=confidence, seed=seed)


# --- what differs between the two sides besides the model ---------------------------------------------------------


def _seed_text(seeds: Sequence[int]) -> str:
    s = sorted(seeds)
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s[:6])) + (f",... ({len(s)} seeds)" if len(s) > 6 else "")


def _counts_text(values: Sequence[int]) -> str:
    return ", ".join(f"{n} ({c} prompt{'s' if c > 1 else ''})" for n, c in sorted(Counter(values).items()))


def _sampler_text(samplers: list[dict[str, Any]]) -> dict[str, str]:
    keys = sorted({k for s in samplers for k in s})
    return {k: "/".join(sorted({json.dumps(s.get(k)) for s in samplers})) for k in keys}


def setting_warnings(ra: ScoreResult, rb: ScoreResult, rows: Pairing[PromptScore]) -> list[str]:
    """Differences between the two sides other than the model: seeds, images per prompt, sampler settings."""
    out = []
    ga, gb = ra.generation or Generation(), rb.generation or Generation()
    if ga.seeds is not None and gb.seeds is not None and set(ga.seeds) != set(gb.seeds):
        out.append(f"A and B were generated with different seeds (A: {_seed_text(ga.seeds)}; B: "
                   f"{_seed_text(gb.seeds)}); paired prompts compare best over the same seeds")
    known = [(x.n_images, y.n_images) for x, y in zip(rows.a, rows.b, strict=True)
             if x.n_images is not None and y.n_images is not None]
    if differ := [(na, nb) for na, nb in known if na != nb]:
        out.append(f"images per prompt differ on {len(differ)} of {len(known)} paired prompts (A: "
                   f"{_counts_text([na for na, _ in differ])}; B: {_counts_text([nb for _, nb in differ])}); "
                   "a score over fewer images is noisier: generate the same seeds for both")
    if ga.sampler and gb.sampler:
        sa, sb = _sampler_text(ga.sampler), _sampler_text(gb.sampler)
        if diffs := [f"{k} {sa.get(k, '-')} (A) vs {sb.get(k, '-')} (B)" for k in sorted(sa.keys() | sb.keys())
                     if sa.get(k) != sb.get(k)]:
            out.append(f"A and B were sampled with different settings: {'; '.join(diffs)}")
    return out


def undefined_pairs(rows: Pairing[PromptScore]) -> tuple[list[str], list[str]]:
    """Keys of the pairs whose A score, and whose B score, is undefined (a prompt with a single image)."""
    return ([k for k, x in zip(rows.keys, rows.a, strict=True) if x.score is None],
            [k for k, y in zip(rows.keys, rows.b, strict=True) if y.score is None])
