"""Speed of the metrics on random features (no model involved).

(a) SCS for 100 prompts x 20 images (D = 512): the vectorised implementation vs a pure-Python pairwise loop,
    same process, same features; prints both times and the ratio, and checks that the values agree.
(b) IRS retrieval + estimate (IRS_alpha, IRS-inf and bounds) for N = 60,000 train, n = 10,000 queries,
    D = 1280 on CPU: wall time and peak resident memory.

Run: ``python benchmarks/metrics_speed.py`` (``--quick`` for smaller sizes).
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import numpy as np
import torch

from diffprobe.metrics.irs import irs_from_neighbors, nearest_neighbors
from diffprobe.metrics.scs import scs_per_prompt


def scs_python_loop(features: list[list[float]]) -> float:
    """The formula as a plain loop over pairs: mean of max(100 * cos, 0)."""
    total, pairs = 0.0, 0
    for i in range(len(features)):
        for j in range(i + 1, len(features)):
            a, b = features[i], features[j]
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            cos = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
            total += max(100.0 * cos, 0.0)
            pairs += 1
    return total / pairs


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_scs(prompts: int, reps: int, dim: int, repeat: int = 5) -> None:
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(prompts * reps, dim)) + 0.5).astype(np.float32)
    groups = {f"p{p}": list(range(p * reps, (p + 1) * reps)) for p in range(prompts)}
    scs_per_prompt(feats, groups)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fast = scs_per_prompt(feats, groups)
    t_fast = (time.perf_counter() - t0) / repeat
    as_lists = {g: feats[idx].astype(np.float64).tolist() for g, idx in groups.items()}
    t0 = time.perf_counter()
    slow = {g: scs_python_loop(rows) for g, rows in as_lists.items()}
    t_slow = time.perf_counter() - t0
    err = max(abs(fast[g] - slow[g]) for g in groups)
    print(f"(a) SCS, {prompts} prompts x {reps} images, D = {dim}")
    print(
        f"    vectorised: {t_fast * 1e3:.2f} ms   pure-Python pair loop: {t_slow * 1e3:.0f} ms   "
        f"ratio: {t_slow / t_fast:.0f}x   max |difference| = {err:.2e}"
    )


def bench_irs(n_train: int, n_query: int, dim: int) -> None:
    rng = np.random.default_rng(1)
    train = rng.standard_normal((n_train, dim), dtype=np.float32)  # float32 from the start: no float64 temporary
    queries = train[rng.integers(0, n_train, n_query)]
    queries += 0.1 * rng.standard_normal(queries.shape, dtype=np.float32)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    nn = nearest_neighbors(train, queries, device="cpu")
    t_nn = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = irs_from_neighbors(nn, n_train)
    t_est = time.perf_counter() - t1
    print(f"(b) IRS, N = {n_train:,}, n = {n_query:,}, D = {dim}, CPU ({torch.get_num_threads()} threads)")
    print(
        f"    retrieval {t_nn:.2f} s + estimate {t_est:.2f} s = {t_nn + t_est:.2f} s wall; peak RSS "
        f"{peak_rss_mib():.0f} MiB (features alone: {(train.nbytes + queries.nbytes) / 2**20:.0f} MiB; "
        f"peak before retrieval {base:.0f} MiB)"
    )
    print(
        f"    k = {result.k_measured}, IRS_inf = {result.irs_inf:.4f} [{result.irs_inf_l:.4f}, {result.irs_inf_u:.4f}]"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description="metrics speed")
    ap.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    args = ap.parse_args()
    if args.quick:
        bench_scs(20, 20, 512)
        bench_irs(6000, 1000, 1280)
    else:
        bench_scs(100, 20, 512)
        bench_irs(60_000, 10_000, 1280)


if __name__ == "__main__":
    main()
