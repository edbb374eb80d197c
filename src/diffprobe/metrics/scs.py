"""Semantic Consistency Score (Bent, CVPR-W 2024): per prompt, the mean over all unordered image pairs of
``max(100 * cos(e_i, e_j), 0)`` -- the clamp is applied per pair, before averaging, as in the official code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from ..errors import InputError, ModelNotFoundError


def pair_scores(features: np.ndarray, scale: float = 100.0, clamp: bool = True) -> np.ndarray:
    """[..., N, D] -> [..., N, N] scaled (and clamped) cosine similarities."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise InputError("an image has an all-zero feature vector; cosine similarity is undefined")
    x = x / norms
    sim = scale * (x @ np.swapaxes(x, -1, -2))
    return np.maximum(sim, 0.0) if clamp else sim


def scs(features: np.ndarray, scale: float = 100.0, clamp: bool = True) -> float:
    """SCS of one prompt's N >= 2 image features [N, D]."""
    n = len(features)
    if n < 2:
        raise InputError(f"SCS needs at least 2 images per prompt, got {n}")
    a = pair_scores(features, scale, clamp)
    iu = np.triu_indices(n, k=1)
    return float(a[iu].mean())


def scs_batch(features: np.ndarray, scale: float = 100.0, clamp: bool = True) -> np.ndarray:
    """SCS for P prompts at once from [P, N, D]; one batched matmul."""
    n = features.shape[1]
    if n < 2:
        raise InputError(f"SCS needs at least 2 images per prompt, got {n}")
    a = pair_scores(features, scale, clamp)
    iu = np.triu_indices(n, k=1)
    return a[:, iu[0], iu[1]].mean(axis=1)


def scs_per_prompt(
    features: np.ndarray, groups: dict[str, list[int]], scale: float = 100.0, clamp: bool = True
) -> dict[str, float | None]:
    """Prompt id -> SCS (None where the prompt has fewer than 2 images)."""
    out: dict[str, float | None] = {g: None for g in groups}
    valid = {g: idx for g, idx in groups.items() if len(idx) >= 2}
    by_size: dict[int, list[str]] = {}
    for g, idx in valid.items():
        by_size.setdefault(len(idx), []).append(g)
    for names in by_size.values():  # equal-sized groups go through one batched matmul
        stacked = np.stack([features[valid[g]] for g in names])
        for g, value in zip(names, scs_batch(stacked, scale, clamp), strict=True):
            out[g] = float(value)
    return out


def summarize(values: Sequence[float]) -> dict:
    """Model-level summary; ``sd`` is the population SD (ddof=0) as in the SCS analysis code."""
    x = np.asarray(values, dtype=np.float64)
    return {
        "n_prompts": int(len(x)),
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "sd": float(x.std(ddof=0)),
        "sd_sample": float(x.std(ddof=1)) if len(x) > 1 else None,
        "min": float(x.min()),
        "max": float(x.max()),
    }


def scs_sensitivity(
    features: np.ndarray,
    groups: dict[str, list[int]],
    n_values: Sequence[int] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    tolerance: float = 1.0,
    scale: float = 100.0,
    clamp: bool = True,
) -> dict:
    """How SCS and its precision depend on the number of repetitions N' (random subsets without replacement).

    For each N' and prompt, ``n_boot`` random N'-subsets of the prompt's N images are scored. The curve gives
    the mean SCS, the SD across subsets (``sd_subsets``, which shrinks to 0 at N' = N because the subsets
    then coincide), and ``sd_per_prompt``: that SD divided by the finite-population factor
    sqrt((N - N') / (N - 1)), an estimate of the SD of a prompt's SCS over N' fresh seeds (exact for a mean
    of independent draws, first-order for this pair statistic). ``suggested_n`` is the smallest N' < N whose
    ``sd_per_prompt`` is at most ``tolerance`` points; ``projected_n`` extrapolates SD ~ 1/sqrt(N') (the
    leading term) to the N' that would reach it, which may exceed N. The SCS paper chose 20 repetitions by a
    sensitivity analysis whose details are not public; this is one natural version, not the paper's.
    """
    valid = {g: idx for g, idx in groups.items() if len(idx) >= 2}
    if not valid:
        raise InputError("SCS sensitivity needs prompts with at least 2 images")
    n_max = min(len(idx) for idx in valid.values())
    n_values = sorted({n for n in (n_values or range(2, n_max + 1)) if 2 <= n <= n_max})
    rng = np.random.default_rng(seed)
    mats = {g: pair_scores(features[idx], scale, clamp) for g, idx in valid.items()}
    curve = []
    for n in n_values:
        means, sds, corrected = [], [], []
        for a in mats.values():
            # random subsets: argsort of uniform noise gives B independent permutations at once
            sub = np.argsort(rng.random((n_boot, len(a))), axis=1)[:, :n]
            block = a[sub[:, :, None], sub[:, None, :]]  # [B, n, n]
            values = (block.sum(axis=(1, 2)) - np.trace(block, axis1=1, axis2=2)) / (n * (n - 1))
            sd = float(values.std(ddof=1)) if n_boot > 1 else 0.0
            means.append(values.mean())
            sds.append(sd)
            if n < len(a):
                corrected.append(sd / np.sqrt((len(a) - n) / (len(a) - 1)))
        curve.append(
            {
                "n": n,
                "mean_scs": float(np.mean(means)),
                "sd_subsets": float(np.mean(sds)),
                "sd_per_prompt": float(np.mean(corrected)) if len(corrected) == len(mats) else None,
            }
        )
    usable = [c for c in curve if c["sd_per_prompt"] is not None]
    suggested = next((c["n"] for c in usable if c["sd_per_prompt"] <= tolerance), None)
    projected = None
    if usable:
        const = float(np.median([c["sd_per_prompt"] * np.sqrt(c["n"]) for c in usable]))
        projected = max(2, int(np.ceil((const / tolerance) ** 2)))
    return {
        "n_boot": n_boot,
        "seed": seed,
        "tolerance": tolerance,
        "curve": curve,
        "suggested_n": suggested,
        "projected_n": projected,
        "method": "random subsets without replacement; sd_per_prompt = sd_subsets / sqrt((N - n) / (N - 1))",
    }


def normality(values: Sequence[float]) -> dict:
    """The official analysis' kstest(x, 'norm') (against N(0, 1): degenerate for scores near 90, kept for parity)
    and a meaningful check: Shapiro-Wilk on the scores."""
    x = np.asarray(values, dtype=np.float64)
    ks = stats.kstest(x, "norm")
    out = {"kstest_standard_normal_p": float(ks.pvalue)}
    if len(x) >= 3:
        out["shapiro_p"] = float(stats.shapiro(x).pvalue)
    return out


def score_scs(
    path,
    embedder="auto",
    *,
    weights=None,
    device=None,
    batch_size: int = 64,
    cache=True,
    strict: bool = False,
    guidance: str | None = None,
    sensitivity: bool = True,
    n_boot: int = 200,
    seed: int = 0,
    scale: float = 100.0,
    clamp: bool = True,
    progress=None,
    backend=None,
) -> dict:
    """Score a run directory or a grouped image folder; returns the JSON-ready result.

    ``embedder`` is a name for ``diffprobe.embed.get_embedder`` or an ``Embedder``; ``backend``
    (``diffprobe.distributed``) decides where features missing from the cache are computed.
    """
    from ..embed import Embedder, get_embedder
    from .images import load_image_set
    from .provenance import provenance

    images = load_image_set(path, strict=strict, guidance=guidance)
    groups = images.groups()
    if not isinstance(embedder, Embedder):
        try:
            embedder = get_embedder(embedder, weights=weights, device=device, batch_size=batch_size)
        except ModelNotFoundError as err:
            if embedder == "efficientnet-lite0":
                raise
            raise ModelNotFoundError(f"{err}; or score with --embedder efficientnet-lite0, which needs no download "
                                     "(its scores are not comparable with CLIP-based ones)") from None
    features = images.features(embedder, cache=cache, progress=progress, backend=backend)
    per_prompt = scs_per_prompt(features, groups, scale, clamp)
    texts = images.prompt_texts()
    warnings = []
    undefined = [g for g, v in per_prompt.items() if v is None]
    if undefined:
        warnings.append(
            f"SCS undefined for {len(undefined)} prompt(s) with a single image (needs >= 2): {', '.join(undefined[:5])}"
        )
    for g, idx in groups.items():
        seeds = [images.items[i].seed for i in idx if images.items[i].seed is not None]
        if len(seeds) != len(set(seeds)):
            warnings.append(f"prompt '{g}' repeats seeds; duplicates inflate SCS")
        shas = [images.items[i].sha256 for i in idx if images.items[i].sha256]
        if len(shas) != len(set(shas)):
            warnings.append(f"prompt '{g}' has byte-identical images; duplicates inflate SCS")
    defined = {g: v for g, v in per_prompt.items() if v is not None}
    if not defined:
        raise InputError(f"SCS is undefined for every prompt under {path}: each has a single image (needs >= 2)")
    result = {
        "metric": "scs",
        "definition": "per prompt: mean over unordered pairs of max(scale*cos, 0)"
        if clamp
        else "per prompt: mean over unordered pairs of scale*cos (no clamp)",
        "scale": scale,
        "clamp_negative": clamp,
        "input": images.summary(),
        "generation": images.generation(),  # seeds and sampler settings, which compare checks between sides
        "embedder": embedder.describe(),
        "summary": summarize(list(defined.values())),
        "normality": normality(list(defined.values())),
        "per_prompt": [
            {"prompt_id": g, "prompt": texts.get(g), "n_images": len(groups[g]), "scs": per_prompt[g]} for g in groups
        ],
        "warnings": warnings,
        "provenance": provenance(),
    }
    if sensitivity:
        result["sensitivity"] = scs_sensitivity(features, groups, n_boot=n_boot, seed=seed, scale=scale, clamp=clamp)
    return result
