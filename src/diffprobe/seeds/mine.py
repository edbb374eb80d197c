"""Seed mining end to end: generate the prompt x seed grid (the normal driver: resumable, provenance per image),
judge it (verdicts stored in the run), rank seeds per category (:mod:`.mining`) and write the reliable seeds file
with the top seeds' initial latents (:mod:`.file`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ..errors import InputError, check_writable
from ..spec import RunSpec
from .file import FILE_NAME, FORMAT, LATENTS_NAME, VERSION, write_json_atomic
from .mining import ALPHA, TOP_N, is_mined, mine

if TYPE_CHECKING:
    from ..distributed import Backend, WorkerStats
    from ..judges.base import Judge
    from ..models.base import ModelAdapter
    from ..prompts import Prompt


@dataclass
class MineResult:
    path: Path  # reliable_seeds.json
    data: dict[str, Any]
    workers: list[tuple[str, list[WorkerStats]]] = field(default_factory=list)  # (kind, per-worker stats) per pool


def check_minable(prompts: Sequence[Prompt]) -> None:
    """Some prompt has a count or relation question (else there is nothing to rank); checked before any image."""
    from ..commands.judge import category_of
    from ..judges.questions import question_dict, question_for

    kinds: dict[str, int] = {}
    for p in prompts:
        q, _ = question_for(p)
        name = "no question" if q is None else category_of(question_dict(q))
        if is_mined(name):
            return
        kinds[name] = kinds.get(name, 0) + 1
    found = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
    raise InputError(f"no prompt has a count or relation question (found: {found}); mining ranks seeds per count and "
                     "relation category, so use e.g. --prompts shapes-train-count or a Comp90 objects file")


def mine_seeds(spec: RunSpec, prompts: Sequence[Prompt], out: Path, judge: Judge, *, top_n: int = TOP_N,
               alpha: float = ALPHA, file: Path | None = None, batch_size: int = 4,
               adapter: ModelAdapter | None = None, console: Console | None = None,
               progress: bool = True, backend: Backend | None = None) -> MineResult:
    """Mine ``spec`` (a grid of prompts x seeds) into the run ``out``; writes ``file`` (default
    ``out/reliable_seeds.json``) and the latents file next to it, only once everything else has succeeded.

    ``backend`` (``diffprobe.distributed``) decides where images are generated and judged, as for ``generate`` and
    ``judge``; this process writes the run either way. ``adapter`` is a model loaded in this process (local only)."""
    from ..commands.judge import judge_run
    from ..distributed import LocalBackend, ReusePools
    from ..generate import GenerationWorker, generate
    from ..metrics.provenance import provenance
    from ..sampling.latents import file_sha256, write_initial_latents

    console = console or Console(stderr=True)
    if top_n < 1:
        raise InputError(f"--top must be at least 1 (got {top_n})")
    if spec.prompt_seeds is not None:
        raise InputError("mining needs the same seeds for every prompt (a grid such as --seeds 0-99)")
    check_minable(prompts)
    file = check_writable(file or out / FILE_NAME)
    latents_file = file.with_name(LATENTS_NAME if file.name == FILE_NAME else f"{file.stem}.safetensors")
    check_writable(latents_file)
    base = backend or LocalBackend()
    if adapter is not None and base.name != "local":
        raise ValueError("adapter= is a model loaded in this process; it cannot run on another backend")
    with ReusePools(base) as pools:
        gen = generate(spec, out, prompts=prompts, batch_size=batch_size, adapter=adapter, console=console,
                       progress=progress, extend=True, backend=pools)
        # The facts of the model (for the latents file) come from the pool generate used, or, when the run was
        # complete and generate started none, from one started for them.
        model = gen.model or pools.start(GenerationWorker(spec, adapter)).info
        start = time.perf_counter()
        judged = judge_run(out, judge, console=console, progress=progress, backend=pools)
        judge_seconds = time.perf_counter() - start
    wanted = set(spec.pairs())
    rows = [r for r in judged.rows if (r["prompt"], r["seed"]) in wanted]
    if not rows:
        reasons = "; ".join(f"{n} x {why}" for why, n in judged.skipped.items()) or "no images"
        raise InputError(f"the judge '{judge.name}' gave no verdict for any of the {len(wanted)} image(s) "
                         f"({reasons}); nothing to rank, no seeds file written")
    results, not_mined = mine(rows, spec.seeds, top_n=top_n, alpha=alpha)

    from ..sampling import initial_latents
    from ..store import open_run

    with open_run(out) as store:
        config = store.get_meta("config")
        first = store.samples()[0].provenance
    sampler = config["sampler"]
    top = sorted({s for r in results.values() for s in r.top})
    # drawn here, on the CPU (the workers' device may be a GPU this machine lacks); the noise is the same
    noise = initial_latents(replace(model, device="cpu"), top, sampler["height"], sampler["width"],
                            sampler["generator_device"])
    # one metadata entry: safetensors writes its metadata map in no fixed order, and the file's hash keys jobs
    write_initial_latents(latents_file, {s: noise[i] for i, s in enumerate(top)}, {"format": FORMAT})
    data = {
        "format": FORMAT, "version": VERSION,
        "model": config["model"], "family": first.get("family"), "sampler": sampler,
        "scheduler_class": first.get("scheduler_class"), "latent_shape": list(noise.shape[1:]),
        "guidance": config["guidance"], "judge": judge.identity(), "run": str(Path(out).resolve()),
        "prompt_source": spec.prompt_source, "seeds": list(spec.seeds), "top_n": top_n,
        "categories": {name: r.as_dict() for name, r in results.items()},
        "not_mined": not_mined, "skipped": dict(judged.skipped),
        "latents": {"file": latents_file.name, "sha256": file_sha256(latents_file), "seeds": top},
        "timing": {"images_generated": gen.generated, "generate_seconds": gen.seconds,
                   "images_judged": judged.judged, "judge_seconds": judge_seconds},
        **provenance(),
    }
    write_json_atomic(data, file)
    return MineResult(file, data, pools.worker_stats())
