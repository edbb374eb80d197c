"""Sample a trained DiADM model into a run directory, so every score (``score irs``, ``score fd``, ...) reads it.

One image per condition, seed = its index: a pseudocond model takes the features of its training images (or of
other images, ``features_from``: a folder, embedded with the model's embedder, or a ``.npy`` array); an uncond
model makes as many images as it had training images, a class model one per training image with that image's
class. Sampling is DDIM (diffusers ``DDIMScheduler``, eta 0) with the training schedule; the starting noise of
image ``i`` comes from a CPU ``torch.Generator`` seeded with ``i``. Each condition is one "prompt" of the run
(``pseudocond: train/0-t-shirt-top/train-00012.png (sha256 1a2b...)``, ``uncond``, ``class: sneaker``), so the
store's job keys skip what a killed call already made.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..spec import GuidanceSpec, ModelSpec, RunSpec, SamplerSpec, job_key
from ..store import NewSample, create_run, is_run_dir, open_run
from . import model as M

SCHEDULER = "ddim"
TIMING_META = "diadm_sampling"  # run meta: images sampled and seconds spent, summed over calls


@dataclass
class Conditions:
    """What each image of a run is conditioned on: names (the run's prompts), vectors, metadata."""

    prompts: list[str]  # one per image
    vectors: torch.Tensor | None  # [n, dim] condition vectors (None: uncond)
    meta: list[dict[str, Any]]
    source: dict[str, Any]


@dataclass
class SampleResult:
    run_dir: Path
    total: int
    generated: int
    skipped: int
    seconds: float


def _feature_prompt(name: str, sha: str) -> str:
    return f"pseudocond: {name} (sha256 {sha[:12]})"


def conditions_of(model: M.DiadmModel, features_from: str | Path | None = None, *, device: str | None = None,
                  cache_dir: Path | None = None, no_cache: bool = False) -> Conditions:
    """The conditions a run of ``model`` samples (see the module docstring)."""
    card = model.card
    files, shas = card["data"]["files"], card["data"]["image_sha256"]
    if features_from is not None and model.mode != "pseudocond":
        raise InputError(f"--features-from applies to pseudocond models; this one is {model.mode} (it samples "
                         f"one image per training image)")
    if model.mode == "uncond":
        return Conditions(["uncond"] * len(files), None, [{"condition": "none"} for _ in files],
                          {"kind": "uncond", "images": len(files)})
    if model.mode == "class":
        classes, labels = card["data"]["classes"], model.labels
        meta = [{"condition": "class", "class": classes[c], "label": c} for c in labels]
        vectors = M.condition_vectors("class", None, labels, len(classes))
        return Conditions([f"class: {classes[c]}" for c in labels], vectors, meta,
                          {"kind": "training classes", "classes": classes})
    if features_from is None:
        feats, names, source = model.features, files, {"kind": "training features", "images": len(files)}
    else:
        feats, names, shas, source = _given_features(model, Path(features_from), device, cache_dir, no_cache)
    if feats.shape[1] != model.cond_dim:
        raise InputError(f"the features have dimension {feats.shape[1]}, but the model was trained on "
                         f"{model.cond_dim}-dimensional features of {card['embedder']['spec']}; give features of "
                         "that embedder (or an image folder, which is embedded with it)")
    meta = [{"condition": "pseudocond", "image": n, "image_sha256": s} for n, s in zip(names, shas, strict=True)]
    return Conditions([_feature_prompt(n, s) for n, s in zip(names, shas, strict=True)],
                      M.condition_vectors("pseudocond", feats, None, 0), meta, source)


def _given_features(model: M.DiadmModel, source: Path, device, cache_dir, no_cache):
    """Features of held-out images: a folder (embedded with the model's embedder, through the cache) or .npy."""
    from ..metrics.images import load_features
    from .data import read_training_images
    from .train import image_features

    if source.suffix == ".npy":
        feats, _ = load_features(source, None)
        feats = np.array(feats, dtype=np.float32)  # a writable copy of the memory-mapped file
        shas = [hashlib.sha256(row.tobytes()).hexdigest() for row in feats]
        names = [f"{source.name} row {i}" for i in range(len(feats))]
        return torch.from_numpy(feats), names, shas, {"kind": "features file", "path": str(source.resolve())}
    data = read_training_images(source)
    feats, _ = image_features(data.paths, data.shas, model.card["embedder"]["spec"], device=device,
                              cache_dir=cache_dir, no_cache=no_cache)
    names = [f"{data.root.name}/{rel}" for rel in data.relative()]
    return feats, names, data.shas, {"kind": "features of images", "folder": str(data.root.resolve()),
                                     "images": len(data)}


def run_spec(model_dir: Path, model: M.DiadmModel, cond: Conditions, steps: int) -> RunSpec:
    """The run's spec: the conditions as prompts, each with the seeds (indices) of its images."""
    table: dict[str, list[int]] = {}
    for i, p in enumerate(cond.prompts):
        table.setdefault(p, []).append(i)
    size = model.card["options"]["resolution"]
    return RunSpec(model=ModelSpec(name=str(model_dir.resolve()), family="diadm", dtype="fp32"),
                   prompts=list(table), seeds=list(range(len(cond.prompts))), prompt_seeds=table,
                   sampler=SamplerSpec(steps=steps, scheduler=SCHEDULER, height=size, width=size),
                   guidance=GuidanceSpec(name="none", params={}), prompt_source=f"diadm:{model.mode}")


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """Samples in [-1, 1] -> 8-bit PIL images (grayscale for one channel)."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in arr]


@torch.inference_mode()
def ddim_sample(model: M.DiadmModel, seeds: list[int], vectors: torch.Tensor | None, steps: int,
                device: torch.device) -> torch.Tensor:
    """A batch of samples in [-1, 1]: DDIM (eta 0) from per-seed CPU noise."""
    from diffusers import DDIMScheduler

    opts = model.card["options"]
    scheduler = DDIMScheduler(**model.card["schedule"])
    scheduler.set_timesteps(steps)
    shape = (opts["channels"], opts["resolution"], opts["resolution"])
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    cond = None if vectors is None else vectors.to(device)
    for t in scheduler.timesteps:
        eps = model.denoise(x, t.expand(len(x)).to(device), cond)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


def sample_diadm(model_dir: str | Path, out: str | Path, *, features_from: str | Path | None = None,
                 steps: int = 50, batch_size: int = 64, limit: int | None = None, device: str | None = None,
                 new: bool = False, cache_dir: Path | None = None, no_cache: bool = False,
                 progress: Callable[[int], None] | None = None) -> SampleResult:
    """Sample ``model_dir`` into the run ``out`` (created, or continued: stored images are skipped)."""
    from ..models.loading import choose_device
    from ..versions import library_versions

    if steps < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise InputError("--steps, --batch-size and --limit must be at least 1")
    model_dir, out = Path(model_dir), Path(out)
    dev = choose_device(device)
    model = M.load(model_dir, dev)
    cond = conditions_of(model, features_from, device=device, cache_dir=cache_dir, no_cache=no_cache)
    if limit is not None:  # the first `limit` conditions
        cond = Conditions(cond.prompts[:limit], None if cond.vectors is None else cond.vectors[:limit],
                          cond.meta[:limit], cond.source)
    spec = run_spec(model_dir, model, cond, steps)
    identity = {"family": "diadm", "mode": model.mode, "weights_sha256": model.card["weights_sha256"]}
    size = model.card["options"]["resolution"]
    sampler = {"scheduler": SCHEDULER, "steps": steps, "eta": 0.0, "height": size, "width": size,
               "generator_device": "cpu", "schedule": model.card["schedule"]}
    guidance = spec.guidance.model_dump()
    config = {"model": identity, "sampler": sampler, "dtype": "fp32", "conditions": cond.source}
    if is_run_dir(out) and not new:
        store = open_run(out, write=True)
        store.repair()
        store.check_spec(spec, extend=True)  # a larger --limit adds images to the run
        store.check_config(config)
    else:
        store = create_run(out, spec, new=new)
        store.check_config(config)
    t0, generated = time.time(), 0
    try:
        store.add_prompts([(p, m) for p, m in dict(zip(cond.prompts, cond.meta, strict=True)).items()])
        keys = [job_key(identity, p, i, sampler, guidance) for i, p in enumerate(cond.prompts)]
        have = store.keys()
        todo = [i for i, k in enumerate(keys) if k not in have]
        if progress is not None and len(keys) > len(todo):
            progress(len(keys) - len(todo))
        prov = {"model": {**identity, "folder": str(model_dir.resolve())}, "sampler": sampler, "dtype": "fp32",
                "device": str(dev), "versions": library_versions(("diffprobe", "torch", "diffusers"))}
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            vectors = None if cond.vectors is None else cond.vectors[rows]
            images = to_images(ddim_sample(model, rows, vectors, steps, dev))
            store.add([NewSample(key=keys[i], prompt=cond.prompts[i], seed=i, image=im, guidance=guidance,
                                 provenance={**prov, "seed": i, "condition": cond.meta[i]},
                                 records={"condition_index": i, **cond.meta[i]})
                       for i, im in zip(rows, images, strict=True)])
            generated += len(rows)
            if progress is not None:
                progress(len(rows))
    finally:
        if generated:
            spent = store.get_meta(TIMING_META) or {"images": 0, "seconds": 0.0}
            store.set_meta(TIMING_META, {"images": spent["images"] + generated,
                                         "seconds": spent["seconds"] + time.time() - t0, "device": str(dev)})
        store.close()
    return SampleResult(out, len(keys), generated, len(keys) - len(todo), time.time() - t0)
