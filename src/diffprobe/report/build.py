"""Build the report folder: ``index.html`` (jinja2, autoescaped), ``thumbs/`` (small JPEGs) and ``plots/`` (PNG).

Large runs are sampled, never rendered whole: at most ``max_prompts`` prompts (evenly spaced over the run's
prompt order) and ``max_seeds`` seeds appear in the grids, and the page says how many of each it shows. Only the
images shown are read, so a 30,000-image run costs a database read plus a few hundred thumbnails.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError, check_writable
from . import plots
from .data import Arm, gather_run, identities, measures, read_json, scs_contributions

SUMMARY_FILE = "summary.json"
AUDIT_KIND = "diffprobe-audit"
MAX_PROMPTS = 12
MAX_SEEDS = 8
THUMB = 128  # longest side of a thumbnail, pixels
TEMPLATES = Path(__file__).parent / "templates"
LONG_TEXT = 300  # prompts longer than this show their start, with the full text one click away


@dataclass
class Report:
    title: str
    kind: str  # "run" or "audit"
    source: Path
    arms: list[Arm]
    baseline: str | None = None
    comparisons: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm label -> metric -> result
    sweeps: list[dict[str, Any]] = field(default_factory=list)  # {"title", "param", "arms": [(label, value)]}
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def is_audit_dir(path: Path) -> bool:
    file = path / SUMMARY_FILE
    if not file.is_file():
        return False
    try:
        return read_json(file).get("kind") == AUDIT_KIND
    except (InputError, AttributeError):
        return False


def load(path: str | Path) -> Report:
    """A run directory or an audit directory, as a Report."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give a run directory (diffprobe generate) or an audit directory "
                         "(diffprobe audit)")
    if not is_audit_dir(path):
        arm = gather_run(path)
        return Report(title=f"Run {arm.label}", kind="run", source=path, arms=[arm], notes=list(arm.notes))
    summary = read_json(path / SUMMARY_FILE)
    arms = [gather_run(path / a["run_dir"], a["label"]) for a in summary["arms"]]
    notes = list(summary.get("notes", [])) + [n for a in arms for n in a.notes]
    return Report(title=f"Audit {summary.get('name') or path.resolve().name}", kind="audit", source=path, arms=arms,
                  baseline=summary.get("baseline"), comparisons=summary.get("comparisons", {}),
                  sweeps=summary.get("sweeps", []), notes=notes, settings=summary.get("config", {}))


# --- sampling the grids -----------------------------------------------------------------------------------------


def spread(items: list[Any], k: int) -> list[Any]:
    """``k`` items evenly spaced over ``items`` (all of them when there are at most ``k``), in order."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


def thumbnail(src: Path, sha: str, folder: Path) -> str | None:
    """A small JPEG of the image (named by its content hash, made once); None when the image cannot be read."""
    name = f"{sha[:24]}.jpg"
    target = folder / name
    if not target.exists():
        try:
            with Image.open(src) as im:
                im = im.convert("RGB")
                if max(im.size) > THUMB:
                    im.thumbnail((THUMB, THUMB))
                im.save(target, "JPEG", quality=85)
        except OSError:
            return None
    return f"thumbs/{name}"


def _anchor(text: str) -> str:
    return "p-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _verdict(info) -> tuple[str, str]:
    """(mark class, caption) for one image."""
    if not info.judged:
        return "", ""
    if info.correct is None:
        return "unparsed", f"unparsed: {info.reason or info.answer}"
    return ("right" if info.correct else "wrong"), info.reason or info.answer


def grids(report: Report, out: Path, max_prompts: int, max_seeds: int) -> tuple[list[dict[str, Any]], str]:
    """Per shown prompt, a row per arm of its images side by side. Column i holds each arm's image of the prompt's
    i-th seed: the same seed across arms that share a seed set (the column says which), else each arm's own (the
    cell says which), as the paired tests line them up."""
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    prompts = list(dict.fromkeys([p for a in report.arms for p in a.prompts]))
    width = max((len(seeds) for a in report.arms for seeds in a.seed_lists.values()), default=0)
    shown_prompts, shown_columns = spread(prompts, max_prompts), spread(list(range(width)), max_seeds)
    shares = {arm.label: scs_contributions(arm, shown_prompts) for arm in report.arms}
    out_grids, mixed = [], False
    for prompt in shown_prompts:
        lists = {arm.label: arm.seed_lists.get(prompt, []) for arm in report.arms}
        columns = []
        for i in shown_columns:
            seeds = {lst[i] for lst in lists.values() if i < len(lst)}
            columns.append(f"seed {next(iter(seeds))}" if len(seeds) == 1 else f"image {i + 1}")
            mixed = mixed or len(seeds) > 1
        rows = []
        for arm in report.arms:
            if not lists[arm.label]:  # the arm does not hold this prompt (a mined seed set's arm, say)
                continue
            cells = []
            for i, column in zip(shown_columns, columns, strict=True):
                seed = lists[arm.label][i] if i < len(lists[arm.label]) else None
                info = None if seed is None else arm.images.get((prompt, seed))
                if info is None:
                    cells.append({"seed": seed, "missing": True})
                    continue
                mark, caption = _verdict(info)
                src = thumbnail(info.path, info.sha256, thumbs)
                share = shares[arm.label].get((prompt, seed))
                cells.append({"seed": seed, "src": src, "mark": mark, "caption": caption, "missing": src is None,
                              "own_seed": "" if column.startswith("seed ") else f"seed {seed}",
                              "scs": "" if share is None else f"SCS share {share:.1f}"})
            rows.append({"label": arm.label, "cells": cells})
        out_grids.append({"prompt": prompt, "anchor": _anchor(prompt), "long": len(prompt) > LONG_TEXT,
                          "short": prompt[:LONG_TEXT], "columns": columns, "rows": rows})
    note = (f"Showing {len(shown_prompts)} of {len(prompts)} prompts (evenly spaced in run order) and "
            f"{len(shown_columns)} of {width} seeds per prompt, for every arm."
            if len(shown_prompts) < len(prompts) or len(shown_columns) < width
            else f"All {len(prompts)} prompts and {width} seeds per prompt.")
    if mixed:
        note += (" Arms with different seed sets are lined up by image index (image i: each arm's i-th seed of the "
                 "prompt, named under the image), as the paired tests pair them.")
    return out_grids, note


# --- tables ----------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2, pct: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def summary_table(report: Report, arm_measures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Columns present in any arm, and one row per arm with each cell's value, interval, difference to the
    baseline with its p-values, and whether it is the best of the column (higher is better, but for FD/FID)."""
    columns: list[tuple[str, str, str]] = []  # (id, title, kind)
    present = {k for m in arm_measures.values() for k in m}
    if "scs" in present:
        columns.append(("scs", "SCS", "mean"))
    categories = list(dict.fromkeys(c for m in arm_measures.values() for c in m.get("composition", {})))
    if categories:
        order = ["all"] + [c for c in categories if c != "all"]
        columns += [(f"composition:{c}", f"accuracy {c} (%)", "acc") for c in order]
    if "clip" in present:
        columns.append(("clip", "CLIP score", "mean"))
    if "irs" in present:
        columns.append(("irs", "IRS∞", "irs"))
    if "fd" in present:
        fid = all(m["fd"].get("is_fid") for m in arm_measures.values() if "fd" in m)
        columns.append(("fd", "FID" if fid else "FD (not FID)", "fd"))

    def cell_value(m: dict[str, Any], column: str) -> dict[str, Any] | None:
        if column.startswith("composition:"):
            return m.get("composition", {}).get(column.split(":", 1)[1])
        return m.get(column)

    def value_of(v: dict[str, Any] | None) -> float | None:
        if v is None:
            return None
        return v.get("accuracy") if "accuracy" in v else v.get("mean")

    # A measure over all prompts (SCS, accuracy 'all', ...) of an arm that holds only some of them (a mined seed
    # set's arm) is not comparable with the others': it is not a candidate for the best of such a column.
    every = set(p for a in report.arms for p in a.prompts)
    whole = {a.label for a in report.arms if set(a.prompts) == every}
    best: dict[str, float] = {}
    for cid, _, _ in columns:
        by_category = cid.startswith("composition:") and cid != "composition:all"
        values = [value_of(cell_value(m, cid)) for label, m in arm_measures.items() if by_category or label in whole]
        values = [v for v in values if v is not None]
        if len(values) > 1 and len(set(values)) > 1:  # a column where every arm ties has no best
            best[cid] = min(values) if cid == "fd" else max(values)  # a smaller distance is better
    rows = []
    for arm in report.arms:
        m = arm_measures[arm.label]
        comparison = report.comparisons.get(arm.label, {})
        cells = []
        for cid, _, kind in columns:
            v = cell_value(m, cid)
            value = value_of(v)
            pct = kind == "acc"
            candidate = arm.label in whole or (cid.startswith("composition:") and cid != "composition:all")
            cell = {"value": _fmt(value, 3 if kind == "irs" else 2, pct), "interval": "", "diff": "", "p": "",
                    "best": candidate and value is not None and cid in best and value == best[cid]}
            if v is not None and v.get("low") is not None:
                cell["interval"] = f"[{_fmt(v['low'], 3 if kind == 'irs' else 2, pct)}, " \
                                   f"{_fmt(v['high'], 3 if kind == 'irs' else 2, pct)}]"
            metric = "composition" if cid == "composition:all" else cid
            if (c := comparison.get(metric)) and c.get("difference") is not None:
                cell["diff"] = ("+" if c["difference"] >= 0 else "") + _fmt(c["difference"], 2, pct)
                cell["p"] = f"p={_p(c.get('p'))}, Holm {_p(c.get('p_holm'))}"
            cells.append(cell)
        rows.append({"label": arm.label, "baseline": arm.label == report.baseline, "n_images": arm.n_images,
                     "guidance": _describe_guidance(arm.guidance), "seeds": describe_seeds(arm), "cells": cells,
                     "coverage": "" if arm.label in whole else f"{len(arm.prompts)} of {len(every)} prompts"})
    return {"columns": [{"id": c, "title": t} for c, t, _ in columns], "rows": rows}


def describe_seeds(arm: Arm) -> str:
    """``0-3``, ``1, 5, 9`` or ``mined, 2 per prompt`` (the file is named in the heatmap and the provenance)."""
    if (source := arm.seed_source) is not None:
        latents = " (stored latents)" if source.get("stored_latents") else ""
        return f"mined, {source.get('k', 1)} per prompt{latents}"
    seeds = arm.seeds
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds[:6])) + (f", … ({len(seeds)})" if len(seeds) > 6 else "")


def _describe_guidance(guidance: dict[str, Any]) -> str:
    name = guidance.get("name", "?")
    keys = [k for k in ("scale", "concept_scale", "rescale") if guidance.get(k) not in (None, 0, 0.0)]
    return name + (" " + ", ".join(f"{k}={guidance[k]}" for k in keys) if keys else "")


def comparison_rows(report: Report) -> list[dict[str, Any]]:
    rows = []
    for label, metrics in report.comparisons.items():
        for metric, c in metrics.items():
            rows.append({"arm": label, "metric": metric, "n": c.get("n_pairs"), "test": c.get("test", ""),
                         "difference": _fmt(c.get("difference"), 4), "ci": "" if c.get("ci") is None else
                         f"[{_fmt(c['ci'][0], 4)}, {_fmt(c['ci'][1], 4)}]", "p": _p(c.get("p")),
                         "p_holm": _p(c.get("p_holm")), "extra": c.get("extra", ""), "note": c.get("note", "")})
    return rows


# --- figures -----------------------------------------------------------------------------------------------------


def figures(report: Report, arm_measures: dict[str, dict[str, Any]], out: Path) -> list[dict[str, str]]:
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    figs: list[dict[str, str]] = []

    def add(path: Path | None, title: str, caption: str) -> None:
        if path is not None:
            figs.append({"src": f"plots/{path.name}", "title": title, "caption": caption})

    scs = {a.label: list(a.per_prompt("scs").values()) for a in report.arms if a.per_prompt("scs")}
    if scs:
        add(plots.distribution(scs, folder / "scs_distribution.png", "SCS per prompt"), "SCS distribution",
            "Per-prompt Semantic Consistency Score of each arm (box: quartiles; points: prompts).")
    base = next((a for a in report.arms if a.label == report.baseline), None)
    if base is not None:
        for metric, name in (("scs", "SCS"), ("clip", "CLIP score")):
            b = base.per_prompt(metric)
            pairs = {a.label: [(b[p], v) for p, v in a.per_prompt(metric).items() if p in b]
                     for a in report.arms if a is not base}
            pairs = {k: v for k, v in pairs.items() if v}
            if b and pairs:
                add(plots.paired(base.label, pairs, folder / f"{metric}_paired.png", name), f"{name}: paired prompts",
                    f"Each point is one prompt: its {name} under the baseline (x) and under the arm (y); above the "
                    "diagonal the arm scores higher.")
    acc = {label: m["composition"] for label, m in arm_measures.items() if "composition" in m}
    if acc:
        add(plots.accuracy(acc, folder / "accuracy.png"), "Accuracy per category",
            "Share of images the judge found correct, per question category, with Wilson 95 % intervals.")
    for i, sweep in enumerate(report.sweeps):
        series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        for label, value in sweep["arms"]:
            for name, m in _headline(arm_measures.get(label, {})).items():
                series.setdefault(name, []).append((value, m))
        series = {k: v for k, v in series.items() if len(v) > 1}
        if series:
            baseline = _headline(arm_measures.get(report.baseline or "", {}))
            add(plots.dose_response(sweep["param"], series, baseline, folder / f"sweep_{i}.png", sweep["title"]),
                f"Dose-response: {sweep['title']}",
                f"Each measure against {sweep['param']}, with intervals; the dashed line is the baseline.")
    for source, labels in _seed_sources(report):
        add(_reliability(report, source, labels, folder), f"Seed reliability: {Path(source['file']).name}",
            "Accuracy of each mined seed per category in the reliable seeds file (red frames: the top seeds each "
            f"prompt draws from), used by {', '.join(labels)}.")
    for arm in report.arms:
        record = next((info.records for info in arm.images.values() if info.records.get("steps")), None)
        if record:
            file = folder / f"guidance_{hashlib.sha256(arm.label.encode()).hexdigest()[:10]}.png"
            info = next(i for i in arm.images.values() if i.records is record)
            add(plots.guidance_curves(record, file), f"Guidance record: {arm.label}",
                f"Per-step record of one image (prompt {info.prompt[:80]!r}, seed {info.seed}).")
    return figs


def _seed_sources(report: Report) -> list[tuple[dict[str, Any], list[str]]]:
    """Each reliable seeds file (by path and hash) with the labels of the arms whose seeds were drawn from it."""
    found: dict[tuple[str, str], tuple[dict[str, Any], list[str]]] = {}
    for arm in report.arms:
        if (source := arm.seed_source) is not None:
            found.setdefault((source["file"], source["sha256"]), (source, []))[1].append(arm.label)
    return list(found.values())


def _reliability(report: Report, source: dict[str, Any], labels: list[str], folder: Path) -> Path | None:
    """The seed x category heatmap of the reliable seeds file the arms used (``seeds show``'s), or a note when the
    file is gone or has changed since."""
    from ..sampling.latents import file_sha256
    from ..seeds.file import read_reliable
    from ..seeds.show import heatmap

    path = Path(source["file"])
    try:
        reliable = read_reliable(path)
    except InputError as err:
        report.notes.append(f"seed reliability heatmap of {', '.join(labels)} not shown: {err}")
        return None
    if file_sha256(reliable.path) != source["sha256"]:
        report.notes.append(f"the reliable seeds file {path} has changed since {', '.join(labels)} drew seeds from "
                            "it; its heatmap shows the file as it is now")
    return heatmap(reliable, folder / f"reliability_{source['sha256'][:12]}.png")


def _headline(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Measures with a mean and interval, for the dose-response view (accuracy as a percentage)."""
    out = {}
    if m.get("scs"):
        out["SCS"] = m["scs"]
    if (acc := m.get("composition", {}).get("all")) and acc.get("accuracy") is not None:
        out["accuracy (%)"] = {"mean": 100 * acc["accuracy"], "low": 100 * acc["low"], "high": 100 * acc["high"]}
    if m.get("clip"):
        out["CLIP score"] = m["clip"]
    if m.get("irs"):
        out["IRS∞"] = m["irs"]
    return out


def provenance(report: Report) -> list[dict[str, Any]]:
    rows = []
    for arm in report.arms:
        rows.append({"label": arm.label, "run": str(arm.run_dir),
                     "entries": [("model", arm.model), ("sampler", arm.sampler), ("guidance", arm.guidance),
                                 *([("mined seeds", arm.seed_source)] if arm.seed_source else []),
                                 ("library versions", arm.versions), *identities(arm).items()]})
    return rows


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


# --- the page ----------------------------------------------------------------------------------------------------


def environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def render(report: Report, out: Path, *, max_prompts: int = MAX_PROMPTS, max_seeds: int = MAX_SEEDS) -> Path:
    """Write the report folder at ``out``; returns the path of ``index.html``."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("plots",):  # figures are remade each time; thumbnails are content-addressed and kept
        shutil.rmtree(out / sub, ignore_errors=True)
    arm_measures = {a.label: measures(a) for a in report.arms}
    grid, grid_note = grids(report, out, max_prompts, max_seeds)
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    html = environment().get_template("index.html").render(
        title=report.title, kind=report.kind, source=str(report.source), baseline=report.baseline,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        table=summary_table(report, arm_measures), comparisons=comparison_rows(report), grids=grid,
        grid_note=grid_note, figures=figures(report, arm_measures, out), notes=report.notes,
        provenance=provenance(report), settings=_json(report.settings) if report.settings else "", css=css,
        as_json=_json)
    index = out / "index.html"
    index.write_text(html, encoding="utf-8")
    return index


def build_report(path: str | Path, out: str | Path | None = None, *, max_prompts: int = MAX_PROMPTS,
                 max_seeds: int = MAX_SEEDS) -> Path:
    """Report on a run or an audit directory; writes to ``out`` (default ``PATH/report``), returns index.html."""
    if max_prompts < 1 or max_seeds < 1:
        raise InputError("--max-prompts and --max-seeds must be at least 1")
    report = load(path)
    target = check_writable(Path(out) if out is not None else Path(path) / "report", directory=True)
    return render(report, target, max_prompts=max_prompts, max_seeds=max_seeds)
