"""Time per optimisation step and peak memory of Q/K-only fine-tuning against full fine-tuning, same model and batch.

    python benchmarks/finetune_speed.py                        # SD 1.x layout at width 32..128, 256 px, CPU
    python benchmarks/finetune_speed.py --model tiny           # the tiny random SD checkpoint
    python benchmarks/finetune_speed.py --model PATH_OR_HUB_ID --device cuda --size 512

Each arm runs in a fresh process (so one arm's memory never counts for the other) through the training core with
the fine-tuning loss (``diffprobe.finetune.diffusion_loss``: VAE encoding, text encoding, one denoiser forward and
backward), AdamW, clipping and the EMA; the first ``--warmup`` steps are not timed. Memory: on the CPU the process's
peak resident set during training minus its resident set once the model is loaded (``resource``, ``/proc``); on a
GPU ``torch.cuda.max_memory_allocated`` during training minus the allocation before it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sync  # noqa: E402  (the benchmarks' shared helpers)

MODEL_HELP = "sd-small (SD 1.x layout, channels 32-128, in memory), tiny, or a checkpoint folder / hub id"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _load(model: str, tmp: Path, device: torch.device):
    from diffprobe.models import SDAdapter, load_model
    from diffprobe.models.tiny import build_tiny_sd, sd_shaped_random_pipeline

    if model == "sd-small":
        return SDAdapter(sd_shaped_random_pipeline(tmp, device=device), "sd-small", "sd", {})
    if model == "tiny":
        model = str(build_tiny_sd(tmp / "tiny"))
    return load_model(model, device=device, dtype="fp32")


def run_arm(arm: str, args: argparse.Namespace, queue) -> None:
    from diffprobe.finetune import diffusion_loss, noise_scheduler_of, select
    from diffprobe.finetune.layers import mark_trainable
    from diffprobe.training import Trainer, TrainSettings

    torch.set_num_threads(args.threads)
    settings = TrainSettings(steps=args.warmup + args.steps, lr=1e-5, log_every=10**6,
                             mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                             device=args.device)
    trainer = Trainer(settings)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = _load(args.model, Path(tmp), trainer.device)
        denoiser = adapter.denoiser
        for module in (adapter.vae, adapter.pipe.text_encoder):
            module.requires_grad_(False)
        if arm == "full":
            denoiser.requires_grad_(True)
        else:
            mark_trainable(denoiser, select(denoiser))
        size = args.size or adapter.default_size[0]
        gen = torch.Generator().manual_seed(0)
        pixels = (torch.rand(args.batch, 3, size, size, generator=gen) * 2 - 1).to(trainer.device)
        texts = [f"{i + 2} red circles on a white background" for i in range(args.batch)]
        scheduler = noise_scheduler_of(adapter)
        is_cuda = trainer.device.type == "cuda"
        if is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if is_cuda else _rss_bytes()
        times: list[float] = []

        def tick(step: int) -> bool:
            sync(trainer.device)
            times.append(time.perf_counter())
            return False

        def loss(batch, ctx):
            return diffusion_loss(adapter, scheduler, batch, texts, ctx.generator, denoiser=ctx.modules["denoiser"])

        def batches(position, rank, world):
            while True:
                yield pixels

        denoiser.train()
        result = trainer.fit({"denoiser": denoiser}, loss, batches, None, stop=tick)
        peak = (torch.cuda.max_memory_allocated() if is_cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux
        # times[i] is the end of step i + 1: the timed steps are warmup + 1 .. warmup + steps
        step_times = [b - a for a, b in zip(times[args.warmup - 1:], times[args.warmup:], strict=False)]
        queue.put({"arm": arm, "trainable": result.trainable_parameters,
                   "total": sum(p.numel() for p in denoiser.parameters()), "size": size,
                   "device": str(trainer.device), "median_s": statistics.median(step_times),
                   "memory_bytes": peak - base, "memory_kind": "CUDA allocated" if is_cuda else "resident set"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd-small", help=MODEL_HELP)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimisation steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    ctx = mp.get_context("spawn")
    rows = {}
    for arm in ("qk", "full"):
        queue = ctx.Queue()
        proc = ctx.Process(target=run_arm, args=(arm, args, queue))
        proc.start()
        rows[arm] = queue.get()
        proc.join()
    qk, full = rows["qk"], rows["full"]
    print(f"model {args.model}, {qk['size']} px, batch {args.batch}, device {qk['device']}, "
          f"{args.steps} timed steps after {args.warmup}; memory: {qk['memory_kind']} during training")
    print(f"{'arm':<6}{'trainable':>14}{'of':>14}{'s/step':>10}{'memory MiB':>12}")
    for arm, r in rows.items():
        print(f"{arm:<6}{r['trainable']:>14,}{r['total']:>14,}{r['median_s']:>10.3f}{r['memory_bytes'] / 2**20:>12.1f}")
    print(f"ratio full / qk: time {full['median_s'] / qk['median_s']:.2f}x, "
          f"memory {full['memory_bytes'] / max(qk['memory_bytes'], 1):.2f}x, "
          f"trainable parameters {full['trainable'] / qk['trainable']:.1f}x")


if __name__ == "__main__":
    main()
