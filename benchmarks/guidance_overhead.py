"""Time per image of S-CFG and concept guidance relative to CFG, same model, seeds and settings.

    python benchmarks/guidance_overhead.py                      # the shapes model, CPU
    python benchmarks/guidance_overhead.py --model tiny         # tiny random SD checkpoint
    python benchmarks/guidance_overhead.py --model sd15-random  # full-size SD 1.5 architecture, random weights
    python benchmarks/guidance_overhead.py --model PATH_OR_HUB_ID --size 512 --dtype float16

Arms: CFG; S-CFG (attention capture at latent/4 and latent/8 included); concept guidance with n = 2 user concepts,
all n + 2 branches in one batched model call; and the same concept guidance run branch by branch, one model call per
(image, branch) as the reference implementation does. The denoising loop is timed (no VAE decode unless --decode);
arms alternate and the median over repeats is reported. The branch-by-branch arm must reproduce the batched arm's
latents (up to kernel rounding): the script prints the largest difference. It also counts, per denoising step, the
aten operations each arm dispatches and how many of them read a value held on the sampling device back on the host
(on a CPU run: every read, host-side tables included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diffprobe.guidance import CFG
from diffprobe.guidance.concept import ConceptGuidance
from diffprobe.guidance.scfg import SCFG
from diffprobe.sampling import sample
from diffprobe.sampling.ops import count_ops, dispatched, host_reads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_HELP, load_benchmark_model, sync  # noqa: E402  (the benchmarks' shared helpers)

CONCEPTS = "a red circle; a blue square"
PROMPT = "a red circle above a blue square"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help=MODEL_HELP)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--decode", action="store_true", help="include VAE decoding in the timed loop")
    parser.add_argument("--skip-branchwise", action="store_true", help="leave out the slow branch-by-branch arm")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared CPU; use with --threads 1)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    with tempfile.TemporaryDirectory() as tmp:
        adapter = load_benchmark_model(args.model, Path(tmp), args.device, args.dtype, light_vae=True)
    size = args.size or adapter.default_size[0]
    prompts = [PROMPT] * args.batch
    seeds = list(range(args.batch))
    arms: dict[str, tuple[Any, Any]] = {
        "cfg": (None, lambda: CFG(7.5)),
        "scfg": (None, lambda: SCFG(7.5)),
        "concept (n=2, batched)": (None, lambda: ConceptGuidance(7.5, concepts=CONCEPTS)),
    }
    if not args.skip_branchwise:  # one denoiser call per image and branch, as the reference code
        arms["concept (n=2, branch-by-branch)"] = (1, lambda: ConceptGuidance(7.5, concepts=CONCEPTS))

    def run(name: str, steps: int = args.steps) -> torch.Tensor:
        rows, make = arms[name]
        settings = {"steps": steps, "height": size, "width": size, "decode": args.decode, "max_model_batch": rows}
        return sample(adapter, make(), prompts, seeds, **settings).latents

    for name in arms:  # warm-up
        run(name)
    # Dispatched aten operations and host reads per step (two steps minus one): what a guider adds to the launch
    # queue, and whether it stalls it. The one-step latents also check batched against one call per row: equal up
    # to kernel rounding (over many steps the guider's hard thresholds and quantile masks can amplify that rounding,
    # so whole trajectories are not compared).
    latents: dict[str, torch.Tensor] = {}
    per_step: dict[str, tuple[int, int]] = {}
    for name in arms:
        counted = []
        for steps in (1, 2):
            with count_ops() as ops:
                out = run(name, steps)
            counted.append((dispatched(ops), host_reads(ops, adapter.device)))
            if steps == 1:
                latents[name] = out
        per_step[name] = (counted[1][0] - counted[0][0], counted[1][1] - counted[0][1])
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name in arms:
            sync(adapter.device)
            t0 = clock()
            run(name)
            sync(adapter.device)
            times[name].append((clock() - t0) / args.batch)

    med = {k: statistics.median(v) for k, v in times.items()}
    device = (
        torch.cuda.get_device_name() if adapter.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"model={args.model} device={device} dtype={adapter.dtype} size={size} steps={args.steps} "
        f"batch={args.batch} repeats={args.repeats} decode={args.decode} clock={args.clock}"
    )
    print(f"{'arm':32s} {'ms/image':>9s}  {'x CFG':>6s}  {'ops/step':>8s}  {'host reads/step':>15s}")
    for name, value in med.items():
        ops, reads = per_step[name]
        print(f"{name:32s} {value * 1000:9.1f}  {value / med['cfg']:6.3f}  {ops:8d}  {reads:15d}")
    print("targets: S-CFG <= 1.10 x CFG; batched concept guidance faster than branch-by-branch")
    if "concept (n=2, branch-by-branch)" in latents:
        a, b = latents["concept (n=2, batched)"], latents["concept (n=2, branch-by-branch)"]
        print(f"batched vs branch-by-branch concept guidance, one step: max |latent diff| = {(a - b).abs().max():.2e}")
        print(
            f"branch-by-branch / batched = {med['concept (n=2, branch-by-branch)'] / med['concept (n=2, batched)']:.2f}"
        )


if __name__ == "__main__":
    main()
