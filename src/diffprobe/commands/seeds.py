"""``diffprobe seeds``: mine reliable seeds with a judge, show them, build a fine-tuning data set with them, and
fine-tune Q/K on it (:mod:`diffprobe.commands.finetune`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..console import message, resumable
from ..errors import InputError
from ..prompts import Prompt
from . import backend_options as bo
from . import finetune
from .judge import JUDGE_HELP, make_judges, with_judge_flags

seeds_app = typer.Typer(help="Reliable seeds: mine them with a judge, show them, build a data set with them, "
                        "fine-tune Q/K on it.", no_args_is_help=True)


def _load_prompts(sources: list[str], console: Console) -> list[Prompt]:
    """The prompts (with their metadata) of every suite or file, each text once."""
    from ..prompts import load_prompts, unique

    items, dropped = unique([p for source in sources for p in load_prompts(source)])
    if dropped:
        console.print(message(f"note: {dropped} repeated prompt(s) are used once"))
    return items


@seeds_app.command("mine")
@with_judge_flags
def mine_cmd(
    model: str = typer.Option("shapes", "--model", "-m", help="Hub id, local diffusers folder, or 'shapes'."),
    prompts: list[str] = typer.Option(..., "--prompts", help="Prompt suite or file with count or relation questions "
                                      "(repeatable): shapes-train-count, shapes-train-relation, "
                                      "comp90-numerical-mining:PATH, a Comp90 objects_<split>.txt, ..."),
    seeds: str = typer.Option("0-99", "--seeds", "-s", help="Candidate seeds: 0-99, 1,5,9, @FILE."),
    judge: str = typer.Option("shapes", "--judge", "-j", help=JUDGE_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory for the mining grid (resumable)."),
    top: int = typer.Option(3, "--top", help="Top seeds kept per category (the paper: 3)."),
    file: Path | None = typer.Option(None, "--file", help="Reliable seeds file (default: RUN/reliable_seeds.json)."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps (default: the model's, else 50)."),
    scale: float | None = typer.Option(None, "--scale", help="CFG scale (default: the model's, else 7.5)."),
    height: int | None = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: int | None = typer.Option(None, "--width", help="Image width (default: the model's)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="default (the checkpoint's), ddim, dpmpp-2m, "
                                         "euler."),
    family: str | None = typer.Option(None, "--family", help="Override detection: sd, sdxl, pixart."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 CPU)."),
    device: str | None = typer.Option(None, "--device", help="cuda, mps, cpu (default: the best available)."),
    generator_device: str = typer.Option("cpu", "--generator-device", help="Where seeded noise is drawn: cpu or "
                                         "cuda (the paper seeded on CUDA)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Images per model call."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    judge_flags: dict = None,  # type: ignore[assignment]  # filled by with_judge_flags
    backend: str = bo.BACKEND,
    address: str | None = bo.ADDRESS,
    workers: int | None = bo.WORKERS,
    gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
) -> None:
    """Generate the prompt x seed grid, judge it, and rank seeds per category (count N, relation R)."""
    from ..seeds.mine import mine_seeds
    from ..seeds.show import category_lines, rich_table
    from .generate import spec_from_flags

    console = Console(stderr=True)
    if seeds.strip().startswith("reliable:"):
        raise InputError("mining needs candidate seeds such as --seeds 0-99, not reliable:FILE")
    items = _load_prompts(prompts, console)
    spec, _, _ = spec_from_flags(
        model=model, family=family, dtype=dtype, device=device, prompt=[p.text for p in items], prompts_file=None,
        seeds=seeds, steps=steps, scheduler=scheduler, height=height, width=width,
        generator_device=generator_device, guidance="cfg", scale=scale, guidance_param=[], concepts=None)
    spec = spec.model_copy(update={"prompt_source": "; ".join(prompts)})
    runner = bo.backend_from_flags(backend, address, workers, gpus_per_worker)
    [the_judge] = make_judges([judge], judge_flags)
    with resumable(console, f"finished images and verdicts are kept in {out}"):
        result = mine_seeds(spec, items, out, the_judge, top_n=top, file=file, batch_size=batch_size,
                            console=console, progress=not quiet, backend=runner)
    from ..seeds.file import read_reliable

    reliable = read_reliable(result.path)
    Console().print(rich_table(reliable, limit=20))
    for line in category_lines(reliable):
        typer.echo(line)
    t = result.data["timing"]
    console.print(message(f"generation {t['generate_seconds']:.1f} s for {t['images_generated']} image(s), judging "
                          f"{t['judge_seconds']:.1f} s for {t['images_judged']} image(s); reliable seeds in "
                          f"{result.path}"))
    bo.print_pool_summaries(console, result.workers)
    typer.echo(str(result.path))


@seeds_app.command("show")
def show_cmd(
    file: Path = typer.Argument(..., help="reliable_seeds.json (or the run folder holding it)."),
    png: Path | None = typer.Option(None, "--png", help="Heatmap PNG (default: next to FILE, .png)."),
    limit: int | None = typer.Option(None, "--limit", help="Show at most this many seeds (top seeds first)."),
) -> None:
    """The seed x category accuracy table, the tests per category, and a heatmap PNG."""
    from ..seeds.file import read_reliable
    from ..seeds.show import category_lines, heatmap, rich_table

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1 (got {limit})")
    reliable = read_reliable(file)
    Console().print(rich_table(reliable, limit=limit))
    for line in category_lines(reliable):
        typer.echo(line)
    path = heatmap(reliable, png or reliable.path.with_suffix(".png"))
    Console(stderr=True).print(message(f"heatmap in {path}"))


@seeds_app.command("dataset")
@with_judge_flags
def dataset_cmd(
    model: str = typer.Option("shapes", "--model", "-m", help="The model the seeds were mined with."),
    seeds_file: Path = typer.Option(..., "--seeds-file", help="reliable_seeds.json from 'diffprobe seeds mine'."),
    prompts: list[str] = typer.Option(..., "--prompts", help="Train prompts (repeatable): shapes-train-count, "
                                      "shapes-train-relation, comp90-numerical-train:PATH, a Comp90 "
                                      "objects_train.txt, ..."),
    out: Path = typer.Option(..., "--out", "-o", help="Data set folder (see docs/seeds.md, 'Data set format')."),
    rectify: str = typer.Option("none", "--rectify", help="none, relabel (rewrite wrong count captions to the "
                                "count the judge saw: the paper) or filter (drop wrong images)."),
    judge: str | None = typer.Option(None, "--judge", "-j", help="Judge for --rectify. " + JUDGE_HELP),
    reliable_rng: int = typer.Option(77, "--reliable-rng", help="RNG seed of the draw among the top seeds "
                                     "(the official script's 77)."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps (default: as mined)."),
    scale: float | None = typer.Option(None, "--scale", help="CFG scale (default: as mined)."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 CPU)."),
    device: str | None = typer.Option(None, "--device", help="cuda, mps, cpu (default: the best available)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Images per model call."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    judge_flags: dict = None,  # type: ignore[assignment]  # filled by with_judge_flags
) -> None:
    """One image per prompt, seeded from the top seeds of its category: the Q/K fine-tuning set."""
    from ..seeds.dataset import RECTIFY_MODES, build_dataset, dataset_spec

    console = Console(stderr=True)
    if rectify not in RECTIFY_MODES:
        raise InputError(f"unknown --rectify {rectify!r}; use none, relabel or filter")
    if rectify != "none" and judge is None:
        raise InputError(f"--rectify {rectify} needs --judge J")
    the_judge = make_judges([judge], judge_flags)[0] if judge is not None else None
    items = _load_prompts(prompts, console)
    spec = dataset_spec({"name": model, "dtype": dtype, "device": device}, items, seeds_file,
                        rng_seed=reliable_rng, steps=steps, scale=scale, sources=prompts)
    with resumable(console, f"finished images and verdicts are kept in {out}"):
        result = build_dataset(spec, items, out, rectify=rectify, judge=the_judge,  # type: ignore[arg-type]
                               batch_size=batch_size, console=console, progress=not quiet)
    actions = ", ".join(f"{n} {a}" for a, n in result.manifest["actions"].items())
    console.print(message(f"{result.items} image(s) in {result.root / 'train'} ({actions})"))
    typer.echo(str(result.root))


finetune.register(seeds_app)


def register(app: typer.Typer) -> None:
    app.add_typer(seeds_app, name="seeds")
