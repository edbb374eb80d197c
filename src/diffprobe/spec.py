"""What a run generates: model, prompts, seeds, sampler settings and guidance (pydantic models).

A ``RunSpec`` is what the user asked for. It is stored in the run directory, and reopening a run with a
spec whose generation settings differ is refused (see ``RunSpec.mismatch``). Job keys are computed from
the *resolved* settings (the model's own identity, the dtype actually used), see ``job_key``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InputError

GeneratorDevice = Literal["cpu", "cuda"]
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts signed 64-bit seeds


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "shapes"  # hub id, local folder, or a built-in name
    family: str | None = None  # None: detected from the model's config
    dtype: str | None = None  # None: fp16 on GPU, fp32 on CPU
    device: str | None = None  # None: cuda > mps > cpu (not part of the job key)


class SamplerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(None, ge=1, le=10_000)  # None: the model's recommended count (else 50)
    scheduler: str | None = None  # None: the checkpoint's own
    height: int | None = Field(None, ge=8)  # None: the model's default size
    width: int | None = Field(None, ge=8)
    generator_device: GeneratorDevice = "cpu"


class GuidanceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "cfg"
    params: dict[str, Any] = Field(default_factory=lambda: {"scale": 7.5})


class RunSpec(BaseModel):
    """Everything that decides which images a run holds."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(default_factory=ModelSpec)
    prompts: list[str]
    seeds: list[int]
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    guidance: GuidanceSpec = Field(default_factory=GuidanceSpec)
    prompt_source: str | None = None  # where the prompts came from (file or suite name), for the record

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

    def generation(self) -> dict[str, Any]:
        """The settings that must match for two specs to share a run (everything but prompts and seeds)."""
        return {
            "model": self.model.model_dump(exclude={"device"}),
            "sampler": self.sampler.model_dump(),
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

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_NAMED = re.compile(r"^([a-z][a-z0-9_]*)(?::(\d+))?$")


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


def parse_seeds(text: str) -> list[int]:
    """Parse ``0-19``, ``1,5,9``, ``0-4,10``, ``@seeds.txt`` (one integer a line) or a named list (``scs100``,
    ``scs100:50``: the SCS paper's seed file, first 20 by default as in the paper). Order is kept."""
    text = text.strip()
    if not text:
        raise InputError("empty --seeds; use e.g. --seeds 0-19 or --seeds 1,5,9")
    if text.startswith("@"):
        seeds = _seeds_from_file(Path(text[1:]))
    elif (m := _NAMED.match(text)) and not text[0].isdigit():
        seeds = _named_seeds(m.group(1), int(m.group(2)) if m.group(2) else None)
    else:
        seeds = []
        for part in text.split(","):
            part = part.strip()
            if m := _RANGE.match(part):
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise InputError(f"bad seed range {part!r}: the end is below the start (write {hi}-{lo})")
                if hi - lo >= 10_000_000:
                    raise InputError(f"seed range {part!r} has {hi - lo + 1} seeds; that is too many for one run")
                seeds.extend(range(lo, hi + 1))
            elif part.isdigit():
                seeds.append(int(part))
            else:
                raise InputError(
                    f"bad seed {part!r} in --seeds {text!r}; use a range like 0-19, a list like 1,5,9, "
                    "@FILE, or scs100[:N]"
                )
    check_seeds(seeds)
    return seeds


def _seeds_from_file(path: Path) -> list[int]:
    try:
        lines = path.read_text().split()
    except OSError as err:
        raise InputError(f"cannot read seed file {path}: {err.strerror}") from None
    try:
        return [int(x) for x in lines]
    except ValueError:
        raise InputError(f"seed file {path} must hold one integer per line") from None


def _named_seeds(name: str, n: int | None) -> list[int]:
    from .prompts import builtin_seeds

    return builtin_seeds(name, n)


# --- YAML spec files ---------------------------------------------------------------------------------------

SPEC_KEYS = {"model", "prompts", "seeds", "sampler", "guidance"}


def load_spec_file(path: str | Path) -> tuple[RunSpec, list[Any], int]:
    """Read a run spec from YAML; returns the spec, its prompts (``diffprobe.prompts.Prompt``, with metadata) and
    how many repeated prompts were dropped::

        model: stabilityai/stable-diffusion-2-1     # or {name: ..., family: ..., dtype: ...}
        prompts: cc500                              # a suite, a file (relative to this file), or a list
        seeds: 0-19                                 # same forms as --seeds, or a list of integers
        sampler: {steps: 50, scheduler: ddim, height: 768, width: 768}
        guidance: {name: cfg, scale: 7.5}           # every key but name is a guider parameter
    """
    import yaml
    from pydantic import ValidationError

    from .prompts import Prompt, load_prompts, unique

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"cannot read spec file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"spec file {path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise InputError(f"spec file {path} must be a mapping with keys: {', '.join(sorted(SPEC_KEYS))}")
    if unknown := sorted(set(data) - SPEC_KEYS):
        raise InputError(f"spec file {path}: unknown key(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(SPEC_KEYS))}")
    raw_prompts = data.get("prompts")
    if isinstance(raw_prompts, list):
        if not all(isinstance(p, str) and p.strip() for p in raw_prompts):
            raise InputError(f"spec file {path}: 'prompts' must be a list of non-empty strings, a file or a suite")
        items, source = [Prompt(p.strip()) for p in raw_prompts], None
    elif isinstance(raw_prompts, str):
        local = path.parent / raw_prompts
        source = str(local) if local.exists() else raw_prompts
        items = load_prompts(source)
    else:
        raise InputError(f"spec file {path}: 'prompts' is required (a suite name, a file, or a list of prompts)")
    items, dropped = unique(items)
    seeds = data.get("seeds", "0")
    if isinstance(seeds, list):
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise InputError(f"spec file {path}: 'seeds' must be a list of integers or a string like 0-19")
        check_seeds(seeds)
    else:
        seeds = parse_seeds(str(seeds))
    model = data.get("model", {})
    guidance = dict(data.get("guidance") or {})
    try:
        spec = RunSpec(
            model=ModelSpec(name=model) if isinstance(model, str) else ModelSpec(**model),
            prompts=[p.text for p in items],
            seeds=seeds,
            sampler=SamplerSpec(**(data.get("sampler") or {})),
            guidance=GuidanceSpec(name=guidance.pop("name", "cfg"), params=guidance or {"scale": 7.5}),
            prompt_source=source,
        )
    except (ValidationError, TypeError) as err:
        detail = err.errors()[0] if isinstance(err, ValidationError) else None
        msg = (f"{'.'.join(map(str, detail['loc']))}: {detail['msg']}" if detail else str(err))
        raise InputError(f"spec file {path}: {msg}") from None
    return spec, items, dropped
