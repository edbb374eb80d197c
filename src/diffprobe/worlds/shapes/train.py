"""Train the shapes-world model from a seed: ``python -m diffprobe.worlds.shapes.train --out DIR``.

Phase 1 trains the KL autoencoder on rendered scenes; phase 2 trains the UNet and the text encoder jointly with the
epsilon-prediction loss, dropping 10% of captions so classifier-free guidance works, and keeps an EMA of both (on
the project's training core, :mod:`diffprobe.training`: AdamW, clipping, warm-up, diffusers' EMA, loss log). Scenes
are rendered on the fly (scene layouts in DataLoader workers, pixels on the training device). Writes ``DIR/weights``
(a Stable-Diffusion-style diffusers folder), ``DIR/loss.csv`` and ``DIR/training.json``.
``--init`` continues a trained folder; ``--replay training.json`` trains a recorded chain of runs again.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import InputError, exit_on_user_error
from ...models.loading import choose_device
from ...training import LossLog, StepContext, Trainer, TrainSettings, latest_checkpoint
from . import grammar, model
from .card import model_card
from .record import chain, examples_seen, same_settings, setting
from .render import pack, render_packed

MAX_SHAPES = 6
CAPTION_DROPOUT = 0.1  # captions replaced by "" so that classifier-free guidance works


class _Batches(torch.utils.data.Dataset):
    """Item ``i`` is the i-th training batch: packed scenes and captions of a contiguous index range."""

    def __init__(self, batch: int, offset: int = 0, partial_captions: float = 0.0):
        self.batch, self.offset, self.partial_captions = batch, offset, partial_captions

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int):
        start = self.offset + i * self.batch
        examples = [grammar.training_example(j, self.partial_captions) for j in range(start, start + self.batch)]
        params, colors = pack([s for s, _ in examples], MAX_SHAPES)
        return params, colors, [c for _, c in examples]


def _loader(batch: int, workers: int, offset: int = 0, partial_captions: float = 0.0):
    return iter(
        torch.utils.data.DataLoader(
            _Batches(batch, offset, partial_captions),
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )
    )


def _load_init(folder: Path) -> tuple[dict[str, torch.nn.Module], dict]:
    """Models of a trained weights folder and its training record (``training.json`` beside the folder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    record = folder.parent / "training.json"
    if not (folder / "model_index.json").is_file() or not record.is_file():
        raise InputError(f"--init {folder}: expected a weights folder (model_index.json) with training.json beside it")
    models = {
        "vae": AutoencoderKL.from_pretrained(folder / "vae"),
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
    }
    return models, json.loads(record.read_text())


def _cpu_name() -> str:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("model name")), "")
    return f"CPU {model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def replay(record: dict, out: Path, device: str | None = None, workers: int = 8, log_every: int = 50) -> dict:
    """Train every run of a recorded chain again with its recorded settings, into ``out/run1``, ``out/run2``, ...

    Each run takes the step count it reached, so runs stopped by ``--max-minutes`` replay the same length on any
    hardware. A run folder whose training.json already records the same settings is kept, so an interrupted
    replay resumes at the run it stopped in; once one run is trained again, every later run is too.
    """
    info: dict = {}
    init = None
    retrained = False
    for k, run in enumerate(chain(record), 1):
        folder = out / f"run{k}"
        done = folder / "training.json"
        if not retrained and done.is_file() and (folder / "weights" / "model_index.json").is_file():
            info = json.loads(done.read_text())
            if same_settings(info, run):
                print(f"run {k}: {folder} already holds it, kept")
                init = folder / "weights"
                continue
        retrained = True
        print(f"run {k}: {run['unet_steps']} steps, batch {run['batch']}, into {folder}")
        info = train(folder, run["seed"], run["vae_steps"], run["unet_steps"], run["batch"], run["lr"],
                     device=device, workers=workers, log_every=log_every, init=init, warmup=run["warmup"],
                     ema_decay=run["ema_decay"], partial_captions=setting(run, "partial_captions"))
        init = folder / "weights"
    return info


@dataclass
class _Device:
    """Where a run trains: the device, its autocast settings and the run's one random generator."""

    dev: torch.device
    gen: torch.Generator
    amp: dict

    @classmethod
    def make(cls, device: str | None, seed: int) -> _Device:
        dev = choose_device(device)
        amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
        return cls(dev, torch.Generator(dev).manual_seed(seed), amp)

    def pixels(self, params: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        """Rendered scenes in [-1, 1] on the device."""
        return render_packed(params.to(self.dev), colors.to(self.dev), model.RESOLUTION) * 2 - 1

    def name(self) -> str:
        return torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else _cpu_name()


def _train_autoencoder(vae, steps: int, batch: int, workers: int, on: _Device, log: LossLog) -> None:
    """Phase 1: the autoencoder (reconstruction + a whisper of KL, as in latent diffusion)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    data = _loader(batch, workers, offset=10**8)
    for step in range(1, steps + 1):
        params, colors, _ = next(data)
        x = on.pixels(params, colors)
        with torch.autocast(**on.amp):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(on.gen)).sample.float()
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.add("vae", step, loss)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def _calibrate_latents(vae, batch: int, on: _Device) -> float:
    """Scale latents to unit variance, as Stable Diffusion's scaling_factor does; returns the reconstruction MSE."""
    params, colors, _ = _Batches(min(1024, 16 * batch), 2 * 10**8)[0]
    x = on.pixels(params, colors)
    z = vae.encode(x).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / z.float().std()))
    return float(F.mse_loss(vae.decode(z).sample.clamp(-1, 1), x))


def _train_denoiser(models: dict[str, torch.nn.Module], steps: int, batch: int, lr: float, warmup: int,
                    ema_decay: float, parent: dict | None, deadline: float, workers: int, on: _Device,
                    log: LossLog, partial_captions: float = 0.0, checkpoint_every: int = 0,
                    work_dir: Path | None = None) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """Phase 2 on the training core: UNet + text encoder, epsilon loss, 10% caption dropout, EMA. Returns both
    models holding their EMA weights and the steps done (fewer than ``steps`` when the deadline passes). With
    ``checkpoint_every`` the core checkpoints into ``work_dir`` and resumes from its newest checkpoint."""
    vae, unet, text_encoder = models["vae"], models["unet"], models["text_encoder"]
    tokenizer, scheduler = model.build_tokenizer(), model.build_scheduler()
    sf = vae.config.scaling_factor
    alphas = scheduler.alphas_cumprod.to(on.dev)

    def loss(batch_: tuple, ctx: StepContext) -> torch.Tensor:
        params, colors, captions = batch_
        drop = torch.rand(len(captions), generator=ctx.generator, device=on.dev).cpu() < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        ids = tokenizer(
            captions, padding="max_length", max_length=model.MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids.to(on.dev)
        with torch.no_grad():
            x = on.pixels(params, colors)
            z = vae.encode(x).latent_dist.sample(ctx.generator).float() * sf
        noise = torch.randn(z.shape, generator=ctx.generator, device=on.dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],), generator=ctx.generator,
                          device=on.dev)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        emb = ctx.modules["text_encoder"](ids).last_hidden_state
        pred = ctx.modules["unet"](zt, t, emb).sample.float()
        return F.mse_loss(pred, noise)

    # A continuation reads the examples after those its parent saw, and its EMA keeps the decay from the start
    # (no warm-up ramp: the parent's weights are already averaged).
    offset = examples_seen(parent)

    def batches(position: int, rank: int, world: int):
        return _loader(batch, workers, offset=offset + position * batch, partial_captions=partial_captions)

    settings = TrainSettings(steps=steps, lr=lr, warmup=warmup, weight_decay=0.0, ema_decay=ema_decay,
                             ema_warmup=parent is None, mixed_precision="auto" if on.dev.type == "cuda" else "no",
                             gradient_checkpointing=False, log_every=log.every, device=on.dev.type,
                             checkpoint_every=checkpoint_every)
    identity = {"parent": parent, "data_offset": offset, "batch": batch, "partial_captions": partial_captions}
    result = Trainer(settings).fit({"unet": unet, "text_encoder": text_encoder}, loss, batches,
                                   work_dir if checkpoint_every else None, identity=identity, log=log, phase="unet",
                                   stop=lambda step: time.time() > deadline, generator=on.gen)
    return unet, text_encoder, result.steps


def train(
    out: Path,
    seed: int = 0,
    vae_steps: int = 1500,
    steps: int = 6000,
    batch: int = 256,
    lr: float = 4e-4,
    max_minutes: float | None = None,
    device: str | None = None,
    workers: int = 8,
    log_every: int = 50,
    init: Path | None = None,
    warmup: int = 300,
    ema_decay: float = 0.999,
    partial_captions: float = 0.0,
    checkpoint_every: int = 0,
) -> dict:
    """Train from scratch, or with ``init`` (a weights folder) continue phase 2 from it on fresh examples.

    ``partial_captions``: the fraction of two-shape scenes whose phase-2 caption names one of the shapes
    (:func:`grammar.training_prompt`); 0 trains on exhaustive captions, the stream every earlier run used.
    ``checkpoint_every`` (continuations only): checkpoint phase 2 into ``out/checkpoints`` every so many steps; a
    killed run started again with the same arguments resumes from the newest checkpoint (on the CPU, to the same
    weights as an uninterrupted run); the checkpoints are removed once the weights are saved.

    Writes ``out/weights``, ``out/loss.csv``, ``out/training.json`` and ``out/MODEL_CARD.md``; returns the record.
    """
    if not 0.0 <= partial_captions <= 1.0:
        raise InputError(f"--partial-captions {partial_captions}: give a fraction of scenes between 0 and 1")
    if checkpoint_every and init is None:
        raise InputError("--checkpoint-every needs --init: a run from scratch trains its autoencoder first, which "
                         "is not checkpointed")
    on = _Device.make(device, seed)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    parent = None
    if init is not None:
        models, parent = _load_init(Path(init))
        vae_steps = 0  # a continuation keeps its parent's autoencoder
    else:
        models = model.build_models(seed)
    models = {k: models[k].to(on.dev) for k in ("vae", "unet", "text_encoder")}
    vae = models["vae"]
    work_dir = out / "checkpoints"
    found = latest_checkpoint(work_dir) if checkpoint_every else None
    if found is not None:  # the loss log and the clock continue from the checkpoint
        state = json.loads((found / "state.json").read_text())
        log = LossLog.resume(out / "loss.csv", log_every, "unet", state["step"], state["loss_partial_sum"],
                             state["elapsed_s"])
        print(f"resuming from {found}", flush=True)
    else:
        log = LossLog(out / "loss.csv", log_every)
    deadline = log.t0 + max_minutes * 60 if max_minutes else math.inf
    try:
        _train_autoencoder(vae, vae_steps, batch, workers, on, log)
        recon_mse = _calibrate_latents(vae, batch, on) if parent is None else parent["vae_recon_mse"]
        vae_seconds = time.time() - log.t0
        ema_unet, ema_text, done = _train_denoiser(models, steps, batch, lr, warmup, ema_decay, parent, deadline,
                                                   workers, on, log, partial_captions, checkpoint_every,
                                                   work_dir)
    finally:
        log.close()
    total = time.time() - log.t0
    model.save_pipeline(out / "weights", vae.cpu(), ema_unet.cpu(), ema_text.cpu())
    if checkpoint_every:
        shutil.rmtree(work_dir, ignore_errors=True)
    info = {
        "seed": seed,
        "vae_steps": vae_steps,
        "unet_steps": done,
        "unet_steps_requested": steps,
        "batch": batch,
        "lr": lr,
        "warmup": warmup,
        "ema_decay": ema_decay,
        "caption_dropout": CAPTION_DROPOUT,
        "partial_captions": partial_captions,
        "resumed_from_step": int(state["step"]) if found is not None else None,
        "max_minutes": max_minutes,
        "vae_scaling_factor": vae.config.scaling_factor,
        "vae_recon_mse": recon_mse,
        "seconds_vae": round(vae_seconds, 1),
        "seconds_total": round(total, 1),
        "device": on.name(),
        "torch": torch.__version__,
        "precision": "bf16 autocast" if on.amp["enabled"] else "fp32",
        "parameters": model.parameter_counts(models),
        "configs": {
            "vae": model.VAE_CONFIG,
            "unet": model.UNET_CONFIG,
            "text_encoder": model.TEXT_CONFIG,
            "scheduler": model.SCHEDULER_CONFIG,
        },
        "data": "training split rendered on the fly: index i -> grammar.training_example(i), categories cycling"
                + (f"; {partial_captions:g} of binding and relation scenes captioned partially (one of their two"
                   " shapes named)" if partial_captions else ""),
        "data_offset": examples_seen(parent),
        "init": parent,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(info))  # evaluation: python -m diffprobe.worlds.shapes.evaluate
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("shapes-model"), help="output folder (weights/, loss.csv, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=6000, help="UNet + text-encoder steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--max-minutes", type=float, default=None, help="stop phase 2 early; training.json says where")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers that lay out scenes")
    p.add_argument("--warmup", type=int, default=300, help="learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    p.add_argument("--partial-captions", type=float, default=0.0, metavar="FRACTION",
                   help="fraction of two-shape scenes (binding, relation) captioned with one of their shapes only")
    p.add_argument("--log-every", type=int, default=50, metavar="STEPS", help="steps per loss.csv row")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="with --init: checkpoint phase 2 into OUT/checkpoints; the same command resumes a killed run")
    p.add_argument("--init", type=Path, default=None,
                   help="continue phase 2 from this weights folder (training.json beside it); phase 1 is skipped")
    p.add_argument("--replay", default=None, metavar="TRAINING_JSON",
                   help="train again every run recorded in this training.json (`shipped`: the shipped model's),"
                        " into OUT/run1, OUT/run2, ...; only --out, --device and --workers apply")
    a = p.parse_args(argv)
    if a.replay:
        if a.init:
            raise InputError("--replay and --init do not combine: the recorded chain says what each run starts from")
        path = Path(__file__).parent / "training.json" if a.replay == "shipped" else Path(a.replay)
        if not path.is_file():
            raise InputError(f"--replay {a.replay}: no such training record (give a training.json, or `shipped`)")
        info = replay(json.loads(path.read_text()), a.out, a.device, a.workers)
        runs = len(chain(info))
        print(f"replayed {runs} runs; the last run's weights: {a.out / f'run{runs}' / 'weights'}")
        return
    info = train(a.out, a.seed, a.vae_steps, a.steps, a.batch, a.lr, a.max_minutes, a.device, a.workers,
                 log_every=a.log_every, init=a.init, warmup=a.warmup, ema_decay=a.ema,
                 partial_captions=a.partial_captions, checkpoint_every=a.checkpoint_every)
    print(json.dumps({k: info[k] for k in ("unet_steps", "seconds_total", "vae_recon_mse", "device")}))


if __name__ == "__main__":
    exit_on_user_error(main)
