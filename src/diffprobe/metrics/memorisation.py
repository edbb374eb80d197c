"""Distances from generated images to their nearest training image: the check that tells diversity from
memorisation (a model that replays its training images scores a high IRS too).

``nearest_distances`` returns the nearest training row and its Euclidean distance for every query row;
``distance_summary`` compares a model's distances with those of held-out real images (what a model that neither
copies nor collapses would show).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError


def nearest_distances(train: np.ndarray, queries: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(index int64 [n], Euclidean distance float64 [n]) of the nearest training row of each query row; ties go
    to the lowest index."""
    train, queries = np.asarray(train, dtype=np.float32), np.asarray(queries, dtype=np.float32)
    if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
        raise InputError(f"nearest distances need 2-D features of one dimension (got {train.shape} and "
                         f"{queries.shape})")
    if not len(train) or not len(queries):
        raise InputError("nearest distances need non-empty train and query sets")
    t = torch.from_numpy(train).double()
    idx, dist = [], []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(torch.from_numpy(queries[start : start + chunk]).double(), t)
        value, where = d.min(dim=1)
        idx.append(where.numpy())
        dist.append(value.numpy())
    return np.concatenate(idx).astype(np.int64), np.concatenate(dist)


def distance_summary(dist: np.ndarray, reference: np.ndarray, copy_quantile: float = 0.01) -> dict:
    """Quantiles of ``dist``, its median over the reference's median, and the fraction of queries closer to the
    training set than the ``copy_quantile`` quantile of the reference distances (near-copies)."""
    dist, reference = np.asarray(dist, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    threshold = float(np.quantile(reference, copy_quantile))
    q10, q50, q90 = (float(v) for v in np.quantile(dist, [0.1, 0.5, 0.9]))
    return {"n": int(len(dist)), "p10": q10, "median": q50, "p90": q90,
            "median_over_reference": q50 / float(np.median(reference)),
            "near_copy_threshold": threshold, "near_copy_quantile": copy_quantile,
            "near_copy_fraction": float((dist < threshold).mean())}
