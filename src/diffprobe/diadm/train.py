"""Train a DiADM model (or its unconditional / class-conditional comparison) on an image folder, on the training
core: ``train_diadm(images, out, DiadmOptions(cond="pseudocond", embedder="efficientnet-lite0@64"))``.

The loss is the standard epsilon-prediction diffusion loss (DDPM schedule, one uniform timestep per image);
only the condition differs between modes (see :mod:`diffprobe.diadm.model`). Features come from the embedder
through the feature cache, computed once per image. Checkpoints go to ``out`` + ``.training``; the same call
after a kill resumes from the newest one, and ``out`` appears complete or not at all.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError, check_writable
from ..training import StepContext, Trainer, TrainSettings
from ..training.core import RESUME_MAY_CHANGE
from . import model as M
from .data import Batches, TrainingImages, read_pixels, read_training_images


@dataclass(frozen=True)
class DiadmOptions:
    cond: str = "pseudocond"
    embedder: str = "efficientnet-lite0@64"  # pseudocond only: the feature extractor of the pseudo-labels
    resolution: int = 32
    channels: int = 3  # 1: grayscale
    width: int = 32  # channels of the UNet's first level
    steps: int = 2000
    batch: int = 32
    lr: float = 2e-4
    warmup: int = 100
    ema_decay: float | None = 0.999
    checkpoint_every: int = 500
    keep_checkpoints: int = 1
    log_every: int = 20
    seed: int = 0

    def check(self) -> None:
        M.check_mode(self.cond)
        if self.channels not in (1, 3):
            raise InputError(f"--channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.batch < 1:
            raise InputError(f"--batch-size must be at least 1 (got {self.batch})")
        M.unet_config(self.resolution, self.channels, self.width, True)  # checks resolution and width


@dataclass
class TrainResult:
    out: Path | None  # None when stopped before the last step (resume with the same call)
    steps: int
    resumed_from: int | None
    parameters: int
    seconds: float
    card: dict[str, Any]


def work_folder(out: Path) -> Path:
    return out.parent / f"{out.name}.training"


def image_features(paths: list[Path], shas: list[str], embedder_name: str, *, device: str | None = None,
                   cache_dir: Path | None = None, no_cache: bool = False, batch_size: int = 64):
    """(features float32 [N, D], the embedder) of image files, through the feature cache."""
    from ..embed import FeatureCache, embed_files, get_embedder

    embedder = get_embedder(embedder_name, device=device, batch_size=batch_size)
    cache = None if no_cache else FeatureCache.for_location(cache_dir=cache_dir)
    try:
        feats = embed_files(embedder, paths, cache=cache, shas=shas)
    finally:
        if cache is not None:
            cache.close()
    return torch.from_numpy(feats), embedder


def train_diadm(images: str | Path, out: str | Path, options: DiadmOptions = DiadmOptions(), *,
                device: str | None = None, cache_dir: Path | None = None, no_cache: bool = False,
                stop: Callable[[int], bool] | None = None, keep_work: bool = False) -> TrainResult:
    """Train into ``out`` (a new folder); see the module docstring. Every input is checked before training."""
    from diffusers import DDPMScheduler

    out = Path(out)
    options.check()
    if (out / M.CARD).is_file():
        raise InputError(f"{out} already holds a trained DiADM model; choose another --out, or delete it first")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; choose another --out (a new folder)")
    check_writable(out, directory=True)
    data = read_training_images(images, cache_dir)
    if options.cond == "class" and data.labels is None:
        raise InputError(f"--cond class needs a class per image: put the images of {data.root} into one subfolder "
                         "per class (or give metadata.jsonl a \"label\" per image)")
    features, embedder_info = None, None
    if options.cond == "pseudocond":
        features, embedder = image_features(data.paths, data.shas, options.embedder, device=device,
                                            cache_dir=cache_dir, no_cache=no_cache)
        embedder_info = {"spec": options.embedder, **embedder.describe()}
    conditions = M.condition_vectors(options.cond, features, data.labels, len(data.classes))
    config = M.unet_config(options.resolution, options.channels, options.width, conditions is not None)
    unet, projection = M.build(config, None if conditions is None else conditions.shape[1], options.seed)
    pixels = read_pixels(data.paths, options.resolution, options.channels)
    scheduler = DDPMScheduler(**M.SCHEDULE)

    settings = TrainSettings(steps=options.steps, lr=options.lr, warmup=options.warmup, ema_decay=options.ema_decay,
                             gradient_checkpointing=False, checkpoint_every=options.checkpoint_every,
                             keep_checkpoints=options.keep_checkpoints, log_every=options.log_every,
                             seed=options.seed, device=device)
    trainer = Trainer(settings)
    modules = {"unet": unet.to(trainer.device)}
    if projection is not None:
        modules["condition"] = projection.to(trainer.device)
    net = M.DiadmModel(unet, projection, {})
    alphas = scheduler.alphas_cumprod.to(trainer.device)

    def loss(batch: tuple[torch.Tensor, torch.Tensor | None], ctx: StepContext) -> torch.Tensor:
        x0, cond = batch
        x0 = x0.to(ctx.device)
        noise = torch.randn(x0.shape, generator=ctx.generator, device=ctx.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=ctx.generator,
                          device=ctx.device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = net.denoise(xt, t, cond, ctx.modules["unet"], ctx.modules.get("condition"))
        return F.mse_loss(pred.float(), noise)

    record = {k: v for k, v in asdict(options).items() if k not in RESUME_MAY_CHANGE}
    identity = {"data_sha256": data.fingerprint(), "options": record, "unet": config,
                "embedder": None if embedder_info is None else embedder_info["id"]}
    work = work_folder(out)
    for m in modules.values():
        m.train()
    result = trainer.fit(modules, loss, Batches(pixels, conditions, options.batch, options.seed), work,
                         identity=identity, phase="diadm", stop=stop)
    for m in modules.values():
        m.eval()
    parameters = sum(p.numel() for m in modules.values() for p in m.parameters())
    if result.stopped:
        return TrainResult(None, result.steps, result.resumed_from, parameters, result.seconds, {})
    cond_dim = None if conditions is None else conditions.shape[1]
    card = _card(data, options, config, embedder_info, cond_dim, settings, result, parameters, trainer)
    if trainer.is_main:
        _write(out, work, unet, projection, features, data.labels, scheduler, card)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return TrainResult(out, result.steps, result.resumed_from, parameters, result.seconds, card)


def _card(data: TrainingImages, options: DiadmOptions, config: dict, embedder_info: dict | None,
          cond_dim: int | None, settings: TrainSettings, result, parameters: int, trainer) -> dict[str, Any]:
    from ..versions import library_versions

    return {
        "kind": "diadm",
        "mode": options.cond,
        "conditioning": None if options.cond == "uncond" else {
            "mechanism": M.MECHANISM,
            "vector": ("L2-normalised feature x sqrt(dim)" if options.cond == "pseudocond"
                       else "one-hot class x sqrt(classes)"),
            "dim": cond_dim,
        },
        "embedder": embedder_info,
        "data": {"folder": str(data.root.resolve()), "images": len(data), "sha256": data.fingerprint(),
                 "files": data.relative(), "image_sha256": data.shas, "classes": data.classes},
        "options": asdict(options),
        "unet": config,
        "schedule": M.SCHEDULE,
        "loss": "MSE to the added noise (epsilon prediction), one uniform timestep per image",
        "training": settings.record(),
        "steps": result.steps,
        "images_seen": result.steps * options.batch * trainer.accelerator.num_processes,
        "parameters": parameters,
        "saved": "EMA copy of the trained parameters" if settings.ema_decay is not None else "raw weights",
        "device": str(trainer.device),
        "seconds_this_call": round(result.seconds, 1),
        "seconds_per_step_this_call": round(result.seconds / max(1, len(result.history)), 4),
        "resumed_from": result.resumed_from,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(("diffprobe", "torch", "diffusers", "accelerate")),
    }


def _write(out: Path, work: Path, unet, projection, features, labels, scheduler, card: dict) -> None:
    """Build the model next to ``out`` and rename it into place, so ``out`` is complete or absent."""
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    M.save(partial, unet.cpu(), None if projection is None else projection.cpu(), features, labels, scheduler, card)
    shutil.copy(work / "loss.csv", partial / "loss.csv")
    if out.exists():  # an empty folder (checked before training)
        out.rmdir()
    partial.rename(out)
