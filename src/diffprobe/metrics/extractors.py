"""Which feature extractor to trust for retrieval metrics: the IRS paper's study (Dombrowski et al., CVPR 2025).

Each extractor retrieves, for every real held-out (test) image, its nearest training image. Where at least
``min_agree`` extractors retrieve the same training image, that image is the pseudo ground truth (the paper:
5 of 9 extractors). Per extractor the study reports its agreement rate with that consensus, its own IRS-infinity
on the real test split (the "measurement gap": a perfect generator would score this, not 1), and the pairwise
agreement matrix (how often two extractors retrieve the same image).

The consensus includes the extractor's own vote, as in the paper; with few extractors this favours each of them,
so compare extractors with each other, not with 1. ``agreement_others`` is the same rate against the consensus of
the other extractors only (no vote of its own), which removes that bias.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .irs import irs_from_neighbors, nearest_neighbors


def default_min_agree(n_extractors: int) -> int:
    """A strict majority: then at most one training image can reach it."""
    return n_extractors // 2 + 1


def consensus(neighbors: np.ndarray, min_agree: int) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo ground truth from a [extractors, queries] array of retrieved training indices.

    Returns (truth, votes): ``truth[q]`` is the training index retrieved by the most extractors for query q
    when that count reaches ``min_agree``, else -1; ``votes[q]`` is that count. ``min_agree`` must be a strict
    majority so the winner is unique."""
    n_ext = neighbors.shape[0]
    if not (n_ext / 2 < min_agree <= n_ext):
        raise InputError(
            f"the consensus must be a strict majority of the {n_ext} extractors (more than {n_ext / 2:g}, at most "
            f"{n_ext}), got {min_agree}; a smaller threshold could name two different training images"
        )
    # votes[e, q]: how many extractors retrieved what extractor e retrieved for query q
    votes = (neighbors[:, None, :] == neighbors[None, :, :]).sum(axis=1)
    best = votes.argmax(axis=0)
    columns = np.arange(neighbors.shape[1])
    top = votes[best, columns]
    truth = np.where(top >= min_agree, neighbors[best, columns], -1)
    return truth, top


def leave_one_out_threshold(n_extractors: int, min_agree: int) -> int | None:
    """The threshold for the consensus of the other n - 1 extractors: ``min_agree`` where that is still possible,
    and at least a strict majority of them; None with fewer than 2 others."""
    others = n_extractors - 1
    if others < 2:
        return None
    return max(min(min_agree, others), default_min_agree(others))


def _agreement(retrieved: np.ndarray, truth: np.ndarray) -> float | None:
    has_truth = truth >= 0
    return float((retrieved[has_truth] == truth[has_truth]).mean()) if has_truth.any() else None


def agreement_matrix(neighbors: np.ndarray) -> np.ndarray:
    """[extractors, extractors]: the fraction of queries for which two extractors retrieve the same image."""
    return (neighbors[:, None, :] == neighbors[None, :, :]).mean(axis=2)


def extractor_agreement(
    neighbors: dict[str, np.ndarray], n_train: int, min_agree: int | None = None, alpha_e: float = 0.05
) -> dict:
    """The study from retrieved indices: ``neighbors`` maps extractor name -> int [n_test] nearest training index."""
    names = list(neighbors)
    if len(names) < 2:
        raise InputError("the extractor study needs at least 2 extractors (give a comma-separated list)")
    nn = np.stack([np.asarray(neighbors[name], dtype=np.int64) for name in names])
    if nn.ndim != 2:
        raise InputError("every extractor must retrieve one training index per test image")
    if nn.min() < 0 or nn.max() >= n_train:
        raise InputError(f"retrieved indices must lie in 0..{n_train - 1}")
    min_agree = default_min_agree(len(names)) if min_agree is None else min_agree
    truth, votes = consensus(nn, min_agree)
    has_truth = truth >= 0
    n_consensus = int(has_truth.sum())
    loo_agree = leave_one_out_threshold(len(names), min_agree)
    per_extractor = []
    for i, name in enumerate(names):
        row = {"extractor": name, "agreement": _agreement(nn[i], truth)}
        if loo_agree is not None:  # the consensus of the others: no vote of its own
            others_truth, _ = consensus(np.delete(nn, i, axis=0), loo_agree)
            row["agreement_others"] = _agreement(nn[i], others_truth)
            row["n_consensus_others"] = int((others_truth >= 0).sum())
        row["real_irs"] = irs_from_neighbors(nn[i], n_train, alpha_e).to_dict()
        row["neighbors"] = nn[i].tolist()
        per_extractor.append(row)
    matrix = agreement_matrix(nn)
    return {
        "extractors": names,
        "n_train": n_train,
        "n_test": int(nn.shape[1]),
        "min_agree": min_agree,
        "min_agree_others": loo_agree,
        "n_consensus": n_consensus,
        "consensus_rate": n_consensus / nn.shape[1],
        "vote_histogram": {str(v): int((votes == v).sum()) for v in range(1, len(names) + 1)},
        "per_extractor": per_extractor,
        "pairwise_agreement": matrix.tolist(),
        "pseudo_truth": truth.tolist(),
    }


def evaluate_extractors(
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    min_agree: int | None = None,
    *,
    metric: str = "euclidean",
    alpha_e: float = 0.05,
    **nn_kwargs,
) -> dict:
    """The study from features: ``train[name]`` [N, d_name] and ``test[name]`` [n, d_name] for every extractor
    (rows in the same image order for all extractors)."""
    if set(train) != set(test):
        raise InputError("train and test features must name the same extractors")
    sizes = {(len(train[name]), len(test[name])) for name in train}
    if len(sizes) != 1:
        raise InputError(f"every extractor must embed the same images; got (train, test) counts {sorted(sizes)}")
    neighbors = {name: nearest_neighbors(train[name], test[name], metric, **nn_kwargs) for name in train}
    result = extractor_agreement(neighbors, sizes.pop()[0], min_agree, alpha_e)
    result["retrieval"] = {"metric": metric, "features": "raw" if metric == "euclidean" else "l2"}
    return result


def parse_embedders(spec: str) -> list[tuple[str, str | None]]:
    """``"a,b=FILE,c"`` -> [(a, None), (b, FILE), (c, None)]: an embedder name, optionally with its weights file."""
    items = []
    for part in spec.split(","):
        name, _, weights = part.strip().partition("=")
        if not name:
            raise InputError(f"empty embedder name in '{spec}'; give names separated by commas")
        items.append((name, weights or None))
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise InputError(f"an embedder is listed twice in '{spec}'")
    return items


def score_extractors(
    train,
    test,
    embedders: str | list[str],
    *,
    min_agree: int | None = None,
    metric: str = "euclidean",
    alpha_e: float = 0.05,
    device=None,
    batch_size: int = 64,
    cache=True,
    strict: bool = False,
    progress=None,
    backend=None,
) -> dict:
    """The study on image folders: every embedder (``name`` or ``name=WEIGHTS_FILE``) embeds ``train`` and ``test``
    (through the feature cache); returns the JSON-ready result. ``backend`` (``diffprobe.distributed``) decides where
    features missing from the cache are computed."""
    from ..embed import get_embedder
    from .images import load_image_set
    from .provenance import provenance

    spec = embedders if isinstance(embedders, str) else ",".join(embedders)
    items = parse_embedders(spec)
    if min_agree is not None:  # a bad threshold must not cost an embedding pass
        consensus(np.zeros((len(items), 1), dtype=np.int64), min_agree)
    if Path(train).expanduser().resolve() == Path(test).expanduser().resolve():
        raise InputError("--train and --test are the same folder; the study retrieves held-out images")
    sets = {"train": load_image_set(train, strict=strict, flat=True),
            "test": load_image_set(test, strict=strict, flat=True)}
    train_f, test_f, described = {}, {}, {}
    for name, weights in items:
        model = get_embedder(name, weights=weights, device=device, batch_size=batch_size)
        train_f[name] = sets["train"].features(model, cache=cache, progress=progress, backend=backend)
        test_f[name] = sets["test"].features(model, cache=cache, progress=progress, backend=backend)
        described[name] = model.describe()
    result = {"metric": "extractors"}
    result.update(evaluate_extractors(train_f, test_f, min_agree, metric=metric, alpha_e=alpha_e, device=device))
    result["embedders"] = described
    result["input"] = {k: v.summary() for k, v in sets.items()}
    result["provenance"] = provenance()
    return result
