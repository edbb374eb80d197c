"""What a report shows, gathered from a run directory (or each arm of an audit) into plain data.

Everything comes from the run store and the JSON files the scoring commands write under ``RUN/scores``; nothing
here embeds, judges or samples. A measure a run has not been scored with is simply absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

SCORES_DIR = "scores"
SCORE_FILES = ("scs", "clip", "irs", "composition", "fd")


@dataclass
class ImageInfo:
    key: str
    prompt: str
    seed: int
    path: Path
    sha256: str
    records: dict[str, Any] = field(default_factory=dict)
    correct: bool | None = None  # None: not judged, or the judge's answer did not parse
    judged: bool = False
    answer: str = ""
    reason: str = ""


@dataclass
class Arm:
    """One run: its settings, its images by (prompt, seed) and the score files it holds."""

    label: str
    run_dir: Path
    model: dict[str, Any]
    sampler: dict[str, Any]
    guidance: dict[str, Any]
    versions: dict[str, Any]
    prompts: list[str]  # in run order
    seeds: list[int]
    images: dict[tuple[str, int], ImageInfo]
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Each prompt's seeds in the run's order (the grid's seeds, or a prompt's own mined seeds); default: the images'
    seed_lists: dict[str, list[int]] = field(default_factory=dict)
    seed_source: dict[str, Any] | None = None  # how mined seeds were drawn (file, sha256, k, ...), from the spec

    def __post_init__(self) -> None:
        if not self.seed_lists:
            for prompt, seed in sorted(self.images, key=lambda k: k[1]):
                self.seed_lists.setdefault(prompt, []).append(seed)

    @property
    def n_images(self) -> int:
        return len(self.images)

    def by_index(self) -> dict[tuple[str, int], ImageInfo]:
        """(prompt, i) -> the image of the prompt's i-th seed: how arms with different seed sets line up."""
        return {(p, i): self.images[(p, s)] for p, seeds in self.seed_lists.items() for i, s in enumerate(seeds)
                if (p, s) in self.images}

    def per_prompt(self, metric: str) -> dict[str, float]:
        """Prompt text -> score for ``scs`` or ``clip`` (undefined scores left out)."""
        data = self.scores.get(metric)
        if not data:
            return {}
        field_name = "scs" if metric == "scs" else "clip_score"
        return {row.get("prompt") or row["prompt_id"]: float(row[field_name]) for row in data.get("per_prompt", [])
                if row.get(field_name) is not None}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path} is not readable JSON ({err})") from None


def _verdicts(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Sample key -> the judge's row from ``RUN/scores/composition.jsonl`` (written by ``diffprobe judge``)."""
    path = run_dir / SCORES_DIR / "composition.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise InputError(f"{path} line {number} is not JSON ({err}); run diffprobe judge again") from None
        if isinstance(row, dict) and isinstance(row.get("key"), str):
            out[row["key"]] = row
    return out


def gather_run(run_dir: str | Path, label: str | None = None) -> Arm:
    """The run at ``run_dir`` (read only) with its score files."""
    from ..store import is_run_dir, open_run

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise InputError(f"{run_dir} is not a run directory (made by diffprobe generate) or an audit directory "
                         "(made by diffprobe audit)")
    with open_run(run_dir) as store:
        samples = store.samples()
        spec = store.spec
        config = store.get_meta("config") or {}
    verdicts = _verdicts(run_dir)
    images: dict[tuple[str, int], ImageInfo] = {}
    prompts: dict[str, None] = {}
    seeds: dict[int, None] = {}
    for s in samples:
        v = verdicts.get(s.key)
        images[(s.prompt, s.seed)] = ImageInfo(
            key=s.key, prompt=s.prompt, seed=s.seed, path=s.image_path, sha256=s.image_sha256, records=s.records,
            correct=None if v is None else v.get("correct"), judged=v is not None,
            answer=str((v or {}).get("answer") or ""), reason=str((v or {}).get("reason") or ""))
        prompts.setdefault(s.prompt)
        seeds.setdefault(s.seed)
    seed_lists: dict[str, list[int]] = {}
    if spec is not None:  # the spec's order, where the run holds those images
        ordered = [p for p in spec.prompts if p in prompts]
        prompts = dict.fromkeys(ordered + [p for p in prompts if p not in set(ordered)])
        rank = {s: i for i, s in enumerate(spec.seeds)}
        seeds = dict.fromkeys(sorted(seeds, key=lambda x: (rank.get(x, len(rank)), x)))
        for prompt, seed in spec.pairs():  # planned images keep their place when one is missing
            seed_lists.setdefault(prompt, []).append(seed)
        for prompt, seed in sorted(images, key=lambda k: k[1]):  # images the spec no longer names, at the end
            if seed not in seed_lists.setdefault(prompt, []):
                seed_lists[prompt].append(seed)
    first = samples[0].provenance if samples else {}
    arm = Arm(label=label or run_dir.resolve().name, run_dir=run_dir,
              model=config.get("model") or first.get("model", {}),
              sampler=config.get("sampler") or first.get("sampler", {}),
              guidance=config.get("guidance") or (samples[0].guidance if samples else {}),
              versions=first.get("versions", {}), prompts=list(prompts), seeds=list(seeds), images=images,
              seed_lists={p: seed_lists[p] for p in prompts if p in seed_lists},
              seed_source=None if spec is None or spec.seed_source is None
              else spec.seed_source.model_dump(mode="json"))
    for name in SCORE_FILES:
        path = run_dir / SCORES_DIR / f"{name}.json"
        if path.is_file():
            try:
                arm.scores[name] = read_json(path)
            except InputError as err:
                arm.notes.append(f"{name}: {err}")
    return arm


# --- one arm's measures, with intervals ----------------------------------------------------------------------


def mean_ci(values: list[float], seed: int = 0) -> dict[str, Any] | None:
    """Mean over prompts with a 95 % percentile-bootstrap interval (resampling prompts)."""
    from ..metrics.stats import bootstrap_mean_ci

    if not values:
        return None
    x = np.asarray(values, float)
    low, high = bootstrap_mean_ci(x, n_boot=2000, seed=seed) if len(x) > 1 else (float(x[0]), float(x[0]))
    return {"mean": float(x.mean()), "low": low, "high": high, "n": int(len(x)),
            "interval": "95 % percentile bootstrap over prompts"}


def measures(arm: Arm) -> dict[str, Any]:
    """The arm's headline numbers: SCS and CLIP score means with bootstrap intervals over prompts, accuracy per
    category with Wilson intervals (from the judge's summary), IRS-infinity with its bounds."""
    out: dict[str, Any] = {}
    for metric in ("scs", "clip"):
        if values := arm.per_prompt(metric):
            out[metric] = mean_ci(list(values.values()))
            if metric == "clip" and arm.scores["clip"].get("r_precision") is not None:
                out[metric]["r_precision"] = arm.scores["clip"]["r_precision"]
    if comp := arm.scores.get("composition"):
        out["composition"] = {name: {"accuracy": c.get("accuracy"), "low": c["ci95"][0], "high": c["ci95"][1],
                                     "n": c.get("n"), "correct": c.get("correct")}
                              for name, c in comp.get("categories", {}).items()}
    if irs := arm.scores.get("irs"):
        syn = irs.get("synthetic", {})
        if syn.get("irs_inf") is not None:
            out["irs"] = {"mean": syn["irs_inf"], "low": syn.get("irs_inf_l"), "high": syn.get("irs_inf_u"),
                          "irs_alpha": syn.get("irs_alpha"), "bounds": irs.get("bounds")}
            if adjusted := irs.get("adjusted"):
                out["irs"]["adjusted"] = adjusted.get("irs_adjusted")
    if (fd := arm.scores.get("fd")) and fd.get("fd") is not None:
        kid = fd.get("kid") or {}
        out["fd"] = {"mean": fd["fd"], "is_fid": fd.get("is_fid"), "note": fd.get("fid_note"),
                     "kid": kid.get("kid"), "kid_sd": kid.get("kid_sd")}
    return out


def identities(arm: Arm) -> dict[str, Any]:
    """Who measured what: the embedders and the judge recorded in the arm's score files."""
    out: dict[str, Any] = {}
    for name in ("scs", "clip", "irs", "fd"):
        if emb := arm.scores.get(name, {}).get("embedder"):
            out[f"{name} embedder"] = emb
    if judge := arm.scores.get("composition", {}).get("judge"):
        out["judge"] = judge
    return out


def scs_contributions(arm: Arm, prompts: list[str]) -> dict[tuple[str, int], float]:
    """Each image's share of its prompt's SCS: its mean similarity to the prompt's other images (their mean is the
    prompt's SCS), from the features cached in the run when it was scored. Empty when the run was not scored with
    SCS or its cache does not hold every image of a prompt."""
    from ..embed.cache import CACHE_FILE, FeatureCache
    from ..metrics.scs import pair_scores

    scs = arm.scores.get("scs") or {}
    embedder = (scs.get("embedder") or {}).get("id")
    path = arm.run_dir / CACHE_FILE
    if not embedder or not path.is_file():
        return {}
    by_prompt: dict[str, list[ImageInfo]] = {}
    for info in arm.images.values():
        by_prompt.setdefault(info.prompt, []).append(info)
    out: dict[tuple[str, int], float] = {}
    try:
        cache = FeatureCache(path, read_only=True)
    except InputError:
        return {}
    try:
        for prompt in prompts:
            infos = by_prompt.get(prompt, [])
            found = cache.get([i.sha256 for i in infos], embedder)
            if len(infos) < 2 or any(i.sha256 not in found for i in infos):
                continue
            sim = pair_scores(np.stack([found[i.sha256] for i in infos]), scale=float(scs.get("scale", 100.0)),
                              clamp=bool(scs.get("clamp_negative", True)))
            shares = (sim.sum(axis=1) - np.diag(sim)) / (len(infos) - 1)
            out.update({(i.prompt, i.seed): float(v) for i, v in zip(infos, shares, strict=True)})
    finally:
        cache.close()
    return out
