"""The generation driver: expand a RunSpec into jobs, skip what the run already holds, sample the rest in
batches and write every finished batch through the store.

The same call twice generates nothing the second time; a killed call loses only its unfinished batch.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .console import message
from .distributed import Backend, LocalBackend, Pool, WorkerStats
from .errors import InputError, StorageError
from .guidance import Guider, make_guider
from .models.base import ModelAdapter
from .prompts import Prompt
from .sampling.latents import InitialLatents, read_initial_latents
from .spec import RunSpec, canonical_json, job_key
from .store import NewSample, RepairReport, RunStore, check_new_run_dir, create_run, is_run_dir, open_run
from .versions import library_versions

if TYPE_CHECKING:
    import torch

# Recorded with every image, for the record only: job keys never include versions, so upgrades do not regenerate.
IMAGE_PACKAGES = ("diffprobe", "torch", "diffusers", "transformers")
SUITE_CONCEPTS = "suite"  # guidance param extractor="suite": concepts from each prompt's suite metadata


class SuiteConcepts:
    """A concept extractor that looks up each prompt's reference noun phrases (``meta["noun_phrases"]``)."""

    name = SUITE_CONCEPTS

    def __init__(self, metas: dict[str, dict[str, Any]]):
        self.table: dict[str, list[str]] = {}
        for text, meta in metas.items():
            phrases = meta.get("noun_phrases")
            if isinstance(phrases, str):  # csv cells: "a red car;a green bench"
                phrases = [p.strip() for p in phrases.split(";") if p.strip()]
            if phrases:
                self.table[text] = list(phrases)

    def __call__(self, prompt: str) -> list[str]:
        return list(self.table[prompt])


def make_run_guider(spec: RunSpec, metas: dict[str, dict[str, Any]],
                    defaults: dict[str, Any] | None = None) -> Guider:
    """The guider ``spec`` names; ``extractor="suite"`` becomes a lookup in the prompts' metadata.

    ``defaults`` (the model's recommended parameters, ``adapter.guidance_defaults()``) apply where the spec sets
    none.
    """
    params = {**(defaults or {}), **spec.guidance.params}
    if params.get("extractor") == SUITE_CONCEPTS:
        lookup = SuiteConcepts(metas)
        if missing := [p for p in spec.prompts if p not in lookup.table]:
            raise InputError(f"--concepts suite needs prompts with reference noun phrases (a 'noun_phrases' field, "
                             f"as in --prompts cc500); {len(missing)} prompt(s) have none, e.g. {missing[0]!r}")
        params["extractor"] = lookup
    return make_guider(spec.guidance.name, **params)


@dataclass(frozen=True)
class Job:
    key: str
    prompt: str
    seed: int


@dataclass
class GenerateResult:
    run_dir: Path
    total: int  # jobs in the spec
    generated: int  # made by this call
    skipped: int  # already in the run
    seconds: float  # sampling time of this call
    truncated_prompts: list[str] = field(default_factory=list)
    repair: RepairReport = field(default_factory=RepairReport)
    workers: list[WorkerStats] = field(default_factory=list)  # per worker of the backend: batches, images, time
    model: ModelFacts | None = None  # what the workers reported of the model (None: the run was complete already)

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def load_run_model(spec: RunSpec) -> ModelAdapter:
    """The model ``spec`` names, loaded (by the driver of a local run, and by every worker of a distributed one)."""
    from .models import load_model

    return load_model(spec.model.name, family=spec.model.family, device=spec.model.device,
                      dtype=spec.model.dtype, scheduler=spec.sampler.scheduler, lora=spec.model.lora)


@dataclass(frozen=True)
class ModelFacts:
    """What the driver needs to know of a loaded model (job keys, provenance, warnings); small enough to come back
    from a worker that holds the model. Reads like the adapter where ``resolved_config`` looks."""

    model_identity: dict[str, Any]
    default_size: tuple[int, int]
    default_steps: int
    dtype: Any
    model_guidance_defaults: dict[str, Any]
    family: str
    scheduler_class: str
    device: str
    token_limit: int
    latent_channels: int
    vae_scale_factor: int

    @classmethod
    def of(cls, adapter: ModelAdapter) -> ModelFacts:
        return cls(adapter.identity(), tuple(adapter.default_size), adapter.default_steps, adapter.dtype,
                   dict(adapter.guidance_defaults()), adapter.family, type(adapter.scheduler).__name__,
                   str(adapter.device), adapter.token_limit, adapter.latent_channels, adapter.vae_scale_factor)

    def identity(self) -> dict[str, Any]:
        return self.model_identity

    def guidance_defaults(self) -> dict[str, Any]:
        return self.model_guidance_defaults


@dataclass
class BatchOutput:
    images: list[Any]  # PIL images, one per job
    records: list[dict[str, Any]]
    truncated: list[bool]


def sample_batch(adapter: ModelAdapter, guider: Guider, jobs: Sequence[Job], sampler: dict[str, Any],
                 max_model_batch: int | None, latents: torch.Tensor | None = None) -> BatchOutput:
    """One batch of jobs sampled: the step every backend runs, in process or on a worker. ``latents``: the jobs'
    starting noise (stored initial latents), else drawn from their seeds."""
    from .sampling import sample

    out = sample(adapter, guider, [j.prompt for j in jobs], [j.seed for j in jobs], steps=sampler["steps"],
                 height=sampler["height"], width=sampler["width"], generator_device=sampler["generator_device"],
                 max_model_batch=max_model_batch, latents=latents)
    return BatchOutput(list(out.images), list(out.records) or [{} for _ in jobs],
                       list(out.truncated) or [False] * len(jobs))


@dataclass(frozen=True)
class BatchTask:
    guider: Guider
    jobs: list[Job]
    sampler: dict[str, Any]
    max_model_batch: int | None
    latents: torch.Tensor | None = None  # the jobs' stored initial latents, where the run starts from them

    def __len__(self) -> int:
        return len(self.jobs)


def describe_jobs(task: BatchTask) -> str:
    first = task.jobs[0]
    more = f" and {len(task.jobs) - 1} more" if len(task.jobs) > 1 else ""
    return f"job {first.key} (prompt {first.prompt[:60]!r}, seed {first.seed}){more}"


class GenerationWorker:
    """Loads the run's model once where it runs (``adapter`` reuses one already loaded in this process) and
    samples batches; it refuses a size the model cannot make before any run directory exists."""

    def __init__(self, spec: RunSpec, adapter: ModelAdapter | None = None):
        self.spec = spec
        self.adapter = adapter

    @property
    def kind(self) -> str:
        return f"generation ({self.spec.model.name})"

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "adapter": None}  # a worker loads its own model; a loaded one never travels

    def pool_key(self) -> str:
        """What ``setup`` loads and checks: runs that agree on it (an audit's arms of one model) share a pool."""
        s = self.spec
        return canonical_json({"model": s.model.model_dump(mode="json"), "scheduler": s.sampler.scheduler,
                               "size": [s.sampler.height, s.sampler.width]})

    def setup(self) -> ModelFacts:
        if self.adapter is None:
            self.adapter = load_run_model(self.spec)
        default_h, default_w = self.adapter.default_size
        self.adapter.check_size(self.spec.sampler.height or default_h, self.spec.sampler.width or default_w)
        return ModelFacts.of(self.adapter)

    def run(self, task: BatchTask) -> BatchOutput:
        assert self.adapter is not None, "setup() runs first"
        return sample_batch(self.adapter, task.guider, task.jobs, task.sampler, task.max_model_batch, task.latents)


def resolved_config(adapter: ModelAdapter | ModelFacts, spec: RunSpec, guider: Guider,
                    latents: InitialLatents | None = None) -> dict[str, Any]:
    """What every job key of this run is made of, besides prompt and seed (batch size deliberately absent).
    ``latents``: the starting noise read from ``spec.sampler.initial_latents`` (its content hash is recorded)."""
    height, width = spec.sampler.height, spec.sampler.width
    default_h, default_w = adapter.default_size
    sampler = {
        "steps": spec.sampler.steps or adapter.default_steps,
        "scheduler": spec.sampler.scheduler or "default",
        "height": height or default_h,
        "width": width or default_w,
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "generator_device": spec.sampler.generator_device,
    }
    if latents is not None:  # only when set, so the keys of seeded runs stay as they were
        sampler["initial_latents"] = latents.sha256
    return {"model": adapter.identity(), "sampler": sampler, "guidance": guider.config()}


def plan(prompts: Sequence[str], seeds: Sequence[int], config: dict[str, Any]) -> list[Job]:
    """All jobs, prompt-major (every seed of the first prompt, then the next prompt)."""
    return plan_pairs([(p, s) for p in prompts for s in seeds], config)


def plan_pairs(pairs: Sequence[tuple[str, int]], config: dict[str, Any]) -> list[Job]:
    """The jobs of these (prompt, seed) pairs (``RunSpec.pairs``: the grid, or each prompt's own seeds)."""
    return [Job(job_key(config["model"], p, s, config["sampler"], config["guidance"]), p, s) for p, s in pairs]


def check_seed_source(spec: RunSpec, config: dict[str, Any]) -> None:
    """Seeds chosen for other settings (``spec.seed_source.requires``) are refused, naming what differs: a seed
    integer gives the same starting noise only with the same generator device, dtype and latent shape."""
    source = spec.seed_source
    if source is None or not source.requires:
        return
    diffs = []
    for name, wanted in sorted(source.requires.items()):
        now = _nested(config, name)
        if now != wanted:
            diffs.append(f"{name}: {wanted!r} (seeds file) != {now!r} (now)")
    if diffs:
        raise InputError(f"the seeds in {source.file} were mined with other settings ({'; '.join(diffs)}); "
                         "generate with the same model, size, dtype and --generator-device, or pass "
                         "--use-stored-latents to start from the stored initial latents instead")


def _nested(config: dict[str, Any], name: str) -> Any:
    """``config["sampler"]["height"]`` for ``"sampler.height"`` (None where a part is missing)."""
    value: Any = config
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def batches(jobs: Sequence[Job], guider: Guider, batch_size: int) -> list[list[Job]]:
    """Consecutive jobs whose prompts have the same number of guidance branches, up to ``batch_size`` each
    (one batched model call needs equal branch counts)."""
    out: list[list[Job]] = []
    current: list[Job] = []
    current_k = -1
    for job in jobs:
        k = len(guider.branches(job.prompt))
        if current and (k != current_k or len(current) == batch_size):
            out.append(current)
            current = []
        current.append(job)
        current_k = k
    if current:
        out.append(current)
    return out


def open_existing(out: str | Path, spec: RunSpec, *, extend: bool, console: Console,
                  repair: bool = False) -> tuple[RunStore, RepairReport]:
    """Open the run at ``out`` for writing, check ``spec`` against it (RunMismatchError) and repair it (see
    ``RunStore.repair``; ``repair`` drops rows whose image is missing so they are generated again). A run that
    holds no image yet (its first call failed or was stopped early) simply takes the new spec."""
    store = open_run(out, write=True)
    try:
        stored = store.spec
        if len(store) == 0 and stored is not None and stored != spec:
            console.print(message(f"note: {store.root} held no images yet; its settings are replaced"))
            store.set_meta("spec", spec.model_dump(mode="json"))
            store.set_meta("config", None)
        else:
            store.check_spec(spec, extend=extend)
        report = store.repair(drop_missing=repair)
    except BaseException:
        store.close()
        raise
    if report:
        console.print(message(f"{store.root}: {report}", "repaired"))
    return store, report


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} images/s" if speed else "- images/s", style="progress.data.speed")


def generate(
    spec: RunSpec,
    out: str | Path,
    *,
    prompts: Sequence[Prompt] = (),
    batch_size: int = 1,
    max_model_batch: int | None = None,
    new: bool = False,
    extend: bool = False,
    repair: bool = False,
    adapter: ModelAdapter | None = None,
    console: Console | None = None,
    progress: bool | Callable[[int], None] = True,
    backend: Backend | None = None,
) -> GenerateResult:
    """Generate every (prompt, seed) job of ``spec`` that ``out`` does not hold yet.

    ``prompts`` may carry per-prompt metadata (stored in the run's prompts table); ``adapter`` reuses an already
    loaded model (it must be the model ``spec`` names). ``max_model_batch`` caps the rows of one denoiser call
    (images x guidance branches); by default a call holds them all and is split only on running out of GPU memory.
    ``repair`` drops the rows of an existing run whose image file is missing, so they are generated again (without
    it they are reported and kept). ``backend`` decides where batches are sampled (default: in this process); the
    store is written here either way. ``progress``: a bar (True), none (False), or a callable told the number of
    images each stored batch adds (a caller's own progress view; no bar then).
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")
    if max_model_batch is not None and max_model_batch < 1:
        raise InputError(f"--max-model-batch must be at least 1 (got {max_model_batch})")
    console = console or Console(stderr=True)
    if spec.sampler.generator_device == "cuda" and not _cuda_available():
        raise InputError("--generator-device cuda needs a CUDA device; use --generator-device cpu (the default)")
    # Check everything that can fail before a new run directory is made, so a typo leaves nothing behind.
    store, report, pool = None, RepairReport(), None
    if is_run_dir(out) and not new:
        store, report = open_existing(out, spec, extend=extend, console=console, repair=repair)
    else:
        check_new_run_dir(out, new=new)
    try:
        metas: dict[str, dict[str, Any]] = {text: {} for text in spec.prompts}
        if store is not None:  # metadata of prompts from an earlier call (a resumed run may not pass them)
            metas.update(store.prompt_meta())
        metas.update({p.text: p.meta for p in prompts})
        guider = make_run_guider(spec, metas)
        if store is not None and (done := _complete(store, spec, guider, report)) is not None:
            return done  # a complete run needs no model at all
        if adapter is not None and backend is not None and backend.name != "local":
            raise ValueError("adapter= is a model loaded in this process; it cannot run on another backend")
        # The worker checks the image size, so a size the model cannot make fails before any work.
        pool = (backend or LocalBackend()).start(GenerationWorker(spec, adapter))
        facts: ModelFacts = pool.info
        defaults = facts.guidance_defaults()
        if any(name not in spec.guidance.params for name in defaults):  # the model's recommended parameters
            guider = make_run_guider(spec, metas, defaults)
        latents = None
        if spec.sampler.initial_latents is not None:
            latents = read_initial_latents(spec.sampler.initial_latents)
        config = resolved_config(facts, spec, guider, latents)
        check_seed_source(spec, config)
        if latents is not None:
            f = facts.vae_scale_factor
            latents.check((facts.latent_channels, config["sampler"]["height"] // f, config["sampler"]["width"] // f),
                          config["sampler"]["height"], config["sampler"]["width"], spec.seeds)
        if store is None:
            store = create_run(out, spec, new=new)
            if store.moved_aside is not None:
                console.print(message(f"moved the previous contents of {store.root} to {store.moved_aside}"))
        store.check_config(config)
        store.add_prompts((text, metas[text]) for text in spec.prompts)
        done_keys = store.keys()
        jobs = plan_pairs(spec.pairs(), config)
        todo = [j for j in jobs if j.key not in done_keys]
        result = GenerateResult(store.root, len(jobs), 0, len(jobs) - len(todo), 0.0, repair=report)
        if todo:
            _run_jobs(store, pool, facts, guider, spec, config, todo, batch_size, max_model_batch, result, console,
                      progress, latents)
        result.workers = list(pool.stats)
        result.model = facts
        return result
    finally:
        if pool is not None:
            pool.close()
        if store is not None:
            store.close()


def _complete(store: RunStore, spec: RunSpec, guider: Guider, report: RepairReport) -> GenerateResult | None:
    """The result for a run that already holds every job of ``spec`` (keys from its stored config), else None."""
    config, stored = store.get_meta("config"), store.spec
    # Only an identical request may reuse the stored resolution of defaults (steps, dtype, size, ...).
    if config is None or stored is None or stored.generation() != spec.generation():
        return None
    jobs = plan_pairs(spec.pairs(), config)
    done = store.keys()
    if not all(j.key in done for j in jobs):
        return None
    return GenerateResult(store.root, len(jobs), 0, len(jobs), 0.0, repair=report)


def _run_jobs(store: RunStore, pool: Pool, facts: ModelFacts, guider: Guider, spec: RunSpec,
              config: dict[str, Any], todo: list[Job], batch_size: int, max_model_batch: int | None,
              result: GenerateResult, console: Console, progress: bool | Callable[[int], None],
              latents: InitialLatents | None = None) -> None:
    provenance = {
        **config,
        "family": facts.family,
        "scheduler_class": facts.scheduler_class,
        "device": facts.device,
        "batch_size": batch_size,
        "max_model_batch": max_model_batch,
        "prompt_source": spec.prompt_source,
        **({"initial_latents_file": latents.path} if latents is not None else {}),
        **({"seed_source": spec.seed_source.model_dump(mode="json")} if spec.seed_source is not None else {}),
        "versions": library_versions(IMAGE_PACKAGES, python=True),
    }
    sampler = config["sampler"]
    warned: set[str] = set(result.truncated_prompts)
    bar = Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                   disable=progress is not True, transient=False)
    advance = progress if callable(progress) else None
    start = time.perf_counter()
    # One writer thread encodes PNGs and inserts rows while the next batch samples (PNG encoding of large
    # images is not free, and zlib releases the GIL). At most one batch waits, so memory stays bounded;
    # leaving the pool waits for it, so an interrupt still keeps every sampled batch.
    pending: Future[None] | None = None

    def wait_for_write() -> None:
        nonlocal pending
        if pending is not None:
            pending.result()
            pending = None

    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffprobe-store") as writer:
        task = bar.add_task("generate", total=len(todo))

        def write(items: list[NewSample]) -> None:
            try:
                store.add(items)
            except (OSError, sqlite3.Error) as err:  # disk full, read-only storage, I/O error
                reason = getattr(err, "strerror", None) or str(err)
                raise StorageError(f"cannot write to {store.root} ({reason}); {len(store)} image(s) are kept there; "
                                   "free space (or make it writable) and run the same command to resume") from err
            result.generated += len(items)
            bar.advance(task, len(items))
            if advance is not None:
                advance(len(items))

        tasks = [BatchTask(guider, batch, sampler, max_model_batch,
                           None if latents is None else latents.stack([j.seed for j in batch]))
                 for batch in batches(todo, guider, batch_size)]
        for done in pool.imap_unordered(tasks, describe=describe_jobs):
            batch, out = tasks[done.index].jobs, done.result
            truncated, records = out.truncated, out.records
            for job, was_truncated in zip(batch, truncated, strict=True):
                if was_truncated and job.prompt not in warned:
                    warned.add(job.prompt)
                    bar.console.print(message(f"prompt longer than the text encoder's limit ({facts.token_limit} "
                                              f"tokens) was truncated (recorded as truncated): {job.prompt[:80]!r}",
                                              "warning:"))
            items = [NewSample(key=j.key, prompt=j.prompt, seed=j.seed, image=img, guidance=config["guidance"],
                               provenance=provenance, records=rec, truncated=bool(tr))
                     for j, img, rec, tr in zip(batch, out.images, records, truncated, strict=True)]
            wait_for_write()
            pending = writer.submit(write, items)
        wait_for_write()
    result.seconds = time.perf_counter() - start
    result.truncated_prompts = sorted(warned)
