"""The report's figures (matplotlib, Agg backend, PNG). Labels are user text: ``plain`` keeps matplotlib from
reading ``$...$`` in them as mathtext."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100
MAX_LABEL = 40


def plain(text: Any) -> str:
    """User text as a literal figure label: dollar signs escaped, newlines flattened, long labels shortened
    (the full text is in the page's table)."""
    text = " ".join(str(text).split()).replace("$", r"\$")
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def distribution(values: dict[str, list[float]], path: Path, ylabel: str) -> Path:
    """Per-prompt scores of each arm: a box plot with every prompt as a point (the SCS paper's figure)."""
    labels = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels) + 1.5), 3.4))
    ax.boxplot([values[k] for k in labels], showfliers=False)
    for i, k in enumerate(labels, 1):
        xs = [i + 0.08 * ((j % 5) - 2) for j in range(len(values[k]))]
        ax.scatter(xs, values[k], s=10, alpha=0.6, color="C0")
    ax.set_xticks(range(1, len(labels) + 1), [plain(k) for k in labels], rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def paired(baseline: str, pairs: dict[str, list[tuple[float, float]]], path: Path, metric: str) -> Path:
    """Per-prompt score of each arm against the baseline's, one panel per arm, with the diagonal."""
    n = len(pairs)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    every = [v for pts in pairs.values() for p in pts for v in p]
    lo, hi = (min(every), max(every)) if every else (0, 1)
    pad = 0.05 * (hi - lo or 1)
    for ax, (label, pts) in zip(axes.flat, pairs.items(), strict=False):
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--")
        ax.scatter([a for a, _ in pts], [b for _, b in pts], s=14, alpha=0.7)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(f"{plain(baseline)} ({metric})", fontsize=8)
        ax.set_ylabel(f"{plain(label)} ({metric})", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig, path)


def accuracy(per_arm: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path:
    """Accuracy per category for each arm, with the Wilson 95 % intervals as error bars."""
    found = list(dict.fromkeys(c for arm in per_arm.values() for c in arm))
    categories = [c for c in found if c == "all"] + [c for c in found if c != "all"]  # as in the summary table
    labels = list(per_arm)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(categories) * max(1, len(labels)) ** 0.5 + 2), 3.4))
    for i, label in enumerate(labels):
        xs, ys, err_lo, err_hi = [], [], [], []
        for j, cat in enumerate(categories):
            c = per_arm[label].get(cat)
            if not c or c.get("accuracy") is None:
                continue
            xs.append(j + (i - (len(labels) - 1) / 2) * width)
            ys.append(100 * c["accuracy"])
            err_lo.append(100 * (c["accuracy"] - c["low"]))
            err_hi.append(100 * (c["high"] - c["accuracy"]))
        ax.bar(xs, ys, width=width, yerr=[err_lo, err_hi], capsize=2, label=plain(label))
    ax.set_xticks(range(len(categories)), [plain(c) for c in categories], rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def dose_response(param: str, series: dict[str, list[tuple[float, dict[str, Any]]]],
                  baseline: dict[str, dict[str, Any] | None], path: Path, title: str) -> Path:
    """Each measure against the swept parameter value, with intervals; the baseline as a dashed line."""
    names = list(series)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=True):
        pts = sorted(series[name], key=lambda p: p[0])
        xs = [x for x, _ in pts]
        ys = [m["mean"] for _, m in pts]
        err = [[m["mean"] - (m["low"] if m["low"] is not None else m["mean"]) for _, m in pts],
               [(m["high"] if m["high"] is not None else m["mean"]) - m["mean"] for _, m in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3)
        if (base := baseline.get(name)) is not None:
            ax.axhline(base["mean"], color="grey", ls="--", lw=1, label="baseline")
            ax.legend(fontsize=7)
        ax.set_xlabel(plain(param))
        ax.set_ylabel(plain(name))
        ax.grid(alpha=0.3)
    fig.suptitle(plain(title), fontsize=9)
    return _save(fig, path)


def guidance_curves(record: dict[str, Any], path: Path) -> Path | None:
    """The per-step record of one image: concept guidance's similarity of each concept, S-CFG's region rates."""
    steps = record.get("steps") or []
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.0))
    if record.get("guidance") == "concept":
        names = record.get("similarity_order") or []
        sims = [s.get("similarity", []) for s in steps]
        for k in range(max((len(s) for s in sims), default=0)):
            ax.plot([s[k] if k < len(s) else None for s in sims], label=plain(names[k] if k < len(names) else k))
        ax.set_ylabel("similarity")
        ax.legend(fontsize=7)
    elif record.get("guidance") == "scfg":
        for key in ("rate_mean", "rate_min", "rate_max"):
            ax.plot([s.get(key) for s in steps], label=key)
        ax.set_ylabel("CFG rate over regions")
        ax.legend(fontsize=7)
    else:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return _save(fig, path)
