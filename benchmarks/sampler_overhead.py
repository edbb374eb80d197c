"""Time per image of diffprobe's sampling loop relative to the diffusers pipeline, same model and settings.

    python benchmarks/sampler_overhead.py                      # tiny random SD checkpoint, CPU
    python benchmarks/sampler_overhead.py --model sd15-random  # full-size SD 1.5 architecture, random weights
    python benchmarks/sampler_overhead.py --model PATH_OR_HUB_ID

Both runs start from the same initial latents, use CFG 7.5, the checkpoint's scheduler, and decode to PIL images.
Runs alternate (ours, theirs, ours, ...) and the median per-image time of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from diffprobe.guidance import CFG
from diffprobe.sampling import initial_latents, sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_HELP, load_benchmark_model, sync  # noqa: E402  (the benchmarks' shared helpers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help=MODEL_HELP)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        adapter = load_benchmark_model(args.model, Path(tmp), args.device, args.dtype)
        size = args.size or adapter.default_size[0]
        prompts = [f"a photo of object number {i}" for i in range(args.batch)]
        seeds = list(range(args.batch))
        start = initial_latents(adapter, seeds, size, size)
        guider = CFG(7.5)

        def ours(decode: bool = True):
            return sample(adapter, guider, prompts, seeds, steps=args.steps, height=size, width=size, decode=decode)

        def theirs(output_type: str = "pil"):
            return adapter.pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                latents=start.clone(),
                height=size,
                width=size,
                output_type=output_type,
            )

        ours(), theirs()  # warm-up (kernels, allocator)
        times: dict[str, list[float]] = {"diffprobe": [], "diffusers": []}
        for _ in range(args.repeats):
            for name, fn in (("diffprobe", ours), ("diffusers", theirs)):
                sync(adapter.device)
                t0 = time.perf_counter()
                fn()
                sync(adapter.device)
                times[name].append((time.perf_counter() - t0) / args.batch)

        # Same inputs, same numbers: the loops must agree, not only take the same time.
        mine, ref = ours(decode=False).latents, theirs("latent").images
        max_diff = (mine.float() - ref.float()).abs().max().item()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model={args.model} device={adapter.device} dtype={adapter.dtype} size={size} steps={args.steps} "
        f"batch={args.batch} repeats={args.repeats}"
    )
    for name, value in med.items():
        print(f"{name:10s} {value * 1000:9.1f} ms/image  (runs: {', '.join(f'{t * 1000:.1f}' for t in times[name])})")
    print(f"final latents: max |diffprobe - diffusers| = {max_diff:.2e}")
    print(f"ratio diffprobe/diffusers = {med['diffprobe'] / med['diffusers']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
