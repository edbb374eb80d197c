"""Paired comparison of two models' per-prompt scores (the SCS paper's analysis, plus effect sizes and a CI).

Pairs are matched by prompt. Tests: Wilcoxon signed-rank and two-sample Kolmogorov-Smirnov with SciPy's
defaults (as in the official SCS analysis), a percentile-bootstrap CI of the mean paired difference, Cohen's
d_z and the matched-pairs rank-biserial correlation.
"""

from __future__ import annotations

import json
import warnings as _warnings
from pathlib import Path

import numpy as np
from scipy import stats

from ..errors import InputError
from .scs import normality, summarize

PAIR_BY = ("prompt", "id", "order")


def pair_scores(
    a: dict[str, float], b: dict[str, float], *, intersection: bool = False, by_order: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Align two prompt -> score maps. Different prompt sets are refused unless ``intersection`` is set;
    ``by_order`` pairs the i-th prompt of A with the i-th of B (for prompt lists that differ on purpose,
    such as a style token)."""
    if by_order:
        if len(a) != len(b):
            raise InputError(f"cannot pair by order: A has {len(a)} prompts, B has {len(b)}")
        keys = [f"{ka} | {kb}" if ka != kb else ka for ka, kb in zip(a, b, strict=True)]
        return keys, np.array(list(a.values()), float), np.array(list(b.values()), float)
    only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
    if (only_a or only_b) and not intersection:
        example = (only_a or only_b)[0]
        raise InputError(
            f"prompt sets differ: {len(only_a)} only in A, {len(only_b)} only in B (e.g. '{example}'); "
            "pass --intersection to compare the shared prompts, or --pair-by order"
        )
    keys = [k for k in a if k in b]
    if len(keys) < 2:
        raise InputError(f"need at least 2 shared prompts to compare, got {len(keys)}")
    return keys, np.array([a[k] for k in keys], float), np.array([b[k] for k in keys], float)


def bootstrap_mean_ci(d: np.ndarray, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0):
    """Percentile bootstrap CI of mean(d), resampling prompts with replacement."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (W+ - W-) / (W+ + W-) over non-zero differences."""
    d = d[d != 0]
    if len(d) == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def compare_scores(
    a: dict[str, float],
    b: dict[str, float],
    *,
    names: tuple[str, str] = ("A", "B"),
    intersection: bool = False,
    by_order: bool = False,
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired statistics for B versus A; differences are B - A."""
    keys, x, y = pair_scores(a, b, intersection=intersection, by_order=by_order)
    d = y - x
    out: dict = {
        "names": {"A": names[0], "B": names[1]},
        "n_pairs": len(keys),
        "dropped": {"only_A": len([k for k in a if k not in b]), "only_B": len([k for k in b if k not in a])}
        if intersection and not by_order
        else {"only_A": 0, "only_B": 0},
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
    if np.all(d == 0):
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
    ks = stats.ks_2samp(x, y)
    out["ks_2samp"] = {"statistic": float(ks.statistic), "p": float(ks.pvalue)}
    sd = d.std(ddof=1)
    out["effect_size"] = {
        "cohens_dz": float(d.mean() / sd) if sd > 0 else None,
        "rank_biserial": rank_biserial(d),
    }
    out["pairs"] = [{"prompt": k, "A": float(xa), "B": float(yb)} for k, xa, yb in zip(keys, x, y, strict=True)]
    return out


SCORE_KEYS = {"scs": "scs", "clip_score": "clip_score"}


def scores_from_result(result: dict, pair_by: str = "prompt") -> tuple[str, dict[str, float], list[str]]:
    """(metric, key -> score, undefined keys) from a ``diffprobe score`` JSON result."""
    metric = result.get("metric")
    if metric not in SCORE_KEYS or "per_prompt" not in result:
        raise InputError(f"not a per-prompt score result (metric '{metric}'); expected one of {sorted(SCORE_KEYS)}")
    scores, undefined = {}, []
    for row in result["per_prompt"]:
        key = row.get("prompt") if pair_by == "prompt" and row.get("prompt") else row["prompt_id"]
        if row[SCORE_KEYS[metric]] is None:
            undefined.append(key)
        else:
            scores[key] = float(row[SCORE_KEYS[metric]])
    return metric, scores, undefined


def load_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read score JSON {path}: {err}") from err
