"""The seed x category accuracy table of a reliable seeds file, for the terminal (rich) and as a heatmap PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from .file import ReliableSeeds


def accuracy_matrix(reliable: ReliableSeeds) -> tuple[list[int], list[str], np.ndarray]:
    """(seeds, categories, accuracy[seed, category]); NaN where a seed has no parsed verdict in a category."""
    categories = list(reliable.categories)
    seeds = [int(s) for s in reliable.data["seeds"]]
    index = {s: i for i, s in enumerate(seeds)}
    acc = np.full((len(seeds), len(categories)), np.nan)
    for j, name in enumerate(categories):
        for row in reliable.categories[name]["seeds"]:
            if row["accuracy"] is not None and int(row["seed"]) in index:
                acc[index[int(row["seed"])], j] = row["accuracy"]
    return seeds, categories, acc


def rich_table(reliable: ReliableSeeds, limit: int | None = None) -> Table:
    """Rows: seeds (top seeds of any category first when ``limit`` cuts the list); cells: accuracy and correct/n;
    a top seed of its category is bold with a star."""
    cats = reliable.categories
    table = Table(title=f"seed accuracy per category ({reliable.path.name}; * = top {reliable.data['top_n']})")
    table.add_column("seed", justify="right")
    for name in cats:
        table.add_column(name, justify="right")
    rows = {int(s): {} for s in reliable.data["seeds"]}
    for name, c in cats.items():
        for r in c["seeds"]:
            rows.setdefault(int(r["seed"]), {})[name] = r
    order = list(rows)
    if limit is not None:
        tops = [s for c in cats.values() for s in c["top"]]
        order = list(dict.fromkeys(tops + order))[:limit]
    for seed in order:
        cells = []
        for name, c in cats.items():
            r = rows[seed].get(name)
            if r is None or r["accuracy"] is None:
                cells.append("-")
                continue
            text = f"{100 * r['accuracy']:.0f}% ({r['correct']}/{r['n']})"
            cells.append(f"[bold]*{text}[/bold]" if seed in c["top"] else text)
        table.add_row(str(seed), *cells)
    return table


def category_lines(reliable: ReliableSeeds) -> list[str]:
    """Per category: accuracy, top seeds and the chi-square test (or why it is undefined)."""
    lines = []
    for name, c in reliable.categories.items():
        t = c["chi2"]
        acc = "-" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f} %"
        if t["p"] is None:
            test = f"chi-square: none ({t['note']})"
        else:
            verdict = "seed and success dependent" if t["significant"] else "no evidence of dependence"
            test = (f"chi-square {t['statistic']:.2f}, dof {t['dof']}, p {t['p']:.3g} ({verdict} at "
                    f"alpha {t['alpha']})")
            if t["low_expected"]:
                test += f"; {100 * t['low_expected']:.0f} % of expected counts < 5"
        lines.append(f"{name}: {c['correct']}/{c['n']} correct ({acc}); top seeds {c['top']}; {test}")
    return lines


def heatmap(reliable: ReliableSeeds, path: str | Path) -> Path:
    """A seed x category heatmap of accuracy (top seeds outlined) written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..errors import writing

    seeds, categories, acc = accuracy_matrix(reliable)
    height = min(40.0, 1.5 + 0.16 * len(seeds))
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(categories), height))
    try:
        image = ax.imshow(np.ma.masked_invalid(acc), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_xticks(range(len(categories)), categories, rotation=45, ha="right")
        step = max(1, len(seeds) // 50)
        ax.set_yticks(range(0, len(seeds), step), [str(s) for s in seeds[::step]])
        ax.set_ylabel("seed")
        index = {s: i for i, s in enumerate(seeds)}
        for j, name in enumerate(categories):
            for s in reliable.categories[name]["top"]:
                if int(s) in index:
                    ax.add_patch(Rectangle((j - 0.5, index[int(s)] - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
        fig.colorbar(image, ax=ax, label="accuracy")
        ax.set_title(f"{reliable.data['model'].get('model', '')}: accuracy per seed (red: top seeds)", fontsize=9)
        fig.tight_layout()
        with writing(path) as target:
            fig.savefig(target, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
