"""Images per second of the Ray backend against the local backend, same model, jobs and settings, in one run.

    python benchmarks/ray_scaling.py                               # shapes model, CPU: local, Ray 1 and 2 workers
    python benchmarks/ray_scaling.py --images 64 --steps 20 --workers 1,2,4
    python benchmarks/ray_scaling.py --gpus-per-worker 1 --workers 1,2   # one actor per GPU

Every arm generates the same prompt x seed grid into a fresh run directory (local: in this process with one torch
thread; Ray: each actor with one thread and, with --gpus-per-worker, its GPUs). Rates count sampling only (from the
first batch to the last stored image); actor start-up (model loading) is reported apart. Ray's overhead per batch
is the extra wall time of the 1-worker arm over the local arm, divided by the batches; an empty-batch round trip
(a worker that returns at once) is timed too. Each arm checks that its images equal the local arm's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from diffprobe.distributed import LocalBackend
from diffprobe.distributed.raypool import RayBackend
from diffprobe.generate import generate
from diffprobe.spec import GuidanceSpec, ModelSpec, RunSpec, SamplerSpec
from diffprobe.store import open_run

PROMPTS = ["two red circles", "one blue square", "a green triangle left of a red circle", "three yellow squares"]


class Echo:
    """A worker that does nothing: what a batch costs Ray itself."""

    def setup(self) -> None:
        return None

    def run(self, batch: list[int]) -> list[int]:
        return batch


def images(run: Path) -> dict[tuple[str, int], str]:
    with open_run(run) as store:
        return {(s.prompt, s.seed): s.image_sha256 for s in store.samples()}


def round_trip(workers: int, batches: int = 200) -> float:
    """Seconds per empty batch through the pool (its start excluded)."""
    pool = RayBackend(workers=workers, threads_per_worker=1).start(Echo())
    try:
        start = time.perf_counter()
        for _ in pool.imap_unordered([[i] for i in range(batches)]):
            pass
        return (time.perf_counter() - start) / batches
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--images", type=int, default=32, help="jobs per arm (prompts x seeds)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to time")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    seeds = list(range(-(-args.images // len(PROMPTS))))
    device = "cuda" if args.gpus_per_worker else "cpu"
    spec = RunSpec(model=ModelSpec(name=args.model, device=device), prompts=PROMPTS, seeds=seeds,
                   sampler=SamplerSpec(steps=args.steps), guidance=GuidanceSpec())
    jobs = len(PROMPTS) * len(seeds)
    batches = -(-len(seeds) // args.batch_size) * len(PROMPTS)
    torch.set_num_threads(1)
    gpus = int(max(counts) * args.gpus_per_worker + 0.999) or None
    ray.init(num_cpus=max(counts), num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             logging_level="warning", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    print(f"{args.model}, {jobs} images, {args.steps} steps, batch size {args.batch_size} ({batches} batches), "
          f"device {device}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = generate(spec, root / "local", batch_size=args.batch_size, progress=False, backend=LocalBackend())
        reference = images(root / "local")
        base = local.images_per_second
        print(f"local           {base:7.2f} images/s  (1.00x)")
        one_worker_seconds = None
        for n in counts:
            backend = RayBackend(workers=n, gpus_per_worker=args.gpus_per_worker, threads_per_worker=1)
            start = time.perf_counter()
            result = generate(spec, root / f"ray{n}", batch_size=args.batch_size, progress=False, backend=backend)
            startup = time.perf_counter() - start - result.seconds
            same = images(root / f"ray{n}") == reference
            if n == 1:
                one_worker_seconds = result.seconds
            print(f"ray {n} worker(s) {result.images_per_second:7.2f} images/s  "
                  f"({result.images_per_second / base:.2f}x local; start-up {startup:.1f} s; "
                  f"images identical to local: {same})")
        if one_worker_seconds is not None:
            print(f"ray overhead per batch (1 worker vs local): "
                  f"{(one_worker_seconds - local.seconds) / batches * 1000:.1f} ms")
        print(f"ray empty-batch round trip (1 worker): {round_trip(1) * 1000:.2f} ms")
    ray.shutdown()


if __name__ == "__main__":
    main()
