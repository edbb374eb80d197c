"""``diffprobe export``: the samples table of a run as JSONL (nested) or Parquet (flattened columns), with the
per-image results kept next to it (scores, cached features, verdicts) joined to each row.

Export only reads the run: a missing image is marked (``image_missing``) and reported, never repaired.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..errors import InputError, writing

FORMATS = ("jsonl", "parquet")
SCORES_DIR = "scores"  # where 'diffprobe score' writes RUN/scores/<metric>.json by default


def per_image_scores(run_dir: Path) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Sample key -> {name: score} from every ``RUN/scores/<name>.json`` whose ``per_image`` rows carry a sample
    ``key`` and a numeric ``score`` (``score clip`` writes them; per-prompt-only files have none), and notes
    on files that were passed over."""
    scores: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    folder = Path(run_dir) / SCORES_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            notes.append(f"ignored {path} (not readable JSON: {err})")
            continue
        rows = data.get("per_image") if isinstance(data, dict) else None
        if rows is None:
            continue  # a metric without per-image values (scs, irs)
        if not isinstance(rows, list):
            notes.append(f"ignored {path} ('per_image' is not a list)")
            continue
        for row in rows:
            if not isinstance(row, dict):
                continue
            key, value = row.get("key"), row.get("score")
            if isinstance(key, str) and isinstance(value, int | float) and not isinstance(value, bool):
                scores.setdefault(key, {})[path.stem] = float(value)
    return scores, notes


def export_run(run_dir: Path, fmt: str | None = None, out: Path | None = None) -> tuple[Path, int, list[str]]:
    """Write the export file (format from ``fmt`` or ``out``'s suffix, default jsonl); returns (path, rows, notes).

    Each row gets ``scores`` (per-image scores under RUN/scores, by file name), ``features`` (ids of the embedders
    whose features of the image are cached in the run) and, when the run has a verdicts table, ``verdicts``."""
    from ..embed.cache import CACHE_FILE, FeatureCache
    from ..store import open_run

    if fmt is None:
        fmt = out.suffix.lstrip(".").lower() if out is not None and out.suffix else "jsonl"
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = out or Path(run_dir) / f"samples.{fmt}"
    with open_run(run_dir) as store:
        scores, notes = per_image_scores(store.root)
        cached: dict[str, list[str]] = {}
        if (store.root / CACHE_FILE).is_file():
            cache = FeatureCache(store.root / CACHE_FILE, read_only=True)
            try:
                cached = cache.embedders()
            finally:
                cache.close()
        names = sorted({name for per_key in scores.values() for name in per_key})
        extra: dict[str, dict[str, Any]] = {}
        for sample in store.samples():
            extra[sample.key] = {"features": cached.get(sample.image_sha256, [])}
            if names:  # every row gets every score name (None where the image has none), so columns line up
                extra[sample.key]["scores"] = {name: scores.get(sample.key, {}).get(name) for name in names}
        if check := store.check():
            notes.append(check.note())
        with writing(out):
            rows = store.export_jsonl(out, extra) if fmt == "jsonl" else store.export_parquet(out, extra)
    return out, rows, notes


def register(app: typer.Typer) -> None:
    if any(cmd.name == "export" for cmd in app.registered_commands):
        return  # already registered by another module

    @app.command("export")
    def export_cmd(
        run_dir: Path = typer.Argument(..., help="A run directory made by 'diffprobe generate'."),
        fmt: str | None = typer.Option(None, "--format", "-f", help="jsonl (nested) or parquet (flat columns); "
                                       "default: from --out's suffix, else jsonl."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: RUN_DIR/samples.<format>)."),
    ) -> None:
        """Export a run's samples with their provenance and per-image results (scores, verdicts)."""
        path, rows, notes = export_run(run_dir, fmt, out)
        for note in notes:
            typer.echo(f"note: {note}", err=True)
        typer.echo(f"{rows} samples -> {path}")
