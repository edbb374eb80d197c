"""``diffprobe judge RUN --judge shapes|vlm``: a compositional verdict per image, stored in the run (resumable).

Each sample's question comes from its prompt's metadata (:func:`diffprobe.judges.questions.question_for`); a prompt
without one is skipped with the reason, never judged wrong. Verdicts are keyed by (image sha256, judge identity,
question), committed per batch, so a killed judge keeps what it stored and a re-run judges only the rest. Writes
a per-image JSONL (GenEval-style: key, prompt, seed, category, correct, answer, reason) and a summary per category
(count N, attribute, each relation) with Wilson 95 % intervals to ``RUN/scores/composition.json``.

``--judge vlm`` asks a vision-language model behind an OpenAI-compatible server (:mod:`diffprobe.judges.vlm`);
:func:`vlm_options` turns its command-line flags into the judge's options.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..console import message, resumable
from ..distributed import ReusePools
from ..errors import InputError, check_writable, writing
from ..judges.base import Judge
from ..metrics.provenance import write_json
from . import backend_options as bo
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


def category_order(category: str) -> tuple[int, int, str]:
    """Sort key of summary categories: counts by number, then attribute, then relations."""
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
    cats = {c: groups[c] for c in sorted(groups, key=category_order)}
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


def build_judges(names: list[str], options: dict[str, Any] | None = None) -> list[Judge]:
    """The judges named, each made with the options its factory takes (an option left at None is not given).
    An option given once applies to every named judge that takes it; one that none takes is an InputError."""
    from ..judges import judge_options, make_judge

    given = {k: v for k, v in (options or {}).items() if v is not None}
    accepted = [judge_options(name) for name in names]
    if unused := sorted(k for k in given if all(a is not None and k not in a for a in accepted)):
        raise InputError(f"option(s) {', '.join(unused)} apply to no chosen judge ({', '.join(names)}); "
                         "leave them out or choose a judge that takes them")
    return [make_judge(name, **{k: v for k, v in given.items() if a is None or k in a})
            for name, a in zip(names, accepted, strict=True)]


def judge_run(run_dir: Path, judge: str | Judge, *, out: Path | None = None, console: Console | None = None,
              progress: bool | Callable[[int], None] = True, batch_size: int | None = None, write: bool = True,
              summary_out: Path | None = None, backend: Any = None) -> JudgeResult:
    """Judge every image of the run with a question (resumable), then, with ``write``, write the per-image JSONL
    (``out``) and the summary JSON (``summary_out``; defaults under RUN/scores/). ``write=False`` only stores the
    verdicts and returns them (agreement between two judges reads them that way). ``batch_size`` defaults to
    :func:`default_batch_size`. ``backend`` (``diffprobe.distributed``) decides where batches are judged; verdicts
    are stored here either way. ``progress``: a bar (True), none (False), or a callable told the number of images
    each batch judges (a caller's own progress view)."""
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
    for target in (out, summary_out) if write else ():
        if target is not None:
            check_writable(target)
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
                if q is not None and (cannot := judge.supports(q)):
                    q, reason = None, cannot  # e.g. a colour question for a detector without a CLIP
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
        if todo:
            judge.check()  # a server that cannot answer fails here, before the progress bar and any verdict
        bar = Progress(TextColumn("[bold]judging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console, disable=progress is not True, transient=False)
        with bar:
            task = bar.add_task("judge", total=len(todo))
            batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
            for batch, verdicts in judged_batches(judge, batches, backend):
                store.add_verdicts(
                    VerdictRow(key=s.key, image_sha256=s.image_sha256, judge=identity, question=json.loads(qjson),
                               correct=v.correct, answer=v.answer, reason=v.reason, raw=v.raw)
                    for (s, _, qjson), v in zip(batch, verdicts, strict=True))
                result.judged += len(batch)
                bar.advance(task, len(batch))
                if callable(progress):
                    progress(len(batch))
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
        if not write:
            return result
        result.jsonl = out or store.root / SCORES_DIR / f"{SUMMARY_NAME}.jsonl"
        with writing(result.jsonl) as path:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows), encoding="utf-8")
        result.summary_path = summary_out or store.root / SCORES_DIR / f"{SUMMARY_NAME}.json"
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


JUDGE_HELP = ("Judge: shapes (exact judge of the shapes world), detector (open-vocabulary detector: --detector "
              "MODEL), vlm (a vision-language model behind an OpenAI-compatible server: --judge-url URL --judge-model "
              "NAME).")
BATCH_HELP = (f"Images per judge call (each batch is committed to the run at once; default {BATCH}, or 4 x "
              "--concurrency when that is more).")
DETECTOR_PANEL = "Detector judge (--judge detector)"


def detector_options(judges: list[str], *, detector: str | None, clip: str | None,
                     box_threshold: float | None, nms_iou: float | None, margin: float | None, pairs: str | None,
                     device: str | None) -> dict[str, Any]:
    """The detector judge's ``make_judge`` options from its flags: only the flags given, so the judge's own defaults
    apply to the rest; a detector flag with another judge is a mistake."""
    given = {k: v for k, v in {"detector": detector, "clip": clip, "box_threshold": box_threshold,
                               "nms_iou": nms_iou, "margin": margin, "pairs": pairs, "device": device}.items()
             if v is not None}
    if "detector" not in judges:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise InputError(f"{flags} belong to the detector judge; add --judge detector or leave them out")
        return {}
    if "detector" not in given:
        raise InputError("--judge detector needs --detector MODEL: a hub id (google/owlv2-base-patch16-ensemble, "
                         "IDEA-Research/grounding-dino-tiny) or a local folder")
    return given


VLM_PANEL = "VLM judge (--judge vlm)"
_VLM_FLAGS = {"url": "--judge-url", "model": "--judge-model", "templates": "--template", "detail": "--image-detail"}


def vlm_options(judges: list[str], *, url: str | None, model: str | None, templates: list[str] | None,
                parser: str | None, temperature: float | None, max_tokens: int | None, concurrency: int | None,
                timeout: float | None, retries: int | None, api_key_env: str | None,
                image_detail: str | None) -> dict[str, Any]:
    """The VLM judge's ``make_judge`` options from its flags (only those given, so the judge's defaults apply to the
    rest); a VLM flag with no VLM judge chosen is a mistake."""
    from ..judges.vlm import parse_template_option

    given = {k: v for k, v in {
        "url": url, "model": model, "parser": parser, "temperature": temperature, "max_tokens": max_tokens,
        "concurrency": concurrency, "timeout": timeout, "retries": retries, "api_key_env": api_key_env,
        "detail": image_detail,
        "templates": dict(parse_template_option(t) for t in templates) if templates else None}.items()
        if v is not None}
    if "vlm" not in judges and given:
        flags = ", ".join(_VLM_FLAGS.get(k, "--" + k.replace("_", "-")) for k in given)
        raise InputError(f"{flags} belong to the VLM judge; add --judge vlm or leave them out")
    return given if "vlm" in judges else {}


# The judges' own flags, defined once; with_judge_flags gives them to judge, score composition, seeds mine and dataset.
DetectorModel = Annotated[str | None, typer.Option("--detector", help="OWLv2 / OWL-ViT / Grounding DINO hub id or "
                          "local folder.", rich_help_panel=DETECTOR_PANEL)]
BoxThreshold = Annotated[float | None, typer.Option("--box-threshold", help="Boxes count when their score is above "
                         "this (default 0.3).", rich_help_panel=DETECTOR_PANEL)]
NmsIou = Annotated[float | None, typer.Option("--nms-iou", help="Boxes of one noun overlapping a better one by more "
                   "IoU are duplicates (default 0.5; 1 keeps all).", rich_help_panel=DETECTOR_PANEL)]
Margin = Annotated[float | None, typer.Option("--margin", help="Relation margin, a fraction of the two boxes' summed "
                   "size (default 0.1, as GenEval).", rich_help_panel=DETECTOR_PANEL)]
Pairs = Annotated[str | None, typer.Option("--pairs", help="Relations: any (some box of each object, default) or top "
                  "(the best box of each, as GenEval).", rich_help_panel=DETECTOR_PANEL)]
Clip = Annotated[str | None, typer.Option("--clip", help="CLIP hub id, alias (clip-vit-l14) or folder that reads box "
                 "colours; without it colour questions are skipped.", rich_help_panel=DETECTOR_PANEL)]
JudgeDevice = Annotated[str | None, typer.Option("--judge-device", help="Device of the detector and CLIP: cuda, mps, "
                        "cpu (default: the best available).", rich_help_panel=DETECTOR_PANEL)]
JudgeUrl = Annotated[str | None, typer.Option(
    "--judge-url", rich_help_panel=VLM_PANEL, help="The server's OpenAI-compatible base URL, e.g. "
    "http://127.0.0.1:8000/v1 (vLLM) or http://127.0.0.1:11434/v1 (Ollama).")]
JudgeModel = Annotated[str | None, typer.Option(
    "--judge-model", rich_help_panel=VLM_PANEL, help="The model name the server serves (GET /v1/models).")]
Template = Annotated[list[str] | None, typer.Option(
    "--template", rich_help_panel=VLM_PANEL, help="KIND=NAME or KIND=TEXT, KIND count, relation or attribute (e.g. "
    "count=number-count, or 'count=How many {plural} do you see?'); repeatable.")]
AnswerParser = Annotated[str | None, typer.Option(
    "--parser", rich_help_panel=VLM_PANEL, help="Answer parser: strict (default), rrs-substring (the reliable-seeds "
    "mining's substring rule) or rrs-eval (its evaluation's regexes).")]
Temperature = Annotated[float | None, typer.Option(
    "--temperature", rich_help_panel=VLM_PANEL,
    help="Sampling temperature (default 0, greedy; the reliable-seeds paper mined with 0.8).")]
MaxTokens = Annotated[int | None, typer.Option(
    "--max-tokens", rich_help_panel=VLM_PANEL, help="Most tokens per answer (default 300).")]
Concurrency = Annotated[int | None, typer.Option(
    "--concurrency", rich_help_panel=VLM_PANEL, help="Requests in flight at once (default 8).")]
Timeout = Annotated[float | None, typer.Option(
    "--timeout", rich_help_panel=VLM_PANEL,
    help="Seconds per request before it counts as failed and is retried (default 60).")]
Retries = Annotated[int | None, typer.Option(
    "--retries", rich_help_panel=VLM_PANEL, help="Retries of a request that failed with 429, 5xx, a timeout or a "
    "dropped connection, with exponential backoff (default 4).")]
ApiKeyEnv = Annotated[str | None, typer.Option(
    "--api-key-env", rich_help_panel=VLM_PANEL,
    help="Environment variable holding the API key (default DIFFPROBE_JUDGE_API_KEY).")]
ImageDetail = Annotated[str | None, typer.Option(
    "--image-detail", rich_help_panel=VLM_PANEL, help="low, high or auto: the image_url 'detail' field (OpenAI's "
    "API; the paper's GPT-4o evaluation used low). Default: not sent.")]


JUDGE_FLAGS: dict[str, Any] = {
    "detector": DetectorModel, "box_threshold": BoxThreshold, "nms_iou": NmsIou, "margin": Margin, "pairs": Pairs,
    "clip": Clip, "judge_device": JudgeDevice, "judge_url": JudgeUrl, "judge_model": JudgeModel, "template": Template,
    "parser": AnswerParser, "temperature": Temperature, "max_tokens": MaxTokens, "concurrency": Concurrency,
    "timeout": Timeout, "retries": Retries, "api_key_env": ApiKeyEnv, "image_detail": ImageDetail,
}


def with_judge_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a typer command every judge flag (``JUDGE_FLAGS``) without listing them in its signature: the command
    takes ``judge_flags: dict`` instead, the flags' values by name (None: not given)."""
    signature = inspect.signature(command, eval_str=True)
    hints = typing.get_type_hints(command, include_extras=True)
    kept = [p for p in signature.parameters.values() if p.name != "judge_flags"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
             for name, kind in JUDGE_FLAGS.items()]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = {name: kwargs.pop(name, None) for name in JUDGE_FLAGS}
        return command(*args, judge_flags=flags, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {k: v for k, v in hints.items() if k != "judge_flags"} | JUDGE_FLAGS
    return wrapper


def judge_flag_options(judges: list[str], flags: dict[str, Any]) -> dict[str, Any]:
    """The judges' ``make_judge`` options from the judge flags (each judge's flags checked against the judges chosen);
    :func:`build_judges` gives each judge the options its factory takes."""
    f = {name: flags.get(name) for name in JUDGE_FLAGS}
    options = detector_options(judges, detector=f["detector"], clip=f["clip"], box_threshold=f["box_threshold"],
                               nms_iou=f["nms_iou"], margin=f["margin"], pairs=f["pairs"], device=f["judge_device"])
    return options | vlm_options(judges, url=f["judge_url"], model=f["judge_model"], templates=f["template"],
                                 parser=f["parser"], temperature=f["temperature"], max_tokens=f["max_tokens"],
                                 concurrency=f["concurrency"], timeout=f["timeout"], retries=f["retries"],
                                 api_key_env=f["api_key_env"], image_detail=f["image_detail"])


def make_judges(names: list[str], flags: dict[str, Any]) -> list[Judge]:
    """The judges named, built from the judge flags of a command (see :func:`with_judge_flags`)."""
    return build_judges(names, judge_flag_options(names, flags))


class _EncodedBatches(Sequence):
    """Batches of (job key, image file bytes, question), read when a pool sends one."""

    def __init__(self, batches: list[list[tuple[Any, Any, str]]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):  # type: ignore[override]
        return [(s.key, s.image_path.read_bytes(), q) for s, q, _ in self.batches[index]]


def judged_batches(judge: Judge, batches: list[list[tuple[Any, Any, str]]], backend: Any = None):
    """(batch, its verdicts) for batches of (sample, question, question json): judged here, or on ``backend``'s
    workers (each makes the judge from ``judge.recipe``) in the order they finish."""
    if backend is None or getattr(backend, "name", "local") == "local" or not batches:
        for batch in batches:
            yield batch, judge.judge_many([s.image() for s, _, _ in batch], [q for _, q, _ in batch])
        return
    from ..errors import WorkerError
    from ..judges.workers import JudgingWorker

    recipe = getattr(judge, "recipe", None)
    if recipe is None:
        raise InputError(f"judge {judge.name} was not made by make_judge, so workers cannot make it; name it instead")
    pool = backend.start(JudgingWorker(recipe))
    try:
        if pool.info != judge.identity():
            raise WorkerError(f"the workers made judge {pool.info}, not {judge.identity()}; give every node the same "
                              "judge models")
        encoded = _EncodedBatches(batches)
        for done in pool.imap_unordered(encoded, describe=lambda b: f"judging job {b[0][0]} and {len(b) - 1} more"):
            yield batches[done.index], done.result
    finally:
        pool.close()


def register(app: typer.Typer) -> None:
    @app.command("judge")
    @with_judge_flags
    def judge_cmd(
        run: Path = typer.Argument(..., help="Run directory (made by 'diffprobe generate')."),
        judge: str = typer.Option("shapes", "--judge", "-j", help=JUDGE_HELP),
        out: Path | None = typer.Option(None, "--out", "-o", help="Per-image JSONL (default: "
                                        "RUN/scores/composition.jsonl); with --agreement, the agreement JSON "
                                        "(default: RUN/scores/agreement_<A>_vs_<B>.json)."),
        agreement: bool = typer.Option(False, "--agreement", help="Compare --judge (A) with --against (B) on the "
                                       "same images: accuracy, Cohen's kappa and the confusion table per "
                                       "category. Images a judge has not judged yet are judged first."),
        against: str | None = typer.Option(None, "--against", help="With --agreement: the judge to compare with "
                                           "(B), made with the same judge options where it takes them."),
        batch_size: int | None = typer.Option(None, "--batch-size", "-b", help=BATCH_HELP),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        judge_flags: dict[str, Any] = None,  # type: ignore[assignment]  # filled by with_judge_flags
        backend: str = bo.BACKEND,
        address: str | None = bo.ADDRESS,
        workers: int | None = bo.WORKERS,
        gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
    ) -> None:
        """Judge every image of a run against its prompt's question; re-running judges only what is new."""
        from ..store import open_run

        console = Console(stderr=True)
        names = [judge] + ([against] if against else [])
        options = judge_flag_options(names, judge_flags)
        if against is not None and not agreement:
            raise InputError("--against is for --agreement: add --agreement to compare the two judges")
        if agreement and against is None:
            raise InputError("--agreement needs --against NAME, the judge to compare --judge with")
        runner = ReusePools(bo.backend_from_flags(backend, address, workers, gpus_per_worker))
        if agreement and runner.name != "local":
            raise InputError("--agreement runs in this process; leave out --backend ray (judge each judge on Ray "
                             "first, then compare: the agreement reads their stored verdicts)")
        if options:
            open_run(run).close()  # a wrong run directory fails before a detector loads
        made: list[Judge] = []
        with resumable(console, f"stored verdicts are kept in {run}"):
            try:
                if agreement:
                    from .agreement import agreement_lines, agreement_run

                    made = build_judges([judge, against], options)
                    judge_a, judge_b = made
                    report = agreement_run(run, judge_a, judge_b, out=out, console=console, progress=not quiet,
                                           batch_size=batch_size, names=(judge, against))
                    console.print(message(f"agreement written to {report['path']}"))
                    for line in agreement_lines(report):
                        typer.echo(line)
                    return
                made = build_judges([judge], options)
                result = judge_run(run, made[0], out=out, console=console, progress=not quiet, batch_size=batch_size,
                                   backend=runner)
            finally:
                runner.close()
                for each in made:
                    each.close()
        bo.print_pool_summaries(console, runner.worker_stats())
        console.print(message(f"{result.judged} judged, {result.already} already judged, "
                              f"{sum(result.skipped.values())} skipped; per-image verdicts in {result.jsonl}, "
                              f"summary in {result.summary_path}"))
        for line in summary_lines(result.summary):
            typer.echo(line)
