"""``diffprobe audit``: arms (model, with optional LoRA adapters, x guidance, list-valued guidance parameters
expanded to one arm per value, x seed sets: grids or mined ``reliable:FILE[:K]`` seeds) on one prompt suite;
every arm is generated, scored and judged through the run store, then compared with the baseline arm (paired
tests over prompts, or over images on the same prompt and image index; Holm correction across arms), summarised
in ``AUDIT_DIR/summary.json`` and reported in ``AUDIT_DIR/report/index.html``.

Each arm is a run directory under ``AUDIT_DIR/arms/``, named by its generation settings, so a re-run (after an
interruption, or with more prompts or seeds) makes only the missing images and judges only the new ones. Arms of
one model (and the same adapters) share one loaded model. A measure whose prerequisite is missing (no CLIP
offline, no reference folder, prompts without questions) is skipped with a note, not an error.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rich.console import Console

from .console import StageProgress, message
from .distributed import Backend, WorkerStats
from .errors import DiffprobeError, InputError
from .prompts import Prompt
from .spec import (
    RELIABLE_PREFIX,
    LoraSpec,
    RunSpec,
    build_spec,
    canonical_json,
    check_seeds,
    parse_lora,
    parse_seeds,
    read_yaml,
)

ARMS_DIR = "arms"
SUMMARY_FILE = "summary.json"
AUDIT_KIND = "diffprobe-audit"


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)  # hub id, local folder or a built-in model ("shapes")
    label: str | None = None
    family: str | None = None
    dtype: str | None = None
    device: str | None = None
    # LoRA adapters on top, in order: "DIR_OR_HUB_ID[:SCALE]" or {source, scale} (a folder relative to the config)
    lora: list[LoraSpec] = Field(default_factory=list)

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_strings(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            try:
                out.append(parse_lora(item) if isinstance(item, str) else item)
            except InputError as err:
                raise ValueError(str(err).replace("--lora", "lora")) from None
        return out

    def display(self) -> str:
        """The label, or the name with each LoRA's file or folder name (and scale when not 1)."""
        if self.label:
            return self.label
        loras = "".join(f" +{Path(x.source).name or x.source}" + ("" if x.scale == 1 else f":{x.scale:g}")
                        for x in self.lora)
        return self.name + loras

    def spec_fields(self, base: Path) -> dict[str, Any]:
        """The ``model`` mapping of the arm's RunSpec; a LoRA folder or file that exists relative to the config
        file (``base``) is named by its absolute path."""
        fields = self.model_dump(exclude={"label", "lora"})
        if self.lora:
            fields["lora"] = [x.model_copy(update={"source": str((base / x.source).resolve())})
                              if not Path(x.source).is_absolute() and (base / x.source).exists() else x
                              for x in self.lora]
        return fields


def _seed_problem(value: Any) -> str | None:
    """Why ``value`` is not a seed list or ``--seeds`` form (None when it is one); ``reliable:`` forms are read
    when the arms are planned."""
    if isinstance(value, str) and value.strip().startswith(RELIABLE_PREFIX):
        return None
    try:
        if isinstance(value, list):
            check_seeds(value)
        else:
            parse_seeds(str(value))
    except InputError as err:
        return str(err).replace("--seeds ", "seeds ")
    return None


class SeedSet(BaseModel):
    """One set of seeds for the arms (arms are models x guidance x seed sets): ``{label: mined, seeds:
    "reliable:seeds.json:3", use_stored_latents: true}`` or ``{label: grid, seeds: 0-3}``."""

    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(None, min_length=1)
    seeds: str | int | list[int]  # the --seeds forms: 0-19, 1,5,9, @FILE, scs100:N, reliable:FILE[:K]
    use_stored_latents: bool = False  # reliable: start from the initial latents stored with the seeds
    reliable_rng: int | None = None  # reliable: the RNG seed of the draw among the top seeds (default 77)

    @field_validator("seeds")
    @classmethod
    def _seeds_form(cls, value: Any) -> Any:
        if (problem := _seed_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _reliable_options(self) -> SeedSet:
        if not self.reliable and (self.use_stored_latents or self.reliable_rng is not None):
            name = "use_stored_latents" if self.use_stored_latents else "reliable_rng"
            raise ValueError(f"{name} needs seeds: reliable:FILE[:K] (a file made by 'diffprobe seeds mine'); "
                             f"these seeds are {self.seeds!r}")
        return self

    @property
    def reliable(self) -> bool:
        return isinstance(self.seeds, str) and self.seeds.strip().startswith(RELIABLE_PREFIX)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return ",".join(map(str, self.seeds)) if isinstance(self.seeds, list) else str(self.seeds)

    def spec_value(self) -> Any:
        """The ``seeds`` value of the arm's RunSpec, in the form ``generate --seeds`` gives ``build_spec``."""
        if not self.reliable:
            return self.seeds
        return {"reliable": str(self.seeds).strip().removeprefix(RELIABLE_PREFIX),
                "stored_latents": self.use_stored_latents,
                **({"rng_seed": self.reliable_rng} if self.reliable_rng is not None else {})}


class GuidanceEntry(BaseModel):
    """``{name: scfg, scale: [3.5, 5]}``: every key but ``name``, ``label`` and ``seeds`` is a guider parameter;
    a list value is a sweep (one arm per value)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    label: str | None = None
    seeds: list[str] | None = None  # labels of the seed sets this entry's arms use (default: every seed set)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ScsMeasure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embedder: str = "auto"
    weights: Path | None = None


class CompositionMeasure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    judge: str = "shapes"


class ClipMeasure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "clip-vit-b32"


class IrsMeasure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: Path
    test: Path | None = None
    embedder: str = "auto"
    weights: Path | None = None


class FdMeasure(BaseModel):
    """Fréchet distance and KID against a reference folder (or saved statistics); FID proper with ``inception``."""

    model_config = ConfigDict(extra="forbid")
    ref: Path
    embedder: str = "auto"
    weights: Path | None = None
    inception: Path | None = None  # inception-2015-12-05.pt (TorchScript): FID comparable with published numbers


class Measures(BaseModel):
    """Which measures to take; a measure left out (or ``false``) is not taken."""

    model_config = ConfigDict(extra="forbid")

    scs: ScsMeasure | None = Field(default_factory=ScsMeasure)
    composition: CompositionMeasure | Literal["auto"] | None = "auto"  # auto: the exact judge on shapes models
    clip: ClipMeasure | None = None
    irs: IrsMeasure | None = None
    fd: FdMeasure | None = None

    @field_validator("scs", "composition", "clip", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    models: list[str | ModelEntry] = Field(min_length=1)
    prompts: str | list[str]  # a suite, a file (relative to the config file) or a list
    per_category: int | None = Field(None, ge=1)  # the first N prompts of each category (prompt meta 'category')
    # One seed set for every arm (the --seeds forms, or a list of integers), or several: [{label, seeds, ...}]
    seeds: str | int | list[int] | list[SeedSet] = "0-3"
    sampler: dict[str, Any] = Field(default_factory=dict)
    guidance: list[GuidanceEntry] = Field(min_length=1)
    baseline: str | None = None  # an arm label; default: the first arm
    measures: Measures = Field(default_factory=Measures)
    batch_size: int = Field(8, ge=1)

    @field_validator("seeds")
    @classmethod
    def _seeds_form(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, SeedSet) for v in value):
            names = [v.name for v in value]
            if repeated := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"seed sets {', '.join(map(repr, repeated))} appear more than once; give each a "
                                 "distinct 'label'")
            return value
        if (problem := _seed_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _known_seed_sets(self) -> AuditConfig:
        names = [s.name for s in self.seed_sets()]
        for i, entry in enumerate(self.guidance):
            if unknown := [x for x in entry.seeds or [] if x not in names]:
                raise ValueError(f"guidance.{i}.seeds: no seed set {', '.join(map(repr, unknown))}; seed sets: "
                                 f"{', '.join(map(repr, names))}")
        return self

    def model_entries(self) -> list[ModelEntry]:
        return [ModelEntry(name=m) if isinstance(m, str) else m for m in self.models]

    def seed_sets(self) -> list[SeedSet]:
        if isinstance(self.seeds, list) and self.seeds and isinstance(self.seeds[0], SeedSet):
            return list(self.seeds)
        return [SeedSet(seeds=self.seeds)]


# --- reading the YAML, with the line of a bad field ----------------------------------------------------------------


def _line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (the deepest one that exists)."""
    import yaml

    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _describe(err: ValidationError, root: Any) -> str:
    # Of a union's alternatives, the error that got furthest into the value says most (``models.0.lora``); at equal
    # depth, a check of the value's content over "not an integer", and a mapping's alternative over a scalar's.
    first = max(err.errors(), key=lambda e: (len(_field_path(e["loc"])), not e["type"].endswith("_type"),
                                             any(isinstance(p, str) and p != p.lower() for p in e["loc"])))
    loc = _field_path(first["loc"])
    where = ".".join(str(p) for p in loc) or "top level"
    line = _line_of(root, loc)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        msg = f"unknown field; allowed: {', '.join(model.model_fields)}" if model else msg
    elif first["type"] == "literal_error":
        msg = f"{msg} (got {first.get('input')!r})"
    return f"{where}{f' (line {line})' if line else ''}: {msg}"


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without pydantic's names of union alternatives (``str``, ``ModelEntry``, ``literal['auto']``)."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or "[" in p or p in TYPE_NAMES)))


TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = AuditConfig
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        candidates = [t for t in getattr(info.annotation, "__args__", (info.annotation,))
                      if isinstance(t, type) and issubclass(t, BaseModel)]
        for arg in getattr(info.annotation, "__args__", ()):
            candidates += [t for t in getattr(arg, "__args__", ()) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def load_config(path: str | Path) -> tuple[AuditConfig, dict[str, Any]]:
    """The validated audit config and the raw mapping it came from; errors name the field, its line and what is
    allowed."""
    import yaml

    path = Path(path)
    text, data = read_yaml(path, "audit config", "an audit config")
    root = yaml.compose(text)  # parsed above, so it parses: the node tree gives errors their line
    if not isinstance(data, dict):
        raise InputError(f"audit config {path} must be a mapping with keys: {', '.join(AuditConfig.model_fields)}")
    try:
        return AuditConfig.model_validate(data), data
    except ValidationError as err:
        raise InputError(f"audit config {path}: {_describe(err, root)}") from None


# --- arms --------------------------------------------------------------------------------------------------------


@dataclass
class ArmPlan:
    label: str
    model: ModelEntry
    spec: RunSpec
    run_dir: Path
    sweep: dict[str, Any] | None = None  # {"group": ..., "param": ..., "value": ...}
    seed_set: SeedSet = field(default_factory=lambda: SeedSet(seeds="0"))
    to_make: int = 0
    made: int = 0


def _value_text(value: Any) -> str:
    return canonical_json(value) if isinstance(value, list | dict) else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")[:60] or "arm"


def expand(config: AuditConfig) -> list[tuple[str, ModelEntry, dict[str, Any], dict[str, Any] | None, str, SeedSet]]:
    """(label, model, guidance {name, params}, sweep, group, seed set) per arm: models x guidance entries x the
    values of each list-valued parameter (several lists: every combination) x seed sets (those the entry names in
    ``seeds``, default all)."""
    models = config.model_entries()
    seed_sets = config.seed_sets()
    out = []
    for m_index, model in enumerate(models):
        prefix = model.display() + " / " if len(models) > 1 else ""
        for g_index, entry in enumerate(config.guidance):
            params = entry.params()
            swept = [k for k, v in params.items() if isinstance(v, list) and k != "concepts"]
            for s_index, seed_set in enumerate(seed_sets):
                if entry.seeds is not None and seed_set.name not in entry.seeds:
                    continue
                # arms of the first seed set are named as in an audit of one seed set; the others say theirs
                base = prefix + (entry.label or entry.name) + (f" seeds={seed_set.name}" if s_index else "")
                group = f"{m_index}:{g_index}:{s_index}"
                for values in itertools.product(*(params[k] for k in swept)) if swept else [()]:
                    chosen = {**params, **dict(zip(swept, values, strict=True))}
                    label = base + "".join(f" {k}={_value_text(v)}" for k, v in zip(swept, values, strict=True))
                    sweep = ({"group": group, "title": base, "param": swept[0], "value": values[0]}
                             if len(swept) == 1 and isinstance(values[0], int | float) else None)
                    out.append((label, model, {"name": entry.name, "params": chosen}, sweep, group, seed_set))
    labels = [a[0] for a in out]
    if repeated := sorted({x for x in labels if labels.count(x) > 1}):
        raise InputError(f"audit config: arms {', '.join(map(repr, repeated))} appear more than once; give the "
                         "guidance entries (or models) distinct 'label's")
    return out


def select_prompts(items: list[Prompt], per_category: int | None) -> list[Prompt]:
    """The first ``per_category`` prompts of each category (prompt meta ``category``), in suite order; without
    categories, the first ``per_category`` prompts."""
    if per_category is None:
        return items
    seen: dict[Any, int] = {}
    kept = []
    for p in items:
        cat = p.meta.get("category")
        if seen.get(cat, 0) < per_category:
            kept.append(p)
            seen[cat] = seen.get(cat, 0) + 1
    return kept


def arm_identity(spec: RunSpec) -> dict[str, Any]:
    """What names an arm's run folder: its generation settings, and for mined seeds how they were drawn (the
    seeds file's hash, K, the draw's RNG seed, stored latents). A grid's seeds are left out, so more seeds extend
    the same run."""
    identity = spec.generation()
    if (source := spec.seed_source) is not None:
        identity["seed_source"] = source.model_dump(mode="json", include={"sha256", "k", "rng_seed", "stored_latents"})
    return identity


def plan_arms(config: AuditConfig, config_path: Path, audit_dir: Path,
              notes: list[str] | None = None) -> tuple[list[ArmPlan], list[Prompt], str]:
    """Every arm with its RunSpec and run directory, the prompts, and the baseline label; ``notes`` gets a line
    per mined seed set that leaves prompts out. Seeds go through the spec builder that ``generate --seeds`` uses
    (``reliable:FILE[:K]`` included)."""
    arms: list[ArmPlan] = []
    notes = [] if notes is None else notes
    first = config.model_entries()[0]
    spec, items, _ = build_spec({"model": first.spec_fields(config_path.parent), "prompts": config.prompts,
                                 "seeds": "0", "sampler": config.sampler}, spec_file=config_path)
    prompts = select_prompts(items, config.per_category)
    source = spec.prompt_source or (config.prompts if isinstance(config.prompts, str) else None)
    kept: dict[str, list[Prompt]] = {}
    for label, model, guidance, sweep, _, seed_set in expand(config):
        try:
            if seed_set.name not in kept:
                kept[seed_set.name], note = mined_prompts(seed_set, prompts, config_path.parent)
                if note:
                    notes.append(note)
            data = {"model": model.spec_fields(config_path.parent), "seeds": seed_set.spec_value(),
                    "sampler": config.sampler, "guidance": guidance, "prompts": kept[seed_set.name]}
            spec, _, _ = build_spec(data, spec_file=config_path)
        except InputError as err:
            if not seed_set.reliable:
                raise
            raise InputError(f"audit config {config_path}: seed set {seed_set.name!r} ({seed_set.seeds}): {err}") \
                from None
        spec = spec.model_copy(update={"prompt_source": source})
        digest = hashlib.sha256(canonical_json(arm_identity(spec)).encode()).hexdigest()[:8]
        arms.append(ArmPlan(label, model, spec, audit_dir / ARMS_DIR / f"{_slug(label)}-{digest}", sweep, seed_set))
    labels = [a.label for a in arms]
    baseline = config.baseline or labels[0]
    if baseline not in labels:
        raise InputError(f"audit config: baseline {baseline!r} is not an arm; arms: {', '.join(map(repr, labels))}")
    return arms, prompts, baseline


def mined_prompts(seed_set: SeedSet, prompts: list[Prompt], base: Path) -> tuple[list[Prompt], str | None]:
    """The prompts a seed set's arms hold, and a note when some are left out: mined seeds are drawn per count or
    relation category, so the arms of a ``reliable:`` set hold the prompts whose category the file has mined."""
    if not seed_set.reliable:
        return prompts, None
    from .seeds.file import read_reliable
    from .seeds.reliable import prompt_category, reliable_request

    reliable = read_reliable(reliable_request(seed_set.spec_value(), base=base).file)
    kept = []
    for p in prompts:
        try:
            category = prompt_category(p)
        except InputError:  # no question, or not a count or relation one
            continue
        if category in reliable.categories:
            kept.append(p)
    if not kept:
        raise InputError(f"no prompt has a category mined in {reliable.path} (it has: "
                         f"{', '.join(reliable.categories)}); give prompts with count or relation questions")
    if len(kept) == len(prompts):
        return prompts, None
    return kept, (f"seeds {seed_set.name!r}: its arms hold the {len(kept)} of {len(prompts)} prompts whose count or "
                  f"relation category {reliable.path.name} has mined; their comparisons pair on those prompts, and "
                  "their accuracy 'all' is over those prompts only")


def count_made(arm: ArmPlan) -> None:
    """How many of the arm's images its run already holds (0 for a run not started)."""
    from .generate import plan_pairs
    from .store import is_run_dir, open_run

    pairs = arm.spec.pairs()
    arm.made, arm.to_make = 0, len(pairs)
    if not is_run_dir(arm.run_dir):
        return
    with open_run(arm.run_dir) as store:
        config = store.get_meta("config")
        stored = store.spec
        if config is None or stored is None or stored.generation() != arm.spec.generation():
            return
        keys = store.keys()
    arm.made = sum(j.key in keys for j in plan_pairs(pairs, config))
    arm.to_make = len(pairs) - arm.made


def seeds_text(arms: list[ArmPlan], n_prompts: int) -> str:
    """``4 prompt(s) x 2 seed(s)``, or per seed set: ``4 prompt(s) x seed sets grid (2 per prompt), mined (...)``."""
    sets = {a.seed_set.name: a for a in arms}
    per = {name: len(a.spec.pairs()) / max(1, len(a.spec.prompts)) for name, a in sets.items()}
    if len(sets) == 1:
        return f"{n_prompts} prompt(s) x {_count(next(iter(per.values())))} seed(s)"
    return f"{n_prompts} prompt(s) x seed sets " + ", ".join(f"{n} ({_count(k)} per prompt)" for n, k in per.items())


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


# --- running -----------------------------------------------------------------------------------------------------


@dataclass
class AuditResult:
    audit_dir: Path
    summary: dict[str, Any]
    index: Path | None = None
    notes: list[str] = field(default_factory=list)
    workers: list[tuple[str, list[WorkerStats]]] = field(default_factory=list)  # (kind, per-worker stats) per pool


class Models:
    """Loads each model once, on first use, for every arm that needs it: arms of the same model, LoRA adapters
    (source and scale) and scheduler share one loaded model."""

    def __init__(self, console: Console):
        self.loaded: dict[str, Any] = {}
        self.console = console

    @staticmethod
    def key(arm: ArmPlan) -> str:
        return canonical_json(arm.spec.model.model_dump(mode="json") | {"scheduler": arm.spec.sampler.scheduler})

    def get(self, arm: ArmPlan):
        from .generate import load_run_model

        key = self.key(arm)
        if key not in self.loaded:
            self.console.print(message(f"loading model {arm.model.display()}"))
            self.loaded[key] = load_run_model(arm.spec)
        return self.loaded[key]


def time_one_batch(arm: ArmPlan, prompts: list[Prompt], models: Models, batch: int) -> float:
    """Seconds per image of the arm's guider, from one small timed batch (after one warm-up step)."""
    from .generate import make_run_guider, resolved_config
    from .sampling import sample

    adapter = models.get(arm)
    metas = {p.text: p.meta for p in prompts}
    guider = make_run_guider(arm.spec, metas, adapter.guidance_defaults())
    sampler = resolved_config(adapter, arm.spec, guider)["sampler"]
    n = max(1, min(batch, 4))
    prompt_list, seeds = [prompts[0].text] * n, list(range(n))
    kwargs = {"height": sampler["height"], "width": sampler["width"]}
    sample(adapter, guider, prompt_list[:1], seeds[:1], steps=1, **kwargs)  # warm-up (first-call costs)
    start = time.perf_counter()
    sample(adapter, guider, prompt_list, seeds, steps=sampler["steps"], **kwargs)
    return (time.perf_counter() - start) / n


def dry_run(config_path: Path, audit_dir: Path, *, console: Console, timing: bool = True) -> list[str]:
    """The plan as lines of text: each arm, its images to make and already made, and an estimated time."""
    config, _ = load_config(config_path)
    notes: list[str] = []
    arms, prompts, baseline = plan_arms(config, config_path, audit_dir, notes)
    models = Models(console)
    lines = [f"audit {config.name or config_path.stem}: {len(arms)} arm(s), {seeds_text(arms, len(prompts))}; "
             f"baseline {baseline!r}; output {audit_dir}", *(f"note: {n}" for n in notes)]
    total_s = 0.0
    estimated = timing
    per_image: dict[str, float] = {}
    for arm in arms:
        count_made(arm)
        eta = ""
        if timing and arm.to_make:
            key = canonical_json([Models.key(arm), arm.spec.guidance.name])
            try:
                if key not in per_image:
                    per_image[key] = time_one_batch(arm, prompts, models, config.batch_size)
                seconds = per_image[key] * arm.to_make
                total_s += seconds
                eta = f", about {_duration(seconds)}"
            except DiffprobeError as err:
                estimated = False
                eta = f", no estimate ({err})"
        lines.append(f"  {arm.label}: {arm.to_make} image(s) to make, {arm.made} already made{eta} -> {arm.run_dir}")
    measures = _measure_names(config)
    lines.append(f"measures: {', '.join(measures) or 'none'}")
    if timing:
        lines.append(f"estimated generation time: {_duration(total_s)}" if estimated
                     else "estimated generation time: unknown for some arms")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _measure_names(config: AuditConfig) -> list[str]:
    m = config.measures
    names = []
    if m.scs is not None:
        names.append(f"scs ({m.scs.embedder})")
    if m.composition is not None:
        names.append(f"composition ({'auto' if m.composition == 'auto' else m.composition.judge})")
    if m.clip is not None:
        names.append(f"clip ({m.clip.model})")
    if m.irs is not None:
        names.append("irs")
    if m.fd is not None:
        names.append("fd")
    return names


def run_audit(config_path: str | Path, audit_dir: str | Path | None = None, *, console: Console | None = None,
              progress: bool = True, report: bool = True, backend: Backend | None = None) -> AuditResult:
    """Run (or resume) the audit of ``config_path`` into ``audit_dir`` (default ``audits/<config name>``). With
    ``progress`` one view shows the whole audit: stage (generate, embed, judge, score), arm, images/s, ETA.

    ``backend`` (``diffprobe.distributed``) decides where images are generated, embedded and judged (default: in
    this process); this process writes every run. Consecutive arms of one model share one started pool (one load
    of the model), and each measure's pool serves every arm."""
    from .distributed import LocalBackend, ReusePools
    from .generate import generate
    from .metrics.provenance import provenance, write_json

    console = console or Console(stderr=True)
    config_path = Path(config_path)
    config, raw = load_config(config_path)
    audit_dir = Path(audit_dir) if audit_dir is not None else default_dir(config, config_path)
    notes: list[str] = []
    arms, prompts, baseline = plan_arms(config, config_path, audit_dir, notes)
    steps = len(arms) * (1 + len(_measure_names(config))) + 1
    with ReusePools(backend or LocalBackend()) as pools, StageProgress(console, steps, enabled=progress) as view:
        for i, arm in enumerate(arms, 1):
            count_made(arm)
            if not progress:
                console.print(message(f"[{i}/{len(arms)}] {arm.label}: generate ({arm.to_make} to make, "
                                      f"{arm.made} made)"))
            with view.step("generate", f"[{i}/{len(arms)}] {arm.label}", arm.to_make) as advance:
                generate(arm.spec, arm.run_dir, prompts=prompts, batch_size=config.batch_size, extend=True,
                         console=console, progress=advance if progress else False, backend=pools)
        pools.release()  # free the diffusion model before the measures load theirs
        measure_all(config, config_path, arms, notes, console, view, backend=pools)
        with view.step("score", "paired comparisons and the summary", len(arms)):
            summary = summarize(config, raw, arms, baseline, audit_dir, notes)
    summary["provenance"] = provenance()
    write_json(summary, audit_dir / SUMMARY_FILE)
    result = AuditResult(audit_dir, summary, notes=notes, workers=pools.worker_stats())
    if report:
        from .report import build_report

        result.index = build_report(audit_dir)
    return result


def default_dir(config: AuditConfig, config_path: Path) -> Path:
    return Path("audits") / _slug(config.name or config_path.stem)


def _skip(notes: list[str], console: Console, text: str) -> None:
    notes.append(text)
    console.print(message(text, "skipped:"))


def measure_all(config: AuditConfig, config_path: Path, arms: list[ArmPlan], notes: list[str], console: Console,
                view: StageProgress, backend: Backend | None = None) -> None:
    """Score and judge every arm; each measure's model loads once for all arms: in this process, and on each worker
    of a distributed ``backend`` that keeps its pool across arms (:class:`~diffprobe.distributed.ReusePools`)."""
    from .commands.judge import judge_run
    from .metrics.provenance import write_json

    m = config.measures
    scores = lambda arm, name: arm.run_dir / "scores" / f"{name}.json"  # noqa: E731
    each = functools.partial(_each, arms, notes=notes, console=console, view=view)
    if m.scs is not None:
        each("scs", lambda: _embedder(m.scs.embedder, m.scs.weights),
             lambda emb, arm, advance: write_json(_scs(arm, emb, advance, backend), scores(arm, "scs")))
    judge = m.composition
    if judge == "auto":
        judge = CompositionMeasure() if all(a.model.name == "shapes" for a in arms) else None
        if judge is None:
            view.skip(len(arms))
            notes.append("composition: not measured (no judge named; the exact 'shapes' judge only fits the shapes "
                         "model); set measures.composition.judge")
    if judge is not None:
        def run_judge(j, arm, advance):
            result = judge_run(arm.run_dir, j, console=console, progress=advance if view.enabled else False,
                               backend=backend)
            if result.summary["categories"]["all"]["n"] == 0:
                raise InputError(f"no image of {arm.label} has a question to judge "
                                 f"({'; '.join(result.summary['skipped_reasons']) or 'no prompts'})")
        each("composition", lambda: _judge(judge.judge), run_judge, stage="judge")
    if m.clip is not None:
        from .metrics.clipscore import score_clip

        each("clip", lambda: _embedder(m.clip.model, None),
             lambda emb, arm, advance: write_json(score_clip(arm.run_dir, emb, progress=advance, backend=backend),
                                                  scores(arm, "clip")))
    if m.irs is not None:
        from .metrics.irs import score_irs

        base = config_path.parent
        train = m.irs.train if m.irs.train.is_absolute() else base / m.irs.train
        test = None if m.irs.test is None else (m.irs.test if m.irs.test.is_absolute() else base / m.irs.test)
        missing = [str(p) for p in (train, test) if p is not None and not p.is_dir()]
        if missing:
            view.skip(len(arms))
            _skip(notes, console, f"irs: reference folder {', '.join(missing)} is missing or not a folder")
        else:
            each("irs", lambda: _embedder(m.irs.embedder, m.irs.weights),
                 lambda emb, arm, advance: write_json(score_irs(arm.run_dir, train, test, embedder=emb,
                                                                progress=advance, embed_backend=backend),
                                                      scores(arm, "irs")),
                 sized=False)
    if m.fd is not None:
        from .metrics.fd import score_fd

        ref = m.fd.ref if m.fd.ref.is_absolute() else config_path.parent / m.fd.ref
        inception = m.fd.inception
        if inception is not None and not inception.is_absolute():
            inception = config_path.parent / inception
        if not ref.exists():
            view.skip(len(arms))
            _skip(notes, console, f"fd: reference {ref} is missing (a folder of images or a --save-stats .npz)")
        elif inception is not None and not inception.is_file():
            view.skip(len(arms))
            _skip(notes, console, f"fd: Inception file {inception} is missing (inception-2015-12-05.pt)")
        else:
            def fd_embedder():
                if inception is None:
                    return _embedder(m.fd.embedder, m.fd.weights)
                return _embedder("inception-torchscript", inception)

            each("fd", fd_embedder,
                 lambda emb, arm, advance: write_json(score_fd(arm.run_dir, ref, embedder=emb, progress=advance,
                                                               backend=backend), scores(arm, "fd")), sized=False)


def _embedder(name: str, weights: Path | None):
    from .embed import get_embedder

    return get_embedder(name, weights=weights)


def _judge(name: str):
    from .judges import make_judge

    return make_judge(name)


def _scs(arm: ArmPlan, embedder, advance: Callable[[int], None], backend: Backend | None = None) -> dict[str, Any]:
    from .metrics.scs import score_scs

    return score_scs(arm.run_dir, embedder, sensitivity=False, progress=advance, backend=backend)


def _each(arms: list[ArmPlan], name: str, load: Callable[[], Any], measure: Callable[[Any, ArmPlan, Any], Any], *,
          notes: list[str], console: Console, view: StageProgress, stage: str = "embed", sized: bool = True) -> None:
    """Load the measure's model once and measure every arm (one step of the progress view each); a failure skips
    the measure (or the arm) with a note, and a result left from an earlier call is removed so the report never
    shows a stale number. ``sized=False``: the measure also embeds a reference set, so a step has no known total."""
    try:
        model = load()
    except DiffprobeError as err:
        view.skip(len(arms))
        _skip(notes, console, f"{name}: {err}")
        for arm in arms:
            (arm.run_dir / "scores" / f"{name}.json").unlink(missing_ok=True)
        return
    if note := getattr(model, "note", None):
        notes.append(f"{name}: {note}")
    for i, arm in enumerate(arms, 1):
        if not view.enabled:
            console.print(message(f"{name}: {arm.label}"))
        try:
            total = len(arm.spec.pairs()) if sized else None
            with view.step(stage, f"[{i}/{len(arms)}] {name}: {arm.label}", total) as advance:
                measure(model, arm, advance)
        except DiffprobeError as err:
            view.skip()
            _skip(notes, console, f"{name} of {arm.label}: {err}")
            (arm.run_dir / "scores" / f"{name}.json").unlink(missing_ok=True)


# --- comparing -----------------------------------------------------------------------------------------------------


def compare_arm(base, arm, metric: str, n_boot: int = 10000, seed: int = 0) -> dict[str, Any] | None:
    """Paired comparison of ``arm`` with ``base`` (report Arms): ``scs``/``clip`` over prompts (Wilcoxon; the
    full result of ``compare_paired`` under ``detail``), ``composition`` over images judged in both (McNemar)."""
    import numpy as np

    from .metrics.stats import bootstrap_mean_ci, compare_scores, mcnemar

    if metric in ("scs", "clip"):
        a, b = base.per_prompt(metric), arm.per_prompt(metric)
        shared = [p for p in a if p in b]
        if len(shared) < 2:
            return None if not a or not b else {"note": f"only {len(shared)} prompt(s) scored in both; need 2"}
        result = compare_scores({p: a[p] for p in shared}, {p: b[p] for p in shared}, names=(base.label, arm.label),
                                n_boot=n_boot, seed=seed)
        d, ci = result["difference"], result["difference"]["bootstrap_ci"]
        dz = result["effect_size"]["cohens_dz"]
        return {"n_pairs": result["n_pairs"], "difference": d["mean"], "ci": [ci["low"], ci["high"]],
                "p": result["wilcoxon"]["p"], "test": "Wilcoxon signed-rank over prompts",
                "extra": f"KS p={result['ks_2samp']['p']:.3g}; d_z={'n/a' if dz is None else f'{dz:.2f}'}; "
                         f"rank-biserial {result['effect_size']['rank_biserial']:.2f}",
                "note": "; ".join(result["warnings"]), "detail": result}
    if metric == "composition":
        # The i-th image of a prompt pairs with the baseline's i-th: the same seed when both arms use the same seed
        # set, else the i-th seed of each arm's own seeds for that prompt (e.g. mined seeds against a grid).
        theirs = arm.by_index()
        pairs = [(info.correct, theirs[k].correct) for k, info in base.by_index().items()
                 if k in theirs and info.correct is not None and theirs[k].correct is not None]
        if not pairs:
            return None
        same_seeds = all(base.seed_lists.get(p) == arm.seed_lists.get(p) for p in base.seed_lists
                         if p in arm.seed_lists)
        x, y = [p[0] for p in pairs], [p[1] for p in pairs]
        test = mcnemar(x, y)
        d = np.asarray(y, float) - np.asarray(x, float)
        low, high = bootstrap_mean_ci(d, n_boot, seed=seed) if len(d) > 1 else (float(d[0]), float(d[0]))
        pairing = "same prompt and seed" if same_seeds else "same prompt and image index"
        return {"n_pairs": len(pairs), "difference": float(d.mean()), "ci": [low, high], "p": test["p"],
                "test": test["test"] + f" over images ({pairing})", "pairing": pairing,
                "extra": f"arm right only {test['b_only_correct']}, baseline right only {test['a_only_correct']}",
                "detail": test}
    raise ValueError(metric)


def comparisons(arms: list, baseline: str, n_boot: int = 10000) -> dict[str, dict[str, Any]]:
    """Every arm against the baseline, per measure, with Holm-adjusted p-values across the arms of a measure."""
    from .metrics.stats import holm

    base = next(a for a in arms if a.label == baseline)
    out: dict[str, dict[str, Any]] = {a.label: {} for a in arms if a is not base}
    for metric in ("scs", "composition", "clip"):
        results = {a.label: compare_arm(base, a, metric, n_boot) for a in arms if a is not base}
        results = {k: v for k, v in results.items() if v is not None}
        adjusted = holm([r.get("p") for r in results.values()])
        for (label, r), p in zip(results.items(), adjusted, strict=True):
            out[label][metric] = {**r, "p_holm": p}
    return out


def summarize(config: AuditConfig, raw: dict[str, Any], arms: list[ArmPlan], baseline: str, audit_dir: Path,
              notes: list[str]) -> dict[str, Any]:
    from .report import gather_run, measures

    gathered = [gather_run(a.run_dir, a.label) for a in arms]
    sweeps: dict[str, dict[str, Any]] = {}
    for a in arms:
        if a.sweep is not None:
            s = sweeps.setdefault(a.sweep["group"], {"title": a.sweep["title"], "param": a.sweep["param"], "arms": []})
            s["arms"].append([a.label, a.sweep["value"]])
    seed_sets = {a.seed_set.name: seed_set_record(a) for a in arms}
    return {
        "kind": AUDIT_KIND,
        "name": config.name,
        "baseline": baseline,
        "prompts": len(arms[0].spec.prompts),
        "seeds": arms[0].spec.seeds,  # the first seed set's (all of them: seed_sets)
        "seed_sets": list(seed_sets.values()),
        "arms": [{"label": a.label, "run_dir": str(a.run_dir.relative_to(audit_dir)),
                  "model": a.model.model_dump(mode="json", exclude={"lora"} if not a.model.lora else set()),
                  "model_identity": g.model, "guidance": a.spec.guidance.model_dump(),
                  "seed_set": a.seed_set.name, "sweep": a.sweep, "images": g.n_images,
                  "measures": _finite(measures(g))} for a, g in zip(arms, gathered, strict=True)],
        "comparisons": _finite(comparisons(gathered, baseline)),
        "sweeps": [s for s in sweeps.values() if len(s["arms"]) > 1],
        "notes": notes,
        "config": raw,
    }


def seed_set_record(arm: ArmPlan) -> dict[str, Any]:
    """A seed set as summary.json records it: as given, the seeds it gave, and for mined seeds how they were drawn
    (file, its sha256, K, RNG seed, stored latents)."""
    spec = arm.spec
    record = arm.seed_set.model_dump(mode="json", exclude_none=True) | {"label": arm.seed_set.name,
                                                                         "kind": "reliable" if spec.seed_source
                                                                         else "grid", "seeds_used": spec.seeds}
    if spec.seed_source is not None:
        record["source"] = spec.seed_source.model_dump(mode="json", exclude={"requires"})
        record["per_prompt"] = spec.prompt_seeds
    return record


def _finite(value: Any) -> Any:
    """NaN and infinities (e.g. a test on identical samples) as None, so the summary is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
