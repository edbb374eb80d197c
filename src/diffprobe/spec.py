"""What a run generates: model, prompts, seeds, sampler settings and guidance (pydantic models).

A ``RunSpec`` is what the user asked for. It is stored in the run directory, and reopening a run with a
spec whose generation settings differ is refused (see ``RunSpec.mismatch``). Job keys are computed from
the *resolved* settings (the model's own identity, the dtype actually used), see ``job_key``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from .errors import InputError

if TYPE_CHECKING:
    from .prompts import Prompt

GeneratorDevice = Literal["cpu", "cuda"]
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts signed 64-bit seeds
MAX_SIZE = 16_384  # pixels per side; far beyond any released checkpoint, and a typo's 10**9 fails at once


class LoraSpec(BaseModel):
    """A LoRA adapter applied at generation: a local folder or file, or a hub id, and its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1)
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, scale: float) -> float:
        if not math.isfinite(scale):
            raise ValueError(f"a LoRA scale must be a finite number (got {scale})")
        return scale


def parse_lora(text: str) -> LoraSpec:
    """``DIR_OR_HUB_ID`` or ``DIR_OR_HUB_ID:SCALE`` (the scale is the part after the last colon when it is a
    number)."""
    text = text.strip()
    source, sep, tail = text.rpartition(":")
    if sep and source:
        try:
            return LoraSpec(source=source, scale=float(tail))
        except ValueError:
            pass
    if not text:
        raise InputError("empty --lora; give a LoRA folder, file or hub id, optionally with :SCALE")
    return LoraSpec(source=text)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("shapes", min_length=1)  # hub id, local folder, or a built-in name
    family: str | None = None  # None: detected from the model's config
    dtype: str | None = None  # None: fp16 on GPU, fp32 on CPU
    device: str | None = None  # None: cuda > mps > cpu (not part of the job key)
    lora: tuple[LoraSpec, ...] = ()  # LoRA adapters applied in this order (left out of dumps when there is none)

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_strings(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return tuple(parse_lora(v) if isinstance(v, str) else v for v in value)
        return value

    @model_serializer(mode="wrap")
    def _without_empty_lora(self, handler):
        # A model without LoRA dumps exactly as before the field existed: same stored specs, same default run dirs.
        data = handler(self)
        if isinstance(data, dict) and not data.get("lora"):
            data.pop("lora", None)
        return data


class SamplerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(None, ge=1, le=10_000)  # None: the model's recommended count (else 50)
    scheduler: str | None = None  # None: the checkpoint's own
    height: int | None = Field(None, ge=8, le=MAX_SIZE)  # None: the model's default size
    width: int | None = Field(None, ge=8, le=MAX_SIZE)
    generator_device: GeneratorDevice = "cpu"
    # A safetensors file of starting noise, one tensor per seed (named by the seed): used instead of the seeded
    # generator. Its content hash enters every job key.
    initial_latents: str | None = None


class SeedSource(BaseModel):
    """How per-prompt seeds were chosen (``--seeds reliable:FILE[:K]``), for the record; ``requires`` holds the
    resolved settings (``model``, ``sampler.height``, ...) the seeds were found with, which the run must match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["reliable"] = "reliable"
    file: str
    sha256: str
    k: int = Field(1, ge=1)
    rng_seed: int = 0
    stored_latents: bool = False
    requires: dict[str, Any] = Field(default_factory=dict)


class GuidanceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "cfg"
    params: dict[str, Any] = Field(default_factory=lambda: {"scale": 7.5})

    @field_validator("params")
    @classmethod
    def _finite(cls, params: dict[str, Any]) -> dict[str, Any]:
        # NaN or infinity makes black images and cannot be stored as JSON; no guider parameter means it.
        for key, value in flatten(params).items():
            for number in value if isinstance(value, list) else [value]:
                if isinstance(number, float) and not math.isfinite(number):
                    raise ValueError(f"guidance parameter {key!r} must be a finite number (got {number})")
        return params


class RunSpec(BaseModel):
    """Everything that decides which images a run holds."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(default_factory=ModelSpec)
    prompts: list[str]
    seeds: list[int]
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    guidance: GuidanceSpec = Field(default_factory=GuidanceSpec)
    prompt_source: str | None = None  # where the prompts came from (file or suite name), for the record
    # Seeds per prompt instead of the prompt x seed grid (then ``seeds`` is their union), and how they were chosen.
    prompt_seeds: dict[str, list[int]] | None = None
    seed_source: SeedSource | None = None

    @field_validator("prompts")
    @classmethod
    def _prompts_ok(cls, prompts: list[str]) -> list[str]:
        if not prompts:
            raise ValueError("no prompts")
        return prompts

    @field_validator("seeds")
    @classmethod
    def _seeds_ok(cls, seeds: list[int]) -> list[int]:
        check_seeds(seeds)
        return seeds

    @field_validator("prompt_seeds")
    @classmethod
    def _prompt_seeds_ok(cls, table: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        for seeds in (table or {}).values():
            check_seeds(seeds)
        return table

    def pairs(self) -> list[tuple[str, int]]:
        """Every (prompt, seed) job, prompt-major: the grid, or each prompt's own seeds."""
        if self.prompt_seeds is None:
            return [(p, s) for p in self.prompts for s in self.seeds]
        return [(p, s) for p in self.prompts for s in self.prompt_seeds.get(p, [])]

    def generation(self) -> dict[str, Any]:
        """The settings that must match for two specs to share a run (everything but prompts and seeds)."""
        # initial_latents only when set, so the settings (and default run folders) of other runs stay as they were
        unset = {"initial_latents"} if self.sampler.initial_latents is None else set()
        return {
            "model": self.model.model_dump(exclude={"device"}),
            "sampler": self.sampler.model_dump(exclude=unset),
            "guidance": self.guidance.model_dump(),
        }

    def mismatch(self, stored: RunSpec) -> list[str]:
        """Generation settings given on both sides that differ from ``stored`` (``sampler.steps: 10 (run) != 20
        (now)``). A setting left to its default on either side (None, or a guider parameter not given) is not
        compared here: it is resolved when the model loads and checked then (``RunStore.check_config``)."""
        old, new = flatten(stored.generation()), flatten(self.generation())
        return [f"{k}: {old[k]!r} (run) != {new[k]!r} (now)" for k in sorted(old.keys() & new.keys())
                if old[k] is not None and new[k] is not None and old[k] != new[k]]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, floats as Python prints them."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def job_key(identity: dict[str, Any], prompt: str, seed: int, sampler: dict[str, Any], guidance: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that decides one image. Batch size is deliberately absent."""
    payload = {"model": identity, "prompt": prompt, "seed": int(seed), "sampler": sampler, "guidance": guidance}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# --- seeds -----------------------------------------------------------------------------------------------

# ASCII digits only: str.isdigit and re's \d also accept '²', '①' and '٣', which int() reads differently or not at all.
_RANGE = re.compile(r"^([0-9]+)\s*-\s*([0-9]+)$")
_NAMED = re.compile(r"^([a-z][a-z0-9_]*)(?::([0-9]+))?$")
_INTEGER = re.compile(r"^[0-9]+$")


def check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise InputError("no seeds given; use e.g. --seeds 0-19 or --seeds 1,5,9")
    seen: set[int] = set()
    for s in seeds:
        if not 0 <= s <= MAX_SEED:
            raise InputError(f"seed {s} is out of range; seeds must be integers in 0..{MAX_SEED}")
        if s in seen:
            raise InputError(f"seed {s} is listed twice; each seed must appear once")
        seen.add(s)


def seed_int(digits: str) -> int:
    """ASCII digits as a seed; more digits than any seed has is out of range (and int() has a digit limit)."""
    if len(digits) > len(str(MAX_SEED)):
        shown = digits if len(digits) <= 30 else f"{digits[:20]}... ({len(digits)} digits)"
        raise InputError(f"seed {shown} is out of range; seeds must be integers in 0..{MAX_SEED}")
    return int(digits)


def parse_seeds(text: str) -> list[int]:
    """Parse ``0-19``, ``1,5,9``, ``0-4,10``, ``@seeds.txt`` (one integer a line) or a named list (``scs100``,
    ``scs100:50``: the SCS paper's seed file, first 20 by default as in the paper). Order is kept."""
    text = text.strip()
    if not text:
        raise InputError("empty --seeds; use e.g. --seeds 0-19 or --seeds 1,5,9")
    if text.startswith("@"):
        seeds = _seeds_from_file(Path(text[1:]))
    elif m := _NAMED.match(text):
        seeds = _named_seeds(m.group(1), seed_int(m.group(2)) if m.group(2) else None)
    else:
        seeds = []
        for part in text.split(","):
            part = part.strip()
            if m := _RANGE.match(part):
                lo, hi = seed_int(m.group(1)), seed_int(m.group(2))
                if hi < lo:
                    raise InputError(f"bad seed range {part!r}: the end is below the start (write {hi}-{lo})")
                if hi - lo >= 10_000_000:
                    raise InputError(f"seed range {part!r} has {hi - lo + 1} seeds; that is too many for one run")
                seeds.extend(range(lo, hi + 1))
            elif _INTEGER.match(part):
                seeds.append(seed_int(part))
            else:
                raise InputError(
                    f"bad seed {part!r} in --seeds {text!r}; use a range like 0-19, a list like 1,5,9, "
                    "@FILE, or scs100[:N]"
                )
    check_seeds(seeds)
    return seeds


def _seeds_from_file(path: Path) -> list[int]:
    try:
        words = path.read_text(encoding="utf-8").split()
    except OSError as err:
        raise InputError(f"cannot read seed file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"seed file {path} is not UTF-8 text (byte {err.start}); it must hold one integer per "
                         "line") from None
    if bad := next((w for w in words if not _INTEGER.match(w)), None):
        raise InputError(f"seed file {path} must hold one integer per line (found {bad[:20]!r})")
    return [seed_int(w) for w in words]


def _named_seeds(name: str, n: int | None) -> list[int]:
    from .prompts import builtin_seeds

    return builtin_seeds(name, n)


# --- building a RunSpec: the CLI flags and YAML spec files share one builder ---------------------------------

SPEC_KEYS = {"model", "prompts", "seeds", "sampler", "guidance"}
# The flag that sets each field, for messages about values that came from the command line.
FLAGS = {"model.name": "--model", "model.family": "--family", "model.dtype": "--dtype", "model.device": "--device",
         "model.lora": "--lora",
         "sampler.steps": "--steps", "sampler.scheduler": "--scheduler", "sampler.height": "--height",
         "sampler.width": "--width", "sampler.generator_device": "--generator-device", "guidance.name": "--guidance"}


def build_spec(data: Mapping[str, Any], *, spec_file: Path | None = None) -> tuple[RunSpec, list[Prompt], int]:
    """The RunSpec for ``data``, the prompts with their metadata, and how many repeated prompts were dropped.

    ``data`` holds the keys of a spec file (``model``: a name or mapping; ``prompts``: a list, a file or a suite,
    or a list of loaded ``Prompt`` objects;
    ``seeds``: a list or the ``--seeds`` forms; ``sampler`` and ``guidance``: mappings of those specs' fields).
    ``spec_file`` is the file they came from: prompt files are found relative to it and errors name its fields
    (``spec file run.yaml: sampler.steps: ...``); without it the values came from the flags, and errors name the
    flag (``bad value 0 for --steps: ...``)."""
    from .prompts import Prompt, check_prompt, load_prompts, unique

    def error(text: str) -> InputError:
        return InputError(f"spec file {spec_file}: {text}" if spec_file is not None else text)

    if unknown := sorted(map(str, set(data) - SPEC_KEYS)):
        raise error(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    raw_prompts = data.get("prompts")
    if isinstance(raw_prompts, list) and raw_prompts and all(isinstance(p, Prompt) for p in raw_prompts):
        items, source = list(raw_prompts), None  # prompts already loaded, with their metadata (questions)
    elif isinstance(raw_prompts, list) and raw_prompts:
        if not all(isinstance(p, str) and p.strip() for p in raw_prompts):
            raise error("'prompts' must be a list of non-empty strings, a file or a suite" if spec_file is not None
                        else "--prompt must not be empty")
        items = [Prompt(check_prompt(p, "--prompt" if spec_file is None else f"spec file {spec_file}: prompt"))
                 for p in raw_prompts]
        source = None
    elif isinstance(raw_prompts, str) and raw_prompts:
        local = spec_file.parent / raw_prompts if spec_file is not None else Path(raw_prompts)
        source = str(local) if local.exists() else raw_prompts
        items = load_prompts(source)
    elif spec_file is not None:
        raise error("'prompts' is required (a suite name, a file, or a list of prompts)")
    else:
        raise error("no prompts: give --prompt TEXT (repeatable) or --prompts FILE|SUITE")
    items, dropped = unique(items)
    seeds = data.get("seeds", "0")
    if isinstance(seeds, list):
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise error("'seeds' must be a list of integers or a string like 0-19")
        check_seeds(seeds)
    elif (isinstance(seeds, str) and seeds.startswith(RELIABLE_PREFIX)) or (isinstance(seeds, Mapping)
                                                                             and "reliable" in seeds):
        return _reliable_spec(data, items, dropped, source, spec_file)
    elif isinstance(seeds, str | int) and not isinstance(seeds, bool):
        seeds = parse_seeds(str(seeds))
    else:
        raise error("'seeds' must be a list of integers or a string like 0-19")
    fields = {key: {} if data.get(key) is None else data[key] for key in ("model", "sampler", "guidance")}
    if isinstance(fields["model"], str):
        fields["model"] = {"name": fields["model"]}
    for key, value in fields.items():
        if not isinstance(value, Mapping):
            raise error(f"'{key}' must be a mapping of its settings (got {_short(value)})")
    try:
        spec = RunSpec.model_validate({**fields, "prompts": [p.text for p in items], "seeds": seeds,
                                       "prompt_source": source})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"]))
        msg = first["msg"].removeprefix("Value error, ")
        if spec_file is not None:
            raise error(f"{where.removesuffix('.params')}: {msg}") from None
        flag = FLAGS.get(where)
        raise error(f"bad value {_short(first.get('input'))} for {flag}: {msg}" if flag else msg) from None
    return spec, items, dropped


RELIABLE_PREFIX = "reliable:"


def _reliable_spec(data: Mapping[str, Any], items: list[Prompt], dropped: int, source: str | None,
                   spec_file: Path | None) -> tuple[RunSpec, list[Prompt], int]:
    """The spec for ``seeds: reliable:FILE[:K]`` (or the mapping ``{reliable: FILE, k: K, rng_seed: R,
    stored_latents: bool}``): each prompt's seeds are drawn from the mined top seeds of its own category."""
    from .seeds.reliable import reliable_request, reliable_spec

    request = reliable_request(data["seeds"], base=spec_file.parent if spec_file is not None else None)
    grid, _, _ = build_spec({**data, "seeds": "0"}, spec_file=spec_file)
    return reliable_spec(grid.model_copy(update={"prompt_source": source}), items, request), items, dropped


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_yaml(path: Path, what: str, kind: str) -> tuple[str, Any]:
    """(text, parsed data) of a YAML file; every way it can fail is an :class:`InputError` naming ``what`` (``"spec
    file"``) and, where the parser knows it, the line."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        return text, yaml.safe_load(text)
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{what} {path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    except RecursionError:
        raise InputError(f"{what} {path}: nested too deeply to be {kind}") from None
    except ValueError as err:  # e.g. an integer past Python's digit limit
        raise InputError(f"{what} {path}: {err}") from None


def load_spec_file(path: str | Path) -> tuple[RunSpec, list[Prompt], int]:
    """Read a run spec from YAML; returns the spec, its prompts (``diffprobe.prompts.Prompt``, with metadata) and
    how many repeated prompts were dropped::

        model: stabilityai/stable-diffusion-2-1     # or {name: ..., family: ..., dtype: ...}
        prompts: cc500                              # a suite, a file (relative to this file), or a list
        seeds: 0-19                                 # same forms as --seeds, or a list of integers
        sampler: {steps: 50, scheduler: ddim, height: 768, width: 768}
        guidance: {name: cfg, scale: 7.5}           # every key but name is a guider parameter
    """
    path = Path(path)
    _, data = read_yaml(path, "spec file", "a run spec")
    if not isinstance(data, dict):
        raise InputError(f"spec file {path} must be a mapping with keys: {', '.join(sorted(SPEC_KEYS))}")
    guidance = data.get("guidance")
    if isinstance(guidance, Mapping):  # {name: cfg, scale: 7.5}: every key but name is a guider parameter
        params = {k: v for k, v in guidance.items() if k != "name"}
        data = {**data, "guidance": {"name": guidance.get("name", "cfg"), **({"params": params} if params else {})}}
    return build_spec(data, spec_file=path)
