"""The fine-tuning data set: one image per prompt, its seed drawn from the top seeds of the prompt's category
(the paper: every train object x count x background, ``random.choice(top_seeds[count])``), optionally rectified
by a judge (P6: ``relabel`` rewrites a wrong count caption to the count the judge saw, as the paper does;
``filter`` drops wrong images instead). The folder format is documented in ``docs/seeds.md`` ("Data set format")::

    DATA/dataset.json          manifest: model, seeds file, RNG seed, rectify mode, judge, counts, provenance
    DATA/train/metadata.jsonl  one line per image: file_name, text (the caption to train on), and its record
    DATA/train/<n>-<key>.png   the images (hard links into the run where possible)
    DATA/run/                  the run store the images were generated into (resumable, provenance per image)

``DATA/train`` is a Hugging Face ``imagefolder`` (``load_dataset("imagefolder", data_dir=DATA)`` gives split
``train`` with columns ``image``, ``text``, ...); the fine-tuning command reads it with
:func:`diffprobe.finetune.data.read_image_folder`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.console import Console

from ..errors import InputError, check_writable
from ..finetune.data import METADATA, TRAIN_DIR
from .file import write_json_atomic
from .reliable import DEFAULT_RNG_SEED, ReliableRequest, prompt_category, reliable_spec

if TYPE_CHECKING:
    from ..judges.base import Judge
    from ..models.base import ModelAdapter
    from ..prompts import Prompt
    from ..spec import RunSpec

Rectify = Literal["none", "relabel", "filter"]
RECTIFY_MODES = ("none", "relabel", "filter")
DATASET_FORMAT = "diffprobe-seeds-dataset"
MANIFEST = "dataset.json"
RUN_DIR = "run"
ZERO_WORD = "zero"


@dataclass
class DatasetResult:
    root: Path
    manifest: dict[str, Any]
    items: int


def number_word(n: int) -> str:
    from ..prompts import COUNT_WORDS

    return ZERO_WORD if n == 0 else COUNT_WORDS.get(n, str(n))


def relabel_caption(text: str, count: int, found: int) -> str | None:
    """``text`` with its count word (or digits) for ``count`` replaced by the word for ``found``; None where the
    caption does not state ``count`` as a word or number."""
    from ..prompts import COUNT_WORDS

    for word in (COUNT_WORDS.get(count), str(count)):
        if word is None:
            continue
        pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
        match = pattern.search(text)
        if match:
            new = number_word(found)
            if match.group(0)[:1].isupper():
                new = new.capitalize()
            return text[: match.start()] + new + text[match.end():]
    return None


def rectify_row(mode: Rectify, prompt: str, question: dict[str, Any] | None, verdict: dict[str, Any] | None
                ) -> tuple[str | None, str]:
    """(caption to train on or None to drop, what was done) for one image under ``mode``."""
    from ..judges.answers import parse_count

    if mode == "none":
        return prompt, "unchanged"
    if verdict is None:
        return prompt, "kept (not judged)"
    if verdict["correct"] is None:
        return prompt, "kept (the judge's answer did not parse)"
    if verdict["correct"]:
        return prompt, "unchanged (judged correct)"
    if mode == "filter":
        return None, "dropped (judged wrong)"
    if question is None or question.get("kind") != "count":
        return prompt, "kept (judged wrong; only count captions are relabelled)"
    found = parse_count(verdict.get("answer") or "")
    if found is None:
        return prompt, "kept (judged wrong; the judge's answer states no count)"
    new = relabel_caption(prompt, int(question["count"]), found)
    if new is None:
        return prompt, "kept (judged wrong; the caption states no count to rewrite)"
    return new, f"relabelled ({question['count']} -> {found})"


def dataset_spec(model: dict[str, Any], prompts: Sequence[Prompt], seeds_file: Path, *, rng_seed: int,
                 steps: int | None, scale: float | None, sources: Sequence[str]) -> RunSpec:
    """One image per prompt, each seeded from the top seeds of its category; steps and guidance scale default to
    the ones the seeds were mined with."""
    from ..spec import GuidanceSpec, ModelSpec, RunSpec, SamplerSpec
    from .file import read_reliable

    mined = read_reliable(seeds_file).data
    steps = steps if steps is not None else mined["sampler"].get("steps")
    guidance = mined.get("guidance") or {}
    if scale is None and guidance.get("name") == "cfg":
        scale = guidance.get("scale")
    grid = RunSpec(model=ModelSpec(**model), prompts=[p.text for p in prompts], seeds=[0],
                   sampler=SamplerSpec(steps=steps, generator_device=mined["sampler"]["generator_device"]),
                   guidance=GuidanceSpec(params={} if scale is None else {"scale": scale}),
                   prompt_source="; ".join(sources))
    return reliable_spec(grid, prompts, ReliableRequest(seeds_file, 1, rng_seed))


def build_dataset(spec: RunSpec, prompts: Sequence[Prompt], out: Path, *, rectify: Rectify = "none",
                  judge: Judge | None = None, batch_size: int = 4, adapter: ModelAdapter | None = None,
                  console: Console | None = None, progress: bool = True) -> DatasetResult:
    """Generate the images of ``spec`` into ``out/run`` (resumable), judge them when rectifying, and write
    ``out/train`` and ``out/dataset.json`` (the folder is assembled aside and renamed into place)."""
    from ..commands.judge import judge_run
    from ..generate import generate
    from ..judges.questions import question_dict, question_for
    from ..metrics.provenance import provenance
    from ..store import open_run

    console = console or Console(stderr=True)
    if rectify not in RECTIFY_MODES:
        raise InputError(f"unknown --rectify {rectify!r}; use relabel or filter")
    if rectify != "none" and judge is None:
        raise InputError(f"--rectify {rectify} needs --judge J (the judge that checks each image)")
    out = check_writable(out, directory=True)
    for p in prompts:  # every prompt must have a mined category (checked before any image)
        prompt_category(p)
    gen = generate(spec, out / RUN_DIR, prompts=prompts, batch_size=batch_size, adapter=adapter, console=console,
                   progress=progress, extend=True)
    verdicts: dict[str, dict[str, Any]] = {}
    if judge is not None and rectify != "none":
        judged = judge_run(out / RUN_DIR, judge, console=console, progress=progress)
        verdicts = {r["key"]: r for r in judged.rows}
    wanted = set(spec.pairs())
    with open_run(out / RUN_DIR) as store:
        samples = [s for s in store.samples() if (s.prompt, s.seed) in wanted]
    order = {pair: i for i, pair in enumerate(spec.pairs())}
    samples.sort(key=lambda s: order[(s.prompt, s.seed)])
    by_text = {p.text: p for p in prompts}
    staging = out / f".{TRAIN_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    lines, actions = [], {}
    try:
        for i, s in enumerate(samples):
            prompt = by_text.get(s.prompt) or _prompt(s.prompt, s.prompt_meta)
            q, _ = question_for(prompt)
            question = None if q is None else question_dict(q)
            v = verdicts.get(s.key)
            text, action = rectify_row(rectify, s.prompt, question, v)
            kind = action.split(" ")[0]
            actions[kind] = actions.get(kind, 0) + 1
            record = {"prompt": s.prompt, "seed": s.seed, "category": prompt_category(prompt), "key": s.key,
                      "image_sha256": s.image_sha256, "rectify": rectify, "action": action,
                      "correct": None if v is None else v["correct"],
                      "judge_answer": None if v is None else v["answer"]}
            if text is None:
                continue
            name = f"{i:05d}-{s.key[:12]}.png"
            _link_or_copy(s.image_path, staging / name)
            lines.append(json.dumps({"file_name": name, "text": text, **record}, ensure_ascii=False))
        if not lines:
            raise InputError(f"no image is left in the data set ({len(samples)} generated, all dropped by --rectify "
                             f"{rectify}); use --rectify relabel, or other seeds")
        (staging / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")
        target = out / TRAIN_DIR
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    source = spec.seed_source
    manifest = {
        "format": DATASET_FORMAT, "version": 1, "images": len(lines), "generated": len(samples),
        "model": spec.model.model_dump(exclude={"device"}), "run": RUN_DIR, "train": TRAIN_DIR,
        "seeds_file": None if source is None else source.file,
        "seeds_file_sha256": None if source is None else source.sha256,
        "rng_seed": None if source is None else source.rng_seed, "rectify": rectify,
        "judge": None if judge is None or rectify == "none" else judge.identity(), "actions": actions,
        "prompt_source": spec.prompt_source,
        "timing": {"images_generated": gen.generated, "generate_seconds": gen.seconds},
        **provenance(),
    }
    write_json_atomic(manifest, out / MANIFEST)
    return DatasetResult(out, manifest, len(lines))


def _prompt(text: str, meta: dict[str, Any]) -> Prompt:
    from ..prompts import Prompt

    return Prompt(text, meta)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)



__all__ = ["DEFAULT_RNG_SEED", "DatasetResult", "build_dataset", "dataset_spec",
           "rectify_row", "relabel_caption"]
