"""Fréchet distance between Gaussian fits of two feature sets, and the kernel inception distance (KID).

FD = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)). With Inception pool3 features and the standard
TorchScript network this is FID; with any other embedder it is a Fréchet distance in that embedder's space and
is not comparable with published FID numbers.

The matrix square root's trace is computed from the eigenvalues of the symmetric PSD matrix
C1^(1/2) C2 C1^(1/2), which has the same eigenvalues as C1 C2. This stays finite and real when a covariance is
rank-deficient (fewer samples than feature dimensions), where ``scipy.linalg.sqrtm`` of C1 C2 can turn complex;
``method="sqrtm"`` reproduces the usual pytorch-fid / clean-fid computation (``sqrtm`` with a 1e-6 diagonal
offset when the product is singular) for parity.

KID is the unbiased MMD^2 estimate with the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
subsets of both sets (Binkowski et al. 2018; clean-fid and torch-fidelity use 100 subsets of 1000).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import linalg

from ..errors import InputError, check_writable, writing

STATS_FORMAT = "diffprobe-fd-stats-1"
SQRTM_OFFSET = 1e-6


# ---------------------------------------------------------------- Gaussian fit


@dataclass
class GaussianStats:
    """Mean and covariance (float64, ddof=1) of ``count`` feature vectors; ``features`` kept when KID needs them."""

    mean: np.ndarray
    cov: np.ndarray
    count: int
    features: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


class StatsAccumulator:
    """Streaming mean and covariance in float64 (update per chunk, then compute), so large or sharded feature sets
    need not be held in memory twice. Sums are taken around the first chunk's mean, which keeps the covariance
    accurate when features have a large common offset."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.shift: np.ndarray | None = None
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, feats: np.ndarray) -> None:
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"features must have shape [count, {self.dim}], got {x.shape}")
        if len(x) == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
        x = x - self.shift
        self.count += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def compute(self) -> GaussianStats:
        if self.count < 2:
            raise InputError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        centered_mean = self.sum / self.count
        cov = (self.outer - self.count * np.outer(centered_mean, centered_mean)) / (self.count - 1)
        cov = (cov + cov.T) / 2  # exact symmetry, lost to rounding in the sums
        return GaussianStats(mean=centered_mean + self.shift, cov=cov, count=self.count)


def gaussian_stats(feats: np.ndarray, chunk: int = 16384, keep_features: bool = False) -> GaussianStats:
    """Gaussian fit of a feature array [count, dim] (may be memory-mapped; read in chunks)."""
    if feats.ndim != 2:
        raise InputError(f"features must be a 2-D array [count, dim], got shape {feats.shape}")
    acc = StatsAccumulator(feats.shape[1])
    for start in range(0, len(feats), chunk):
        acc.update(feats[start : start + chunk])
    stats = acc.compute()
    if keep_features:
        stats.features = np.asarray(feats, dtype=np.float32)
    return stats


# ---------------------------------------------------------------- the distance


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = linalg.eigh(cov)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray, method: str = "eigh") -> tuple[float, dict]:
    """tr((C1 C2)^(1/2)) and how it was computed."""
    if method == "eigh":
        root1 = _psd_sqrt(cov1)
        values = linalg.eigvalsh(root1 @ cov2 @ root1)
        return float(np.sqrt(np.clip(values, 0, None)).sum()), {"method": "eigh", "offset": None}
    if method == "sqrtm":
        info = {"method": "sqrtm", "offset": None}
        root = linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(root).all():  # singular product: retry with a small diagonal offset, as pytorch-fid
            offset = np.eye(len(cov1)) * SQRTM_OFFSET
            root = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
            info["offset"] = SQRTM_OFFSET
        if np.iscomplexobj(root):
            imaginary = float(np.max(np.abs(root.imag)))
            info["max_imaginary"] = imaginary
            if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
                raise InputError(
                    f"the matrix square root has an imaginary component of {imaginary:.3g}; use method 'eigh', "
                    "which is stable for rank-deficient covariances"
                )
            root = root.real
        return float(np.trace(root)), info
    raise InputError(f"unknown matrix square-root method '{method}' (eigh or sqrtm)")


def frechet_distance(
    mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray, method: str = "eigh"
) -> dict:
    """Fréchet distance between N(mean1, cov1) and N(mean2, cov2), with its terms."""
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mean1), len(mean1)):
        raise InputError(
            f"the two feature sets have different dimensions ({len(mean1)} and {len(mean2)}); use one embedder"
        )
    mean_term = float(np.sum((mean1 - mean2) ** 2))
    tr_sqrt, info = trace_sqrt_product(cov1, cov2, method)
    trace_term = float(np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)
    # tiny negative values are rounding of a zero distance (identical sets)
    fd = max(mean_term + trace_term, 0.0)
    return {"fd": fd, "mean_term": mean_term, "trace_term": trace_term, "sqrt": info}


def sample_warning(stats: GaussianStats, what: str) -> str | None:
    if stats.count <= stats.dim:
        return (
            f"{what} has {stats.count} feature vectors for {stats.dim} dimensions: its covariance is rank-deficient "
            "and the Fréchet distance is biased upwards and not comparable with distances from larger sets "
            "(FID is usually reported with 10k-50k images)"
        )
    return None


# ---------------------------------------------------------------- KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two samples with the cubic polynomial kernel (diagonals of Kxx, Kyy excluded)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


def kid(
    feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict:
    """KID: mean and SD (ddof=1) of the unbiased MMD^2 over ``subsets`` random subsets of ``subset_size`` drawn
    without replacement from each set. A subset size above the smaller set is lowered to it and reported."""
    if feats1.shape[1] != feats2.shape[1]:
        raise InputError(f"KID needs features of one dimension, got {feats1.shape[1]} and {feats2.shape[1]}")
    size = min(subset_size, len(feats1), len(feats2))
    if size < 2:
        raise InputError("KID needs at least 2 feature vectors in each set")
    rng = np.random.default_rng(seed)

    def draw(feats: np.ndarray) -> np.ndarray:  # sorted rows read well from a memory-mapped array
        return np.asarray(feats[np.sort(rng.choice(len(feats), size, replace=False))], dtype=np.float64)

    values = np.array([mmd2_unbiased(draw(feats1), draw(feats2)) for _ in range(subsets)])
    return {
        "kid": float(values.mean()),
        "kid_sd": float(values.std(ddof=1)) if subsets > 1 else None,
        "subsets": subsets,
        "subset_size": size,
        "subset_size_requested": subset_size,
        "kernel": "polynomial (x.y/d + 1)^3",
        "seed": seed,
    }


# ---------------------------------------------------------------- reference statistics files


def write_stats(path: str | Path, stats: GaussianStats, identity: dict) -> Path:
    """Write reference statistics as .npz: mean, cov, count, the embedder identity (JSON) and, when present, the
    features (float32; KID needs them)."""
    arrays = {
        "format": np.array(STATS_FORMAT),
        "mean": stats.mean,
        "cov": stats.cov,
        "count": np.array(stats.count),
        "identity": np.array(json.dumps(identity, sort_keys=True)),
    }
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, dtype=np.float32)
    with writing(path) as target:
        with open(target, "wb") as fh:  # a file object: np.savez would otherwise append .npz to the name
            np.savez(fh, **arrays)
    return Path(path)


def read_stats(path: str | Path) -> tuple[GaussianStats, dict]:
    """Read a statistics file written by :func:`write_stats` (never unpickles)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"reference statistics file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if "format" not in keys or str(data["format"]) != STATS_FORMAT:
                raise InputError(
                    f"{path} is not a diffprobe statistics file (made with `diffprobe score fd ... --save-stats`); "
                    "statistics from other tools lack the embedder identity that makes the comparison safe"
                )
            stats = GaussianStats(
                mean=data["mean"].astype(np.float64),
                cov=data["cov"].astype(np.float64),
                count=int(data["count"]),
                features=data["features"] if "features" in keys else None,
            )
            identity = json.loads(str(data["identity"]))
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read reference statistics {path} ({err})") from None
    return stats, identity


def check_identity(saved: dict, current: dict, path: str | Path) -> None:
    """Refuse statistics made with another embedder (weights, preprocessing) than the current one."""
    if saved.get("id") != current.get("id"):
        raise InputError(
            f"the reference statistics {path} were computed with embedder {saved.get('id')!r}, but the images are "
            f"embedded with {current.get('id')!r}; distances across embedders or preprocessing are meaningless. "
            f"Pass the embedder the statistics were made with (--embedder {saved.get('name')}, and --inception "
            "FILE / --resize for FID), or recompute the reference from its images"
        )


# ---------------------------------------------------------------- scoring folders and runs


NOT_FID = (
    "this is a Fréchet distance in {name} feature space, not FID: it is not comparable with published FID numbers "
    "(those use the Inception TorchScript file; pass --inception inception-2015-12-05.pt)"
)


def embedder_identity(model) -> dict:
    """What a statistics file records about the features: the cache id (weights and preprocessing) and readable
    parts of it."""
    if model is None:
        return {"id": "precomputed (.npy)", "name": "precomputed (.npy)"}
    info = model.describe()
    return {key: info.get(key) for key in ("id", "name", "weights", "dim", "resize")}


def _is_stats_file(path) -> bool:
    return str(path).endswith(".npz")


def _choose_embedder(embedder, weights, inception, resize, device, batch_size, need_model: bool):
    from ..embed import Embedder, get_embedder

    if inception is not None:
        if not (embedder == "auto" or str(embedder).startswith("inception-torchscript")):
            raise InputError(f"--inception makes the score FID with the Inception network; drop --embedder {embedder}"
                             " (or drop --inception for a Fréchet distance in that embedder's space)")
        return get_embedder("inception-torchscript", weights=inception, resize=resize, device=device,
                            batch_size=batch_size)
    if isinstance(embedder, Embedder):
        return embedder
    is_inception = str(embedder).startswith("inception-torchscript")
    if resize != "clean" and not is_inception:
        raise InputError(f"--resize {resize} applies to the FID Inception network; give it with --inception FILE")
    if not need_model:
        return None
    return get_embedder(embedder, weights=weights, resize=resize, device=device, batch_size=batch_size)


def score_fd(
    path,
    ref,
    *,
    embedder="auto",
    weights=None,
    inception=None,
    resize: str = "clean",
    save_stats=None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    method: str = "eigh",
    device=None,
    batch_size: int = 64,
    cache=True,
    strict: bool = False,
    guidance: str | None = None,
    progress=None,
    backend=None,
) -> dict:
    """Fréchet distance (and KID) of the images under ``path`` (run directory, folder, or .npy features) against
    ``ref`` (the same kinds, or a statistics .npz from ``save_stats``). Returns the JSON-ready result.

    ``inception`` (a path to ``inception-2015-12-05.pt``) makes it FID proper, with the clean-fid ``resize`` mode
    (clean, legacy-tensorflow, legacy-pytorch); otherwise features come from ``embedder`` and the result says it
    is not comparable with published FID. ``save_stats`` writes the reference's statistics, with its features so
    that KID can be computed from the file later. ``kid_subsets=0`` skips KID. ``backend``
    (``diffprobe.distributed``) decides where features missing from the cache are computed.
    """
    from .images import load_features
    from .provenance import provenance

    if kid_subsets < 0 or kid_subset_size < 2:
        raise InputError("KID needs --kid-subsets >= 0 and --kid-subset-size >= 2")
    ref_is_stats = _is_stats_file(ref)
    if save_stats is not None:
        if ref_is_stats:
            raise InputError(f"--ref {ref} is already a statistics file; --save-stats saves a reference made from "
                             "images")
        check_writable(save_stats)
    need_model = any(not str(p).endswith((".npy", ".npz")) for p in (path, ref))
    model = _choose_embedder(embedder, weights, inception, resize, device, batch_size, need_model)
    identity = embedder_identity(model)
    if ref_is_stats:  # refuse a mismatch before any image is embedded
        ref_stats, saved = read_stats(ref)
        check_identity(saved, identity, ref)
        ref_info = {"path": str(ref), "source": "statistics", "n_images": ref_stats.count,
                    "has_features": ref_stats.features is not None}
    feats, info = load_features(path, model, strict=strict, cache=cache, progress=progress, guidance=guidance,
                                backend=backend)
    if not ref_is_stats:
        ref_feats, ref_info = load_features(ref, model, strict=strict, cache=cache, progress=progress,
                                            backend=backend)
        ref_stats = gaussian_stats(ref_feats, keep_features=True)
    stats = gaussian_stats(feats)
    if stats.dim != ref_stats.dim:
        raise InputError(f"the images have {stats.dim}-d features, the reference {ref_stats.dim}-d; use one embedder")

    is_fid = model is not None and model.name == "inception-torchscript"
    name = identity["name"]
    distance = frechet_distance(stats.mean, stats.cov, ref_stats.mean, ref_stats.cov, method)
    warnings = [w for w in (sample_warning(stats, "the image set"), sample_warning(ref_stats, "the reference")) if w]
    result: dict = {
        "metric": "fd",
        "fd": distance["fd"],
        "is_fid": is_fid,
        "comparable_with_published_fid": is_fid,
        "fid_note": None if is_fid else NOT_FID.format(name=name),
        "resize": model.preprocess.mode if is_fid else None,
        "terms": {"mean": distance["mean_term"], "trace": distance["trace_term"]},
        "sqrt": distance["sqrt"],
        "embedder": model.describe() if model is not None else {"name": name},
        "input": {"images": info, "reference": ref_info},
        "n_images": stats.count,
        "n_reference": ref_stats.count,
        "dim": stats.dim,
    }
    if kid_subsets == 0:
        result["kid"] = None
    elif ref_stats.features is None:
        result["kid"] = None
        warnings.append(f"no KID: the statistics file {ref} holds no features (it was saved without them)")
    else:
        result["kid"] = kid(feats, ref_stats.features, kid_subsets, kid_subset_size, seed)
        if result["kid"]["subset_size"] < kid_subset_size:
            warnings.append(
                f"KID subsets hold {result['kid']['subset_size']} images (the smaller set's size), not the "
                f"requested {kid_subset_size}; KID from different subset sizes is not comparable"
            )
    if save_stats is not None:
        result["saved_stats"] = str(write_stats(save_stats, ref_stats, identity))
    result["warnings"] = warnings
    result["provenance"] = provenance()
    return result
