"""``--seeds reliable:FILE[:K]``: each prompt gets K distinct seeds drawn from the mined top seeds of its own
category (``count 3``, ``relation left_of``: read from the prompt's question), as the paper samples with reliable
seeds (``random.choice`` among the top seeds).

The draw for a prompt uses ``random.Random("<rng_seed>:<prompt>")``, so it depends only on the RNG seed and the
prompt: the same command picks the same seeds, and adding prompts does not change the others' seeds. (The
official script draws sequentially under ``random.seed(77)``; the distribution is the same.) The RNG seed is
recorded in the run's spec (``seed_source``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..sampling.latents import file_sha256
from .file import ReliableSeeds, read_reliable
from .mining import MINED_KINDS

if TYPE_CHECKING:
    from ..prompts import Prompt
    from ..spec import RunSpec

DEFAULT_RNG_SEED = 77  # the official data-set script's random.seed(77)
REQUEST_KEYS = {"reliable", "k", "rng_seed", "stored_latents"}


@dataclass(frozen=True)
class ReliableRequest:
    file: Path
    k: int = 1
    rng_seed: int = DEFAULT_RNG_SEED
    stored_latents: bool = False


def reliable_request(value: str | Mapping[str, Any], base: Path | None = None) -> ReliableRequest:
    """``"reliable:FILE[:K]"``, or ``{reliable: "FILE[:K]", k: K, rng_seed: R, stored_latents: bool}`` (a spec
    file's form; ``FILE`` relative to ``base``)."""
    from ..spec import RELIABLE_PREFIX

    fields: dict[str, Any] = {"reliable": value.removeprefix(RELIABLE_PREFIX)} if isinstance(value, str) else dict(
        value)
    if unknown := sorted(map(str, set(fields) - REQUEST_KEYS)):
        raise InputError(f"unknown key(s) {', '.join(unknown)} in the reliable seeds request; allowed: "
                         f"{', '.join(sorted(REQUEST_KEYS))}")
    text = fields.get("reliable")
    if not isinstance(text, str) or not text.strip():
        raise InputError("--seeds reliable:FILE[:K] needs the reliable seeds file (made by 'diffprobe seeds mine')")
    k = fields.get("k")
    head, sep, tail = text.rpartition(":")
    if sep and tail.isascii() and tail.isdigit() and head:
        text, k = head, int(tail) if k is None else k
    k = 1 if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"K in --seeds reliable:FILE:K must be a positive integer (got {k!r})")
    rng = fields.get("rng_seed", DEFAULT_RNG_SEED)
    if isinstance(rng, bool) or not isinstance(rng, int):
        raise InputError(f"the reliable seeds RNG seed must be an integer (got {rng!r})")
    path = Path(text)
    if base is not None and not path.is_absolute():
        path = base / path
    return ReliableRequest(path, k, rng, bool(fields.get("stored_latents", False)))


def prompt_category(prompt: Prompt) -> str:
    """The mined category of a prompt's question; InputError for a prompt without a count or relation question."""
    from ..commands.judge import category_of
    from ..judges.questions import question_dict, question_for

    question, reason = question_for(prompt)
    if question is None:
        raise InputError(f"prompt {prompt.text!r} has no question ({reason}), so its category for reliable seeds is "
                         "unknown; use a suite whose prompts carry count or relation questions")
    if question.kind not in MINED_KINDS:
        raise InputError(f"prompt {prompt.text!r} asks a {question.kind} question; reliable seeds are mined per "
                         "count and relation category")
    return category_of(question_dict(question))


def choose_seeds(prompts: Sequence[Prompt], reliable: ReliableSeeds, k: int = 1,
                 rng_seed: int = DEFAULT_RNG_SEED) -> dict[str, list[int]]:
    """Per prompt text, ``k`` distinct seeds drawn from the top seeds of its category."""
    out: dict[str, list[int]] = {}
    for prompt in prompts:
        category = prompt_category(prompt)
        top = reliable.top(category)
        if k > len(top):
            raise InputError(f"{reliable.path} holds {len(top)} top seed(s) for '{category}', fewer than the "
                             f"{k} asked for; ask for K <= {len(top)}, or mine with a larger --top")
        out[prompt.text] = random.Random(f"{rng_seed}:{prompt.text}").sample(top, k)
    return out


def reliable_spec(spec: RunSpec, prompts: Sequence[Prompt], request: ReliableRequest) -> RunSpec:
    """``spec`` (a grid spec of the same prompts) with each prompt's own reliable seeds, the record of how they
    were drawn, and the size they were mined at (where the spec sets none). With ``stored_latents`` the run starts
    from the stored initial latents, so another model or generator device can reuse them; without it the run
    must match the mined model, size, dtype and generator device (checked when the model has loaded)."""
    from ..spec import SeedSource

    reliable = read_reliable(request.file)
    by_text = {p.text: p for p in prompts}
    table = choose_seeds([by_text.get(t) or _bare(t) for t in spec.prompts], reliable, request.k, request.rng_seed)
    mined = reliable.data["sampler"]
    sampler: dict[str, Any] = {}
    for side in ("height", "width"):
        given = getattr(spec.sampler, side)
        if given is None:
            sampler[side] = mined[side]
        elif given != mined[side] and request.stored_latents:
            raise InputError(f"--{side} {given} differs from the {side} the stored latents were drawn for "
                             f"({mined[side]}); leave --{side} out")
    if request.stored_latents:
        latents = reliable.latents_path
        if not latents.is_file():
            raise InputError(f"the initial latents file {latents} named by {reliable.path} is missing")
        if file_sha256(latents) != reliable.data["latents"]["sha256"]:
            raise InputError(f"{latents} is not the latents file {reliable.path} was written with (its sha256 "
                             "differs); mine again")
        sampler["initial_latents"] = str(latents.resolve())
    source = SeedSource(file=str(reliable.path.resolve()), sha256=file_sha256(reliable.path), k=request.k,
                        rng_seed=request.rng_seed, stored_latents=request.stored_latents,
                        requires={} if request.stored_latents else reliable.requires())
    seeds = sorted({s for chosen in table.values() for s in chosen})
    return spec.model_copy(update={"seeds": seeds, "prompt_seeds": table, "seed_source": source,
                                   "sampler": spec.sampler.model_copy(update=sampler)})


def _bare(text: str) -> Prompt:
    from ..prompts import Prompt

    return Prompt(text)
