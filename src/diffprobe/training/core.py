"""The one training loop: trainable parameters of some modules + a loss over a batch -> trained modules.

It runs through accelerate (device placement, mixed precision, several GPUs), with AdamW, gradient-norm clipping, a
constant learning rate after an optional linear warm-up, gradient accumulation, an EMA of the trained parameters
(diffusers ``EMAModel``; the modules end holding the EMA copy), ``loss.csv`` and checkpoints from which a killed run
resumes exactly where the last checkpoint left it (on the CPU: bit for bit the weights of an uninterrupted run).

What trains is every parameter with ``requires_grad`` of the modules given; everything else is left untouched::

    trainer = Trainer(TrainSettings(steps=1000, lr=1e-4, checkpoint_every=200))
    unet.to(trainer.device)
    result = trainer.fit({"unet": unet}, loss_fn, batches, work_dir)

``loss_fn(batch, ctx)`` returns the scalar loss of one micro-batch; it calls the modules through ``ctx.modules``
(wrapped for several GPUs) and draws its randomness from ``ctx.generator`` (checkpointed). ``batches(position,
rank, world)`` returns an iterator over this process's micro-batches from ``position`` on; the micro-batch a process
reads at position ``i`` is number ``i * world + rank`` of the data order, so resuming needs nothing but the position.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import locks
from ..errors import InputError, cannot_write
from .log import LossLog

CHECKPOINT_PREFIX = "checkpoint-"
SETTINGS_FILE = "training_settings.json"
LOCK_FILE = "train.lock"  # held by the one trainer of a folder

Batches = Callable[[int, int, int], Iterator[Any]]


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights, besides the model, the data and the loss."""

    steps: int
    lr: float
    accumulation: int = 1  # micro-batches per optimisation step
    warmup: int = 0  # linear learning-rate warm-up steps (0: constant from the first step)
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: no clipping
    ema_decay: float | None = 0.9999  # None: no EMA (the modules end with the raw weights)
    ema_warmup: bool = True  # diffusers' ramp min(decay, (1 + t) / (10 + t)); False: the decay from the start
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, else fp16 on CUDA without bf16; fp32 on CPU), no, fp16, bf16
    gradient_checkpointing: bool | None = None  # None: on CUDA only
    checkpoint_every: int = 0  # 0: no checkpoints
    keep_checkpoints: int = 1  # the newest N are kept
    log_every: int = 10
    seed: int = 0
    device: str | None = None  # None: what accelerate chooses (the GPU of this process, else the CPU)

    def __post_init__(self) -> None:
        checks = [(self.steps >= 1, "steps must be at least 1"), (self.lr > 0, "the learning rate must be > 0"),
                  (self.accumulation >= 1, "gradient accumulation must be at least 1"),
                  (self.warmup >= 0, "warm-up steps cannot be negative"),
                  (self.checkpoint_every >= 0, "checkpoint_every cannot be negative"),
                  (self.keep_checkpoints >= 1, "keep at least one checkpoint"),
                  (self.log_every >= 1, "log_every must be at least 1"),
                  (self.ema_decay is None or 0 < self.ema_decay < 1, "the EMA decay must lie in (0, 1)"),
                  (self.mixed_precision in ("auto", "no", "fp16", "bf16"),
                   "mixed precision must be auto, no, fp16 or bf16")]
        for ok, text in checks:
            if not ok:
                raise InputError(text)

    def record(self) -> dict[str, Any]:
        """The settings as JSON (the device is a property of the machine, not of the run)."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        out.pop("device")
        return out


@dataclass
class StepContext:
    """What a loss function may use: the (wrapped) modules, the run's generator, the device, the step."""

    modules: dict[str, torch.nn.Module]
    generator: torch.Generator
    device: torch.device
    step: int = 0


@dataclass
class FitResult:
    steps: int  # optimisation steps done in total (including those before a resume)
    resumed_from: int | None  # the checkpoint step this call started from, None for a fresh start
    stopped: bool  # the stop hook ended the run before ``settings.steps``
    seconds: float
    trainable_parameters: int
    history: list[float] = field(default_factory=list)  # mean loss of every optimisation step of this call


def _precision(requested: str, device: torch.device) -> str:
    if device.type != "cuda":
        if requested in ("fp16", "bf16"):
            raise InputError(f"mixed precision {requested} needs a CUDA device; this run trains on {device} "
                             "(use --mixed-precision no, or train on a GPU)")
        return "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


class Trainer:
    """Holds the accelerator (create it first: its ``device`` is where the models go), then ``fit`` trains."""

    def __init__(self, settings: TrainSettings):
        from accelerate import Accelerator

        self.settings = settings
        name = str(settings.device or "auto")
        if name not in ("auto", "cpu", "mps") and not name.startswith("cuda"):
            raise InputError(f"device {name!r}: training runs on cpu, cuda or mps (several GPUs: one process per "
                             "GPU with `accelerate launch`)")
        cpu = name == "cpu" or (name == "auto" and not torch.cuda.is_available()
                                and not torch.backends.mps.is_available())
        probe = torch.device("cpu" if cpu else "cuda" if torch.cuda.is_available() else "mps")
        self.precision = _precision(settings.mixed_precision, probe)
        _forget_other_accelerator(cpu, self.precision)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=self.precision)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process

    def fit(
        self,
        modules: dict[str, torch.nn.Module],
        loss_fn: Callable[[Any, StepContext], torch.Tensor],
        batches: Batches,
        work_dir: Path | None,
        *,
        identity: dict[str, Any] | None = None,
        log: LossLog | None = None,
        phase: str = "train",
        stop: Callable[[int], bool] | None = None,
        generator: torch.Generator | None = None,
    ) -> FitResult:
        """Train, resuming from the newest checkpoint in ``work_dir`` when there is one.

        ``identity`` (model, data, selection: JSON) is stored beside the settings; a resume with other settings or
        another identity is refused. ``log`` receives every step's loss (default: ``work_dir/loss.csv``).
        ``stop(step)`` is asked after each optimisation step; True ends the run there (a deadline, or a test's
        simulated kill). ``generator`` is the run's random generator (default: one on the device seeded with
        ``settings.seed`` + the process index).
        """
        lock = _take_work_lock(Path(work_dir)) if work_dir is not None and self.is_main else None
        try:
            return self._fit(modules, loss_fn, batches, work_dir, identity, log, phase, stop, generator)
        finally:
            if lock is not None:
                lock.close()

    def _fit(self, modules, loss_fn, batches, work_dir, identity, log, phase, stop, generator) -> FitResult:
        import time

        from diffusers.training_utils import EMAModel

        s, acc = self.settings, self.accelerator
        named = [(f"{m}.{n}", p) for m, module in modules.items() for n, p in module.named_parameters()
                 if p.requires_grad]
        if not named:
            raise InputError("nothing to train: no parameter of the selected modules requires a gradient")
        params = [p for _, p in named]
        if s.gradient_checkpointing if s.gradient_checkpointing is not None else self.device.type == "cuda":
            for module in modules.values():
                _enable_gradient_checkpointing(module)
        optimizer = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
        warmup = s.warmup
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        ema = None
        if s.ema_decay is not None:
            # With ema_warmup off the decay is constant: min_decay = decay.
            ema = EMAModel(params, decay=s.ema_decay, min_decay=0.0 if s.ema_warmup else s.ema_decay)
            ema.to(self.device)
        names = list(modules)
        prepared = acc.prepare(*modules.values(), optimizer)
        prepared = prepared if isinstance(prepared, tuple | list) else (prepared,)
        wrapped, optimizer = dict(zip(names, prepared[:-1], strict=True)), prepared[-1]
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(s.seed + acc.process_index)
        ctx = StepContext(wrapped, generator, self.device)

        start, state = 0, None
        if work_dir is not None:
            work_dir = Path(work_dir)
            _check_settings(work_dir, s, identity or {}, self.is_main)
            found = latest_checkpoint(work_dir)
            if found is not None:
                state = _load_checkpoint(found, named, ema, optimizer, schedule, generator, acc)
                start = state["step"]
        own_log = log is None and work_dir is not None and self.is_main
        if own_log:
            path = work_dir / "loss.csv"
            log = (LossLog.resume(path, s.log_every, phase, start, state["loss_partial_sum"], state["elapsed_s"])
                   if state else LossLog(path, s.log_every))
        elif log is not None and state is not None:
            log.running = state["loss_partial_sum"]
        t0 = time.time()
        data = batches(start * s.accumulation, acc.process_index, acc.num_processes)
        history: list[float] = []
        step, stopped = start, False
        try:
            for step in range(start + 1, s.steps + 1):
                ctx.step = step
                total = torch.zeros((), device=self.device)
                for micro in range(s.accumulation):
                    batch = next(data)
                    last = micro == s.accumulation - 1
                    sync = nullcontext() if last or acc.num_processes == 1 else _no_sync(acc, wrapped)
                    with sync:
                        with acc.autocast():
                            loss = loss_fn(batch, ctx).float()
                        acc.backward(loss / s.accumulation)
                    total += loss.detach() / s.accumulation
                if s.max_grad_norm is not None:
                    acc.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(params)
                history.append(total)
                if log is not None:
                    log.add(phase, step, total)
                if work_dir is not None and s.checkpoint_every and step % s.checkpoint_every == 0:
                    _save_checkpoint(work_dir, step, named, ema, optimizer, schedule, generator, acc,
                                     log.partial_sum() if log is not None else 0.0,
                                     log.elapsed() if log is not None else 0.0, s.keep_checkpoints)
                if stop is not None and stop(step) and step < s.steps:
                    stopped = True
                    break
        finally:
            if own_log:
                log.close()
        acc.wait_for_everyone()
        if ema is not None:  # also after a stop: a deadline's partial run is saved as its EMA
            ema.copy_to(params)
        return FitResult(step, start if state else None, stopped, time.time() - t0, sum(p.numel() for p in params),
                         [float(x) for x in history])


def _forget_other_accelerator(cpu: bool, precision: str) -> None:
    """accelerate keeps one state per process and refuses another device or precision; a process that trains
    twice (a test suite, a notebook) with other settings starts a fresh one. Launched runs (several processes)
    keep theirs."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if not state or PartialState().num_processes > 1:
        return
    device = state.get("device")
    if state.get("_mixed_precision") != precision or (cpu and getattr(device, "type", "cpu") != "cpu"):
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own reset between trainings


def _enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
        module.enable_gradient_checkpointing()
    elif hasattr(module, "gradient_checkpointing_enable"):  # transformers models
        module.gradient_checkpointing_enable()


def _no_sync(acc, wrapped: dict[str, torch.nn.Module]):
    from contextlib import ExitStack

    stack = ExitStack()
    for module in wrapped.values():
        stack.enter_context(acc.no_sync(module))
    return stack


# --- checkpoints --------------------------------------------------------------------------------------------


def checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``work_dir``, oldest first (a checkpoint is complete once its folder is renamed)."""
    found = []
    for p in Path(work_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        tail = p.name.removeprefix(CHECKPOINT_PREFIX)
        if p.is_dir() and tail.isdigit() and (p / "state.json").is_file():
            found.append((int(tail), p))
    return sorted(found)


def latest_checkpoint(work_dir: Path) -> Path | None:
    found = checkpoints(work_dir)
    return found[-1][1] if found else None


# Settings a resumed run may change: they decide when checkpoints are written, not what is trained.
RESUME_MAY_CHANGE = ("checkpoint_every", "keep_checkpoints")


def _take_work_lock(work_dir: Path):
    """Two trainers in one folder would overwrite each other's checkpoints: the second is refused."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        return locks.take(work_dir / LOCK_FILE, f"another process is training in {work_dir}; wait for it to "
                                                "finish, or train into another folder")
    except OSError as err:
        raise cannot_write(work_dir, err.strerror or str(err)) from None


def _check_settings(work_dir: Path, s: TrainSettings, identity: dict[str, Any], is_main: bool) -> None:
    settings = {k: v for k, v in s.record().items() if k not in RESUME_MAY_CHANGE}
    record = {"settings": settings, "identity": identity}
    file = work_dir / SETTINGS_FILE
    if file.is_file():
        old = json.loads(file.read_text())
        if old != json.loads(json.dumps(record)):
            diffs = _differences(old, record)
            raise InputError(f"{work_dir} holds a run with other settings ({'; '.join(diffs[:6])}); resume it with "
                             "the same settings, or start afresh in another folder (or delete this one)")
        return
    if is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _differences(old: dict, new: dict) -> list[str]:
    from ..spec import flatten

    a, b = flatten(old), flatten(json.loads(json.dumps(new)))
    return [f"{k}: {a.get(k)!r} (stored) != {b.get(k)!r} (now)" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def _save_checkpoint(work_dir: Path, step: int, named, ema, optimizer, schedule, generator, acc,
                     loss_partial_sum: float, elapsed: float, keep: int) -> None:
    from safetensors.torch import save_file

    final = work_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = work_dir / f".{CHECKPOINT_PREFIX}{step}.partial"
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / f"rng-{acc.process_index}.safetensors"))
    if acc.is_main_process:
        save_file({n: p.detach().cpu().contiguous() for n, p in named}, str(tmp / "trainable.safetensors"))
        meta = {"step": step, "loss_partial_sum": loss_partial_sum, "elapsed_s": elapsed,
                "parameters": [n for n, _ in named]}
        if ema is not None:
            state = ema.state_dict()
            shadow = state.pop("shadow_params")
            save_file({n: t.detach().cpu().contiguous() for (n, _), t in zip(named, shadow, strict=True)},
                      str(tmp / "ema.safetensors"))
            meta["ema"] = state
        opt = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
        if acc.scaler is not None:
            opt["scaler"] = acc.scaler.state_dict()
        torch.save(opt, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in checkpoints(work_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _load_checkpoint(folder: Path, named, ema, optimizer, schedule, generator, acc) -> dict[str, Any]:
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    if meta["parameters"] != [n for n, _ in named]:
        raise InputError(f"{folder} was saved for other trainable parameters ({len(meta['parameters'])} tensors, "
                         f"now {len(named)}); resume with the same selection, or start afresh in another folder")
    weights = load_file(str(folder / "trainable.safetensors"))
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n])
    if ema is not None:
        shadow = load_file(str(folder / "ema.safetensors"))
        ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[n] for n, _ in named]})
        ema.to(acc.device)
    opt = torch.load(folder / "optimizer.pt", map_location=acc.device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    schedule.load_state_dict(opt["schedule"])
    if acc.scaler is not None and "scaler" in opt:
        acc.scaler.load_state_dict(opt["scaler"])
    rng_file = folder / f"rng-{acc.process_index}.safetensors"
    if not rng_file.is_file():
        raise InputError(f"{folder} has no random state for process {acc.process_index}; resume with as many "
                         "processes as the run had")
    rng = load_file(str(rng_file))
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return meta
