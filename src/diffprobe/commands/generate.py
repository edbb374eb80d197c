"""``diffprobe generate``: sample a prompt x seed grid into a run directory (resumable)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ..console import message, resumable
from ..errors import InputError, check_writable
from ..prompts import Prompt
from ..spec import RELIABLE_PREFIX, RunSpec, build_spec, canonical_json, load_spec_file, parse_lora
from . import backend_options as bo


def parse_params(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse as JSON (numbers, lists, true), else strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"bad --guidance-param {item!r}; write key=value, e.g. --guidance-param rescale=0.7")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
        except (ValueError, RecursionError):  # an integer past Python's digit limit, or absurd nesting
            raise InputError(f"bad --guidance-param {key.strip()!r}: the value is too long or nested too deeply "
                             "to be a parameter") from None
    return params


def spec_from_flags(*, model: str, family: str | None, dtype: str | None, device: str | None, prompt: list[str],
                    prompts_file: str | None, seeds: str, steps: int | None, scheduler: str | None,
                    height: int | None, width: int | None, generator_device: str, guidance: str,
                    scale: float | None, guidance_param: list[str],
                    concepts: str | None, use_stored_latents: bool = False, reliable_rng: int | None = None,
                    lora: list[str] | None = None) -> tuple[RunSpec, list[Prompt], int]:
    """The RunSpec for the CLI flags, the prompts with their metadata, and how many repeated prompts were dropped
    (the flags become a spec file's mapping, and the spec file's builder makes the spec)."""
    if prompt and prompts_file:
        raise InputError("give either --prompt (repeatable) or --prompts FILE, not both")
    seed_value: str | dict[str, Any] = seeds
    if seeds.strip().startswith(RELIABLE_PREFIX):
        seed_value = {"reliable": seeds.strip().removeprefix(RELIABLE_PREFIX), "stored_latents": use_stored_latents,
                      **({"rng_seed": reliable_rng} if reliable_rng is not None else {})}
    elif use_stored_latents or reliable_rng is not None:
        raise InputError(f"{'--use-stored-latents' if use_stored_latents else '--reliable-rng'} needs "
                         "--seeds reliable:FILE[:K] (a file made by 'diffprobe seeds mine')")
    params = parse_params(guidance_param)
    if scale is not None:
        params.setdefault("scale", scale)
    if concepts is not None:
        params.update(_concept_params(concepts))
    return build_spec({
        "model": {"name": model, "family": family, "dtype": dtype, "device": device,
                  **({"lora": [parse_lora(x) for x in lora]} if lora else {})},
        "prompts": prompt or prompts_file,
        "seeds": seed_value,
        "sampler": {"steps": steps, "scheduler": scheduler, "height": height, "width": width,
                    "generator_device": generator_device},
        "guidance": {"name": guidance, "params": params},
    })


def _concept_params(value: str) -> dict[str, Any]:
    """``--concepts``: ``suite`` (each prompt's reference noun phrases from its suite, e.g. cc500), an extractor
    name (``spacy``, ``stanza``), or literal concepts for every prompt (``"a red book; a gold clock"``)."""
    from ..generate import SUITE_CONCEPTS

    if value == SUITE_CONCEPTS or value in ("spacy", "stanza"):
        return {"extractor": value}
    return {"concepts": value}


def default_out(spec: RunSpec) -> Path:
    """``runs/<model>-<hash>``: the same command always lands in the same run, so it resumes."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec.model.name).name or spec.model.name).strip("-") or "model"
    what = {**spec.generation(), "prompts": spec.prompts, "seeds": spec.seeds}
    if spec.prompt_seeds is not None:
        what["prompt_seeds"] = spec.prompt_seeds
    digest = hashlib.sha256(canonical_json(what).encode())
    return Path("runs") / f"{slug}-{digest.hexdigest()[:8]}"


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        model: str = typer.Option("shapes", "--model", "-m", help="Hub id, local diffusers folder, or 'shapes'."),
        prompt: list[str] = typer.Option([], "--prompt", "-p", help="A prompt (repeatable)."),
        prompts: str | None = typer.Option(
            None, "--prompts", help="Prompt file (.txt one per line, .csv/.tsv/.jsonl/.json with a 'prompt' column, "
            "Comp90 objects_<split>.txt) or a built-in suite: scs100, scs100-monet-sdxl, scs100-monet-lora, cc500, "
            "shapes-<split>[-<category>], comp90-<numerical|spatial>-<split>:PATH (a Comp90 prompt_dataset/ "
            "folder; splits mining, train, eval)."),
        seeds: str = typer.Option("0", "--seeds", "-s", help="Seeds: 0-19, 1,5,9, @FILE, scs100[:N], or "
                                  "reliable:FILE[:K] (K seeds per prompt from the mined top seeds of its category)."),
        use_stored_latents: bool = typer.Option(False, "--use-stored-latents", help="With reliable:FILE: start from "
                                                "the initial latents stored with the seeds (works for another model "
                                                "or generator device)."),
        reliable_rng: int | None = typer.Option(None, "--reliable-rng", help="With reliable:FILE: the RNG seed of "
                                                "the draw among the top seeds (default 77; recorded)."),
        steps: int | None = typer.Option(None, "--steps", help="Denoising steps (default: the model's, else 50)."),
        scheduler: str | None = typer.Option(None, "--scheduler", help="default (the checkpoint's), ddim, "
                                             "dpmpp-2m or euler."),
        guidance: str = typer.Option("cfg", "--guidance", "-g", help="Guider: cfg, scfg, concept."),
        scale: float | None = typer.Option(None, "--scale", help="Guidance scale (default: the model's "
                                            "recommended one, else 7.5)."),
        guidance_param: list[str] = typer.Option([], "--guidance-param", help="Extra guider parameter key=value "
                                                 "(repeatable; values parse as JSON when they can)."),
        concepts: str | None = typer.Option(None, "--concepts", help="Concept guidance: 'suite' (the prompt suite's "
                                            "reference noun phrases, e.g. cc500), 'spacy' or 'stanza' (extractors), "
                                            "or concepts for every prompt: 'a red book; a gold clock'."),
        height: int | None = typer.Option(None, "--height", help="Image height (default: the model's)."),
        width: int | None = typer.Option(None, "--width", help="Image width (default: the model's)."),
        batch_size: int = typer.Option(4, "--batch-size", "-b", help="Images per model call (each image's noise "
                                       "depends only on its seed)."),
        max_model_batch: int | None = typer.Option(None, "--max-model-batch", help="Most rows (images x guidance "
                                                   "branches) per denoiser call (default: all; halved on GPU OOM)."),
        lora: list[str] = typer.Option([], "--lora", help="LoRA adapter DIR, FILE or HUB_ID, optionally :SCALE "
                                       "(repeatable; sd, sdxl). Its identity and scale key the images."),
        family: str | None = typer.Option(None, "--family", help="Override detection: sd, sdxl, pixart."),
        dtype: str | None = typer.Option(None, "--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 CPU)."),
        device: str | None = typer.Option(None, "--device", help="cuda, mps, cpu (default: the best available)."),
        generator_device: str = typer.Option("cpu", "--generator-device", help="Where seeded noise is drawn: cpu "
                                             "(same on every machine) or cuda (papers that seeded on CUDA)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<model>-<hash>)."),
        new: bool = typer.Option(False, "--new", help="Move an existing run at --out aside and start afresh."),
        extend: bool = typer.Option(False, "--extend", help="Add new prompts/seeds to an existing run."),
        repair: bool = typer.Option(False, "--repair", help="Drop the rows of an existing run whose image file is "
                                    "missing, so they are generated again (without it they are reported and kept)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        spec_file: Path | None = typer.Option(None, "--spec", help="Read model, prompts, seeds, sampler and "
                                              "guidance from a YAML file instead of the flags."),
        backend: str = bo.BACKEND,
        address: str | None = bo.ADDRESS,
        workers: int | None = bo.WORKERS,
        gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
    ) -> None:
        """Generate images for every prompt x seed; re-running generates only what is missing."""
        from ..generate import generate

        console = Console(stderr=True)
        if spec_file is not None:
            flags = {"--model": model != "shapes", "--prompt": bool(prompt), "--prompts": prompts is not None,
                     "--seeds": seeds != "0", "--steps": steps is not None, "--scheduler": scheduler is not None,
                     "--guidance": guidance != "cfg", "--scale": scale is not None,
                     "--guidance-param": bool(guidance_param),
                     "--concepts": concepts is not None, "--height": height is not None, "--width": width is not None,
                     "--family": family is not None, "--dtype": dtype is not None, "--lora": bool(lora),
                     "--generator-device": generator_device != "cpu", "--use-stored-latents": use_stored_latents,
                     "--reliable-rng": reliable_rng is not None}
            if clash := [flag for flag, given in flags.items() if given]:
                raise InputError(f"--spec cannot be combined with {', '.join(clash)}; set them in the spec file")
            spec, items, dropped = load_spec_file(spec_file)
            if device is not None:  # the device is a property of this machine, not of the run
                spec = spec.model_copy(update={"model": spec.model.model_copy(update={"device": device})})
        else:
            spec, items, dropped = spec_from_flags(
                model=model, family=family, dtype=dtype, device=device, prompt=prompt, prompts_file=prompts,
                seeds=seeds, steps=steps, scheduler=scheduler, height=height, width=width,
                generator_device=generator_device, guidance=guidance, scale=scale, guidance_param=guidance_param,
                concepts=concepts, use_stored_latents=use_stored_latents, reliable_rng=reliable_rng, lora=lora)
        if dropped:
            console.print(f"note: {dropped} repeated prompt(s) appear once in the run", highlight=False)
        if new and extend:
            raise InputError("--new and --extend exclude each other")
        run_dir = check_writable(out or default_out(spec), directory=True)
        runner = bo.backend_from_flags(backend, address, workers, gpus_per_worker)
        with resumable(console, f"finished images are kept in {run_dir}"):
            result = generate(spec, run_dir, prompts=items, batch_size=batch_size, max_model_batch=max_model_batch,
                              new=new, extend=extend, repair=repair,
                              console=console, progress=not quiet, backend=runner)
        rate = f" at {result.images_per_second:.2f} images/s" if result.generated else ""
        console.print(message(f"{result.generated} generated{rate}, {result.skipped} already there; "
                              f"{result.total} images in {result.run_dir}"))
        bo.print_worker_summary(console, result.workers)
        if result.truncated_prompts:
            console.print(f"{len(result.truncated_prompts)} prompt(s) were truncated to the text encoder's limit "
                          "(column 'truncated')", highlight=False)
        typer.echo(str(result.run_dir))
