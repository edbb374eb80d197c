"""Train the shapes-world model from a seed: ``python -m diffprobe.worlds.shapes.train --out DIR``.

Phase 1 trains the KL autoencoder on rendered scenes; phase 2 trains the UNet and the text encoder jointly with the
epsilon-prediction loss, dropping 10% of captions so classifier-free guidance works, and keeps an EMA of both. Scenes
are rendered on the fly (scene layouts in DataLoader workers, pixels on the training device). Writes ``DIR/weights``
(a Stable-Diffusion-style diffusers folder), ``DIR/loss.csv`` and ``DIR/training.json``.
``--init`` continues a trained folder; ``--replay training.json`` trains a recorded chain of runs again.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import InputError, exit_on_user_error
from . import grammar, model
from .render import pack, render_packed

MAX_SHAPES = 6


class _Batches(torch.utils.data.Dataset):
    """Item ``i`` is the i-th training batch: packed scenes and captions of a contiguous index range."""

    def __init__(self, batch: int, offset: int = 0):
        self.batch, self.offset = batch, offset

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int):
        start = self.offset + i * self.batch
        examples = [grammar.training_example(j) for j in range(start, start + self.batch)]
        params, colors = pack([s for s, _ in examples], MAX_SHAPES)
        return params, colors, [c for _, c in examples]


def _log_loss(writer, log, phase: str, step: int, loss: float, t0: float) -> float:
    """One row of loss.csv and one progress line; returns the reset running sum."""
    writer.writerow([phase, step, f"{loss:.6f}", f"{time.time() - t0:.1f}"])
    log.flush()
    print(f"{phase} {step}: {loss:.5f} ({time.time() - t0:.0f}s)", flush=True)
    return 0.0


def _loader(batch: int, workers: int, offset: int = 0):
    return iter(
        torch.utils.data.DataLoader(
            _Batches(batch, offset),
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )
    )


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        e, p = list(ema.parameters()), list(live.parameters())
        torch._foreach_lerp_(e, p, 1 - decay)


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


def chain(record: dict) -> list[dict]:
    """The runs behind a training record, first run first (``--init`` links them)."""
    return (chain(record["init"]) if record.get("init") else []) + [record]


_REPLAYED = ("seed", "vae_steps", "unet_steps", "batch", "lr", "warmup", "ema_decay")


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
            if all(info.get(key) == run[key] for key in _REPLAYED):
                print(f"run {k}: {folder} already holds it, kept")
                init = folder / "weights"
                continue
        retrained = True
        print(f"run {k}: {run['unet_steps']} steps, batch {run['batch']}, into {folder}")
        info = train(folder, run["seed"], run["vae_steps"], run["unet_steps"], run["batch"], run["lr"],
                     device=device, workers=workers, log_every=log_every, init=init, warmup=run["warmup"],
                     ema_decay=run["ema_decay"])
        init = folder / "weights"
    return info


def _examples_seen(record: dict | None) -> int:
    """Training examples consumed by phase 2 over a chain of runs."""
    if record is None:
        return 0
    return _examples_seen(record.get("init")) + record["unet_steps"] * record["batch"]


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
) -> dict:
    """Train from scratch, or with ``init`` (a weights folder) continue phase 2 from it on fresh examples."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    parent = None
    if init is not None:
        models, parent = _load_init(Path(init))
        vae_steps = 0
    else:
        models = model.build_models(seed)
    vae, unet, text_encoder = (models[k].to(dev) for k in ("vae", "unet", "text_encoder"))
    tokenizer = model.build_tokenizer()
    scheduler = model.build_scheduler()
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    gen = torch.Generator(dev).manual_seed(seed)
    t0 = time.time()
    deadline = t0 + max_minutes * 60 if max_minutes else math.inf
    log = open(out / "loss.csv", "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["phase", "step", "loss", "elapsed_s"])

    # Phase 1: autoencoder (reconstruction + a whisper of KL, as in latent diffusion).
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    data = _loader(batch, workers, offset=10**8)
    running: torch.Tensor | float = 0.0
    for step in range(1, vae_steps + 1):
        params, colors, _ = next(data)
        x = render_packed(params.to(dev), colors.to(dev), model.RESOLUTION) * 2 - 1
        with torch.autocast(**amp):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(gen)).sample.float()
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.detach()  # read back only when logged: no GPU sync per step
        if step % log_every == 0:
            running = _log_loss(writer, log, "vae", step, float(running) / log_every, t0)
    vae.eval().requires_grad_(False)
    if parent is None:
        with torch.no_grad():  # scale latents to unit variance, as Stable Diffusion's scaling_factor does
            params, colors, _ = _Batches(min(1024, 16 * batch), 2 * 10**8)[0]
            x = render_packed(params.to(dev), colors.to(dev), model.RESOLUTION) * 2 - 1
            z = vae.encode(x).latent_dist.mode()
            vae.register_to_config(scaling_factor=float(1.0 / z.float().std()))
            recon_mse = float(F.mse_loss(vae.decode(z).sample.clamp(-1, 1), x))
    else:
        recon_mse = parent["vae_recon_mse"]
    sf = vae.config.scaling_factor
    vae_seconds = time.time() - t0

    # Phase 2: UNet + text encoder, epsilon loss, 10% caption dropout, EMA.
    trainable = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    alphas = scheduler.alphas_cumprod.to(dev)
    # A continuation reads the examples after those its parent saw, and its EMA starts from the parent's EMA.
    data = _loader(batch, workers, offset=_examples_seen(parent))
    done = 0
    running: torch.Tensor | float = 0.0
    for step in range(1, steps + 1):
        if time.time() > deadline:
            break
        params, colors, captions = next(data)
        drop = torch.rand(len(captions), generator=gen, device=dev).cpu() < 0.1
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        ids = tokenizer(
            captions, padding="max_length", max_length=model.MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids.to(dev)
        with torch.no_grad(), torch.autocast(**amp):
            x = render_packed(params.to(dev), colors.to(dev), model.RESOLUTION) * 2 - 1
            z = vae.encode(x).latent_dist.sample(gen).float() * sf
        noise = torch.randn(z.shape, generator=gen, device=dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],), generator=gen, device=dev)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        with torch.autocast(**amp):
            emb = text_encoder(ids).last_hidden_state
            pred = unet(zt, t, emb).sample.float()
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        decay = ema_decay if parent else min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        done = step
        running += loss.detach()  # read back only when logged: no GPU sync per step
        if step % log_every == 0:
            running = _log_loss(writer, log, "unet", step, float(running) / log_every, t0)
    log.close()
    total = time.time() - t0
    model.save_pipeline(out / "weights", vae.cpu(), ema_unet.cpu(), ema_text.cpu())
    info = {
        "seed": seed,
        "vae_steps": vae_steps,
        "unet_steps": done,
        "unet_steps_requested": steps,
        "batch": batch,
        "lr": lr,
        "warmup": warmup,
        "ema_decay": ema_decay,
        "caption_dropout": 0.1,
        "max_minutes": max_minutes,
        "vae_scaling_factor": sf,
        "vae_recon_mse": recon_mse,
        "seconds_vae": round(vae_seconds, 1),
        "seconds_total": round(total, 1),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "precision": "bf16 autocast" if amp["enabled"] else "fp32",
        "parameters": model.parameter_counts({"vae": vae, "unet": unet, "text_encoder": text_encoder}),
        "configs": {
            "vae": model.VAE_CONFIG,
            "unet": model.UNET_CONFIG,
            "text_encoder": model.TEXT_CONFIG,
            "scheduler": model.SCHEDULER_CONFIG,
        },
        "data": "training split rendered on the fly: index i -> grammar.training_example(i), categories cycling",
        "data_offset": _examples_seen(parent),
        "init": parent,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    from .evaluate import model_card

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
                 init=a.init, warmup=a.warmup, ema_decay=a.ema)
    print(json.dumps({k: info[k] for k in ("unet_steps", "seconds_total", "vae_recon_mse", "device")}))


if __name__ == "__main__":
    exit_on_user_error(main)
