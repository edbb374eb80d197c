"""``diffprobe judge RUN --judge shapes|vlm``: a compositional verdict per image, stored in the run (resumable).

Each sample's question comes from its prompt's metadata (:func:`diffprobe.judges.questions.question_for`); a prompt
without one is skipped with the reason, never judged wrong. Verdicts are keyed by (image sha256, judge identity,
question), committed per batch, so a killed judge keeps what it stored and a re-run judges only the rest. Writes
a per-image JSONL (GenEval-style: key, prompt, seed, category, correct, answer, reason) and a summary per category
(count N, attribute, each relation) with Wilson 95 % intervals to ``RUN/scores/composition.json``.

``--judge vlm`` asks a vision-language model behind an OpenAI-compatible server (:mod:`diffprobe.judges.vlm`);
:func:`judge_from_flags` builds the judge from the command-line flags.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..console import message
from ..errors import InputError, check_writable, writing
from ..judges.base import Judge
from ..metrics.provenance import write_json
from .export import SCORES_DIR

SUMMARY_NAME = "composition"
VLM_PANEL = "VLM judge (--judge vlm)"
BATCH = 16


def category_of(question: dict[str, Any]) -> str:
    """The summary group of a question (dict form): ``count N``, ``attribute`` or ``relation <name>``."""
    kind = question.get("kind")
    if kind == "count":
        return f"count {question.get('count')}"
    if kind == "relation":
        return f"relation {question.get('relation')}"
    return str(kind)


def _order(category: str) -> tuple[int, int, str]:
    kind, _, rest = category.partition(" ")
    rank = {"count": 0, "attribute": 1, "relation": 2}.get(kind, 3)
    return (rank, int(rest) if kind == "count" and rest.isdigit() else 0, rest)


@dataclass
class JudgeResult:
    run_dir: Path
    judge: dict[str, Any]
    judged: int = 0  # verdicts made by this call
    already: int = 0  # verdicts that were stored before
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> images skipped
    rows: list[dict[str, Any]] = field(default_factory=list)  # per image, GenEval-style
    summary: dict[str, Any] = field(default_factory=dict)
    jsonl: Path | None = None
    summary_path: Path | None = None


def summarize(rows: list[dict[str, Any]], skipped: Counter[str]) -> dict[str, Any]:
    """Per category (and ``all``): images, parsed, correct, unparsed, accuracy over parsed, Wilson 95 % CI."""
    from ..metrics.stats import wilson

    groups: dict[str, list[bool | None]] = {}
    for r in rows:
        groups.setdefault(r["category"], []).append(r["correct"])
    cats = {c: groups[c] for c in sorted(groups, key=_order)}
    cats["all"] = [r["correct"] for r in rows]
    out: dict[str, Any] = {}
    for name, values in cats.items():
        parsed = [v for v in values if v is not None]
        n, k = len(parsed), sum(parsed)
        lo, hi = wilson(k, n)
        out[name] = {"images": len(values), "n": n, "correct": k, "unparsed": len(values) - n,
                     "accuracy": k / n if n else None, "ci95": [lo, hi]}
    return {"categories": out, "skipped": sum(skipped.values()), "skipped_reasons": dict(skipped)}


def default_batch_size(judge: Judge) -> int:
    """Images per judge call: at least :data:`BATCH`, and enough to keep a concurrent judge's requests busy."""
    return max(BATCH, 4 * int(getattr(judge, "concurrency", 1)))


def judge_run(run_dir: Path, judge: str | Judge, *, out: Path | None = None, console: Console | None = None,
              progress: bool = True, batch_size: int | None = None) -> JudgeResult:
    from ..judges import make_judge
    from ..judges.questions import question_dict, question_for
    from ..prompts import Prompt
    from ..store import VerdictRow, canonical_identity, open_run

    console = console or Console(stderr=True)
    if isinstance(judge, str):
        judge = make_judge(judge)
    batch_size = default_batch_size(judge) if batch_size is None else batch_size
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if out is not None:
        check_writable(out)
    store = open_run(run_dir, write=True)
    try:
        report = store.repair()
        if report:
            console.print(message(f"{store.root}: {report}", "repaired"))
        identity = judge.identity()
        result = JudgeResult(store.root, identity)
        questions: dict[str, tuple[Any, str]] = {}
        todo, judged_items = [], []
        done = store.judged(identity)
        for s in store.samples():
            if s.prompt not in questions:
                q, reason = question_for(Prompt(s.prompt, s.prompt_meta))
                questions[s.prompt] = (q, reason if q is None else canonical_identity(question_dict(q)))
            q, qjson = questions[s.prompt]
            if q is None:
                result.skipped[qjson] += 1
                continue
            if (s.image_sha256, qjson) in done:
                result.already += 1
            elif not s.image_path.is_file():
                result.skipped["the image file is missing (re-run generate with --repair)"] += 1
                continue
            else:
                todo.append((s, q, qjson))
            judged_items.append((s, qjson))
        bar = Progress(TextColumn("[bold]judging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console, disable=not progress, transient=False)
        with bar:
            task = bar.add_task("judge", total=len(todo))
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                verdicts = judge.judge_many([s.image() for s, _, _ in batch], [q for _, q, _ in batch])
                store.add_verdicts(
                    VerdictRow(key=s.key, image_sha256=s.image_sha256, judge=identity, question=json.loads(qjson),
                               correct=v.correct, answer=v.answer, reason=v.reason, raw=v.raw)
                    for (s, _, qjson), v in zip(batch, verdicts, strict=True))
                result.judged += len(batch)
                bar.advance(task, len(batch))
        stored = {(v.image_sha256, canonical_identity(v.question)): v for v in store.judge_verdicts(identity)}
        for s, qjson in judged_items:
            v = stored.get((s.image_sha256, qjson))
            if v is None:
                continue
            question = json.loads(qjson)
            result.rows.append({"key": s.key, "prompt": s.prompt, "seed": s.seed, "category": category_of(question),
                                "correct": v.correct, "answer": v.answer, "reason": v.reason,
                                "question": question, "image_sha256": s.image_sha256})
        result.summary = {"metric": SUMMARY_NAME, "judge": identity, "run": str(store.root),
                          **summarize(result.rows, result.skipped)}
        result.jsonl = out or store.root / SCORES_DIR / f"{SUMMARY_NAME}.jsonl"
        with writing(result.jsonl) as path:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows), encoding="utf-8")
        result.summary_path = store.root / SCORES_DIR / f"{SUMMARY_NAME}.json"
        per_image = [{"key": r["key"], "prompt": r["prompt"], "seed": r["seed"], "category": r["category"],
                      "score": float(r["correct"])} for r in result.rows if r["correct"] is not None]
        write_json({**result.summary, "per_image": per_image}, result.summary_path)
    finally:
        store.close()
    return result


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for name, c in summary["categories"].items():
        lo, hi = c["ci95"]
        acc = "-" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f} %"
        lines.append(f"{name}: {c['correct']}/{c['n']} correct ({acc}, 95 % CI {100 * lo:.1f}-{100 * hi:.1f} %)"
                     + (f", {c['unparsed']} unparsed" if c["unparsed"] else ""))
    lines.append(f"skipped: {summary['skipped']} image(s)")
    lines += [f"  {n} x {reason}" for reason, n in summary["skipped_reasons"].items()]
    return lines


def judge_from_flags(judge: str, *, url: str | None = None, model: str | None = None,
                     templates: list[str] | None = None, parser: str | None = None, temperature: float | None = None,
                     max_tokens: int | None = None, concurrency: int | None = None, timeout: float | None = None,
                     retries: int | None = None, api_key_env: str | None = None,
                     image_detail: str | None = None) -> Judge:
    """The judge the command-line flags describe; a flag that the chosen judge does not take is an InputError."""
    from ..judges import make_judge
    from ..judges.vlm import parse_template_option

    vlm = {"url": url, "model": model, "parser": parser, "temperature": temperature, "max_tokens": max_tokens,
           "concurrency": concurrency, "timeout": timeout, "retries": retries, "api_key_env": api_key_env,
           "detail": image_detail,
           "templates": dict(parse_template_option(t) for t in templates) if templates else None}
    given = {k: v for k, v in vlm.items() if v is not None}
    if judge == "vlm":
        return make_judge("vlm", **given)
    if given:
        flags = ", ".join("--" + {"url": "judge-url", "model": "judge-model", "templates": "template",
                                      "detail": "image-detail"}.get(
            k, k.replace("_", "-")) for k in given)
        raise InputError(f"{flags} only apply to --judge vlm (the judge is {judge!r})")
    return make_judge(judge)


def register(app: typer.Typer) -> None:
    @app.command("judge")
    def judge_cmd(
        run: Path = typer.Argument(..., help="Run directory (made by 'diffprobe generate')."),
        judge: str = typer.Option("shapes", "--judge", "-j", help="Judge: shapes (exact judge of the shapes world) "
                                  "or vlm (a vision-language model behind an OpenAI-compatible server)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Per-image JSONL (default: "
                                        "RUN/scores/composition.jsonl)."),
        batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Images per judge call (each batch "
                                              f"is committed to the run at once; default {BATCH}, or 4 x "
                                              "--concurrency when that is more)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        # --judge vlm
        judge_url: str | None = typer.Option(
            None, "--judge-url", rich_help_panel=VLM_PANEL,
            help="The server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (vLLM) or "
                 "http://127.0.0.1:11434/v1 (Ollama)."),
        judge_model: str | None = typer.Option(
            None, "--judge-model", rich_help_panel=VLM_PANEL,
            help="The model name the server serves (GET /v1/models)."),
        template: list[str] | None = typer.Option(
            None, "--template", rich_help_panel=VLM_PANEL,
            help="KIND=NAME or KIND=TEXT, KIND count, relation or attribute (e.g. count=number-count, or "
                 "'count=How many {plural} do you see?'); repeatable."),
        parser: str | None = typer.Option(
            None, "--parser", rich_help_panel=VLM_PANEL,
            help="Answer parser: strict (default) or rrs-substring (the reliable-seeds code's substring rule)."),
        temperature: float | None = typer.Option(
            None, "--temperature", rich_help_panel=VLM_PANEL,
            help="Sampling temperature (default 0, greedy; the reliable-seeds paper mined with 0.8)."),
        max_tokens: int | None = typer.Option(
            None, "--max-tokens", rich_help_panel=VLM_PANEL, help="Most tokens per answer (default 300)."),
        concurrency: int | None = typer.Option(
            None, "--concurrency", rich_help_panel=VLM_PANEL, help="Requests in flight at once (default 8)."),
        timeout: float | None = typer.Option(
            None, "--timeout", rich_help_panel=VLM_PANEL,
            help="Seconds per request before it counts as failed and is retried (default 60)."),
        retries: int | None = typer.Option(
            None, "--retries", rich_help_panel=VLM_PANEL,
            help="Retries of a request that failed with 429, 5xx, a timeout or a dropped connection, with "
                 "exponential backoff (default 4)."),
        api_key_env: str | None = typer.Option(
            None, "--api-key-env", rich_help_panel=VLM_PANEL,
            help="Environment variable holding the API key (default DIFFPROBE_JUDGE_API_KEY)."),
        image_detail: str | None = typer.Option(
            None, "--image-detail", rich_help_panel=VLM_PANEL,
            help="low, high or auto: the image_url 'detail' field (OpenAI's API; the paper's GPT-4o evaluation "
                 "used low). Default: not sent."),
    ) -> None:
        """Judge every image of a run against its prompt's question; re-running judges only what is new."""
        console = Console(stderr=True)
        the_judge = judge_from_flags(judge, url=judge_url, model=judge_model, templates=template, parser=parser,
                                     temperature=temperature, max_tokens=max_tokens, concurrency=concurrency,
                                     timeout=timeout, retries=retries, api_key_env=api_key_env,
                                     image_detail=image_detail)
        try:
            result = judge_run(run, the_judge, out=out, console=console, progress=not quiet, batch_size=batch_size)
        except KeyboardInterrupt:
            console.print(message(f"interrupted: stored verdicts are kept in {run}; run the same command to resume"))
            sys.exit(130)
        finally:
            the_judge.close()
        console.print(message(f"{result.judged} judged, {result.already} already judged, "
                              f"{sum(result.skipped.values())} skipped; per-image verdicts in {result.jsonl}, "
                              f"summary in {result.summary_path}"))
        for line in summary_lines(result.summary):
            typer.echo(line)
