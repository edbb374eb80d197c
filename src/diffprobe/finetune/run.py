"""Fine-tune the denoiser of a text-to-image model on an image folder: Q/K only (default), any projections, LoRA
adapters on them, or the whole denoiser; on the training core, with the model's own prediction target.

``finetune(data, model, out, FinetuneOptions(...))`` writes ``out``: a model folder that ``--model out`` loads (the
base model's components with the trained denoiser, saved as its EMA copy) or, with ``lora_rank``, a LoRA folder
that ``generate --lora out`` applies; each with its card (README.md, finetune.json, loss.csv, loss.png).
Checkpoints go to ``out`` + ``.training``; the same call after a kill resumes from the newest one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError, check_writable
from ..models.libraries import quiet_libraries
from ..training import StepContext, Trainer, TrainSettings
from ..training.core import RESUME_MAY_CHANGE
from . import layers
from .data import Batches, fingerprint, read_image_folder

CARD_JSON = "finetune.json"
LORA_FAMILIES = ("sd", "sdxl")  # the pipelines diffusers loads LoRA weights into (PixArt-alpha has no loader)


@dataclass(frozen=True)
class FinetuneOptions:
    layers: str | None = None  # None: the default blocks (see diffprobe.finetune.layers)
    attentions: str = "attn1,attn2"
    projections: str = "q,k"
    full: bool = False  # train every denoiser parameter
    lora_rank: int | None = None  # train LoRA adapters of this rank on the selected projections instead
    lora_alpha: float | None = None  # None: the rank (scale 1)
    resolution: int | None = None  # None: the model's default size
    # The official run: 16 per GPU x 2 GPUs x 4 accumulation = 128, lr 1e-6 scaled by that = 1.28e-4, 5000
    # steps. One process reaches the same 128 with 8 accumulation steps.
    batch: int = 16
    steps: int = 5000
    lr: float = 1.28e-4
    accumulation: int = 8
    warmup: int = 0
    ema_decay: float | None = 0.9999
    mixed_precision: str = "auto"
    gradient_checkpointing: bool | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 1
    log_every: int = 10
    seed: int = 0
    center_crop: bool = True
    random_flip: bool = True
    workers: int = 0  # DataLoader processes that decode images ahead (0: in the training process)

    def check(self) -> None:
        if self.full and self.lora_rank is not None:
            raise InputError("--full and --lora exclude each other: LoRA trains adapters on the selected projections")
        if self.full and (self.layers is not None or self.projections != "q,k" or self.attentions != "attn1,attn2"):
            raise InputError("--full trains every denoiser parameter; drop --layers, --modules and --attention")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InputError(f"--lora RANK must be at least 1 (got {self.lora_rank})")
        if self.batch < 1:
            raise InputError(f"--batch-size must be at least 1 (got {self.batch})")
        if self.workers < 0:
            raise InputError(f"--workers cannot be negative (got {self.workers})")
        if self.resolution is not None and self.resolution < 8:
            raise InputError(f"--resolution must be at least 8 pixels (got {self.resolution})")


@dataclass
class FinetuneResult:
    out: Path | None  # None when the run stopped before its last step (resume with the same call)
    steps: int
    resumed_from: int | None
    trainable_parameters: int
    total_parameters: int
    seconds: float
    card: dict[str, Any] = field(default_factory=dict)


def work_folder(out: Path) -> Path:
    """Where checkpoints and the running loss.csv live until the output is complete."""
    return out.parent / f"{out.name}.training"


def noise_scheduler_of(adapter):
    """The training noise schedule of the model (DDPM with the checkpoint's betas and prediction type)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(adapter.scheduler.config)


def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled VAE latents of images in [-1, 1], sampled from the posterior (as diffusers' training scripts do)."""
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, z.shape[1], 1, 1)
        return (z - torch.tensor(mean).view(shape).to(z)) * vae.config.scaling_factor / torch.tensor(std).view(
            shape).to(z)
    return z * vae.config.scaling_factor


def diffusion_loss(adapter, noise_scheduler, pixels: torch.Tensor, texts: list[str], generator: torch.Generator,
                   denoiser: torch.nn.Module | None = None) -> torch.Tensor:
    """The standard diffusion loss of one batch: MSE between the denoiser's output and the model's own target
    (the noise for epsilon prediction, the velocity for v-prediction), one random timestep per image."""
    from ..models.base import Conditioning

    device = adapter.device
    with torch.no_grad():
        latents = encode_latents(adapter.vae, pixels, generator).float()
        encoded = adapter.encode(texts)  # inference tensors: cloned so autograd may save them
        cond = Conditioning({k: v.clone() for k, v in encoded.tensors.items()}, encoded.truncated, encoded.tokens)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator,
                      device=device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    elif kind == "sample":
        target = latents
    else:
        raise InputError(f"the model's scheduler has prediction type {kind!r}; fine-tuning knows epsilon, "
                         "v_prediction and sample")
    pred = adapter.predict(noisy.to(adapter.dtype), t, cond, denoiser=denoiser)
    return F.mse_loss(pred.float(), target.float())


def finetune(data: str | Path, model: str, out: str | Path, options: FinetuneOptions = FinetuneOptions(), *,
             device: str | None = None, stop: Callable[[int], bool] | None = None,
             keep_work: bool = False) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` into ``out`` (see the module docstring). ``stop(step)`` ends the run early
    (its checkpoints stay for a resume; nothing is written to ``out``). Every input is checked before anything is
    written."""
    from ..models import load_model

    out = Path(out)
    options.check()
    if out.exists() and (out / CARD_JSON).is_file():
        raise InputError(f"{out} already holds a fine-tuned model; choose another --out, or delete it first")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; choose another --out (a new folder)")
    check_writable(out, directory=True)
    _check_libraries(options)
    examples = read_image_folder(data)
    settings = TrainSettings(
        steps=options.steps, lr=options.lr, accumulation=options.accumulation, warmup=options.warmup,
        ema_decay=options.ema_decay, mixed_precision=options.mixed_precision,
        gradient_checkpointing=options.gradient_checkpointing, checkpoint_every=options.checkpoint_every,
        keep_checkpoints=options.keep_checkpoints, log_every=options.log_every, seed=options.seed, device=device)
    trainer = Trainer(settings)
    adapter = load_model(model, device=trainer.device, dtype="fp32")
    if options.lora_rank is not None and adapter.family not in LORA_FAMILIES:
        raise InputError(f"--lora: diffusers loads LoRA weights only into {', '.join(LORA_FAMILIES)} pipelines, not "
                         f"{adapter.family}; fine-tune its projections directly (drop --lora)")
    denoiser = adapter.denoiser
    for name in ("vae", "text_encoder", "text_encoder_2", "unet", "transformer"):
        module = getattr(adapter.pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    selection = None if options.full else layers.select(denoiser, options.layers, options.attentions,
                                                       options.projections)
    torch.manual_seed(options.seed)  # LoRA initialisation
    if options.full:
        denoiser.requires_grad_(True)
    elif options.lora_rank is not None:
        from peft import LoraConfig

        denoiser.add_adapter(LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha or options.lora_rank,
                                        init_lora_weights="gaussian", target_modules=list(selection.modules)))
    else:
        layers.mark_trainable(denoiser, selection)
    resolution = options.resolution or adapter.default_size[0]
    adapter.check_size(resolution, resolution)
    data_hash = fingerprint(Path(data), examples)
    options_record = {k: v for k, v in asdict(options).items() if k not in (*RESUME_MAY_CHANGE, "workers")}
    identity = {"model": adapter.identity(), "data_sha256": data_hash, "options": options_record,
                "resolution": resolution, "selection": None if selection is None else list(selection.modules)}
    noise_scheduler = noise_scheduler_of(adapter)
    batches = Batches(examples, options.batch, resolution, options.seed, options.center_crop, options.random_flip,
                      options.workers)

    def loss(batch: tuple[torch.Tensor, list[str]], ctx: StepContext) -> torch.Tensor:
        pixels, texts = batch
        return diffusion_loss(adapter, noise_scheduler, pixels.to(ctx.device), texts, ctx.generator,
                              denoiser=ctx.modules["denoiser"])

    work = work_folder(out)
    denoiser.train()
    result = trainer.fit({"denoiser": denoiser}, loss, batches, work, identity=identity, phase="finetune",
                         stop=stop)
    denoiser.eval()
    total = sum(p.numel() for p in denoiser.parameters())
    if result.stopped:
        return FinetuneResult(None, result.steps, result.resumed_from, result.trainable_parameters, total,
                              result.seconds)
    trainer.accelerator.wait_for_everyone()
    card: dict[str, Any] = {}
    if trainer.is_main:
        card = _card_record(adapter, model, Path(data), examples, data_hash, options, settings, selection,
                            resolution, result, total, trainer, noise_scheduler.config.prediction_type)
        _write_output(adapter, out, work, card, options)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return FinetuneResult(out, result.steps, result.resumed_from, result.trainable_parameters, total,
                          result.seconds, card)


def _check_libraries(options: FinetuneOptions) -> None:
    """The optional libraries this run needs, checked before it trains (the card's plot comes last)."""
    import importlib.util

    needed = ["matplotlib"] + (["peft"] if options.lora_rank is not None else [])
    if missing := [name for name in needed if importlib.util.find_spec(name) is None]:
        raise InputError(f"fine-tuning needs {', '.join(missing)}; install it with pip install 'diffprobe[finetune]'")


def _card_record(adapter, model: str, data: Path, examples, data_hash: str, options: FinetuneOptions,
                 settings: TrainSettings, selection, resolution: int, result, total: int, trainer,
                 prediction_type: str) -> dict[str, Any]:
    from ..versions import library_versions

    kind = "lora" if options.lora_rank is not None else "full" if options.full else "projections"
    return {
        "kind": kind,
        "base_model": {"name": model, **adapter.identity()},
        "data": {"folder": str(Path(data).resolve()), "images": len(examples), "sha256": data_hash},
        "selection": None if selection is None else {**selection.record(), "names": list(selection.modules)},
        "lora": None if options.lora_rank is None else {"rank": options.lora_rank,
                                                         "alpha": options.lora_alpha or options.lora_rank},
        "options": asdict(options),
        "training": settings.record(),
        "resolution": resolution,
        "prediction_type": prediction_type,
        "loss": "MSE to the prediction target, one uniform timestep per image",
        "saved": "EMA copy of the trained parameters" if settings.ema_decay is not None else "raw weights",
        "steps": result.steps,
        "images_seen": result.steps * options.batch * options.accumulation * trainer.accelerator.num_processes,
        "trainable_parameters": result.trainable_parameters,
        "denoiser_parameters": total,
        "processes": trainer.accelerator.num_processes,
        "device": str(trainer.device),
        "mixed_precision": trainer.precision,
        "seconds_this_call": round(result.seconds, 1),
        "resumed_from": result.resumed_from,
        "versions": library_versions(("diffprobe", "torch", "diffusers", "transformers", "accelerate", "peft")),
    }


def _write_output(adapter, out: Path, work: Path, card: dict[str, Any], options: FinetuneOptions) -> None:
    """Build the output next to ``out`` and rename it into place, so ``out`` is either complete or absent."""
    from .card import write_card

    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with quiet_libraries(str(out)):
        if options.lora_rank is not None:
            _save_lora(adapter, partial)
        else:
            _save_model_folder(adapter, partial)
    shutil.copy(work / "loss.csv", partial / "loss.csv")
    write_card(partial, card)
    if out.exists():  # an empty folder (checked before training)
        out.rmdir()
    partial.rename(out)


def _save_lora(adapter, folder: Path) -> None:
    import diffusers
    from peft.utils import get_peft_model_state_dict

    from ..models.loading import PIPELINE_CLASSES

    pipeline = getattr(diffusers, PIPELINE_CLASSES[adapter.family])
    layers_ = get_peft_model_state_dict(adapter.denoiser)
    pipeline.save_lora_weights(folder, unet_lora_layers=layers_, safe_serialization=True)


def _save_model_folder(adapter, folder: Path) -> None:
    """The base checkpoint's files (hard links where the file system allows) with the denoiser replaced."""
    from ..models.loading import resolve_model

    base, _ = resolve_model(adapter.model_id)
    index = json.loads((base / "model_index.json").read_text())
    name = adapter.denoiser_attr
    for entry in sorted(base.iterdir()):
        if entry.name == name or entry.name.startswith("."):
            continue
        is_component = entry.is_dir() and isinstance(index.get(entry.name), list)
        if is_component:
            shutil.copytree(entry, folder / entry.name, copy_function=_link_or_copy)
        elif entry.is_file() and entry.suffix == ".json":  # model_index.json, diffprobe.json
            _link_or_copy(str(entry), str(folder / entry.name))
    adapter.denoiser.save_pretrained(folder / name, safe_serialization=True)
    config = folder / name / "config.json"  # diffusers records the folder it loaded from; a saved one must not
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "_name_or_path"},
                                 indent=2, sort_keys=True) + "\n")


def _link_or_copy(src: str, dst: str) -> None:
    real = os.path.realpath(src)  # hub caches hold symlinks to blobs
    try:
        os.link(real, dst)
    except OSError:
        shutil.copy2(real, dst)
