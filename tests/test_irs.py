"""Image Retrieval Score: estimator against brute force and simulation, retrieval, adjustment, CLI."""

from __future__ import annotations

import json
from fractions import Fraction
from math import comb, factorial

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffprobe.errors import InputError
from diffprobe.metrics.irs import (
    bounds_s,
    irs,
    irs_adjusted,
    irs_from_counts,
    log_pmf,
    log_stirling2,
    log_stirling2_exact,
    log_stirling2_temme,
    mle_s,
    nearest_neighbors,
    score_irs,
)


def stirling2(n: int, k: int) -> int:
    return sum((-1) ** i * comb(k, i) * (k - i) ** n for i in range(k + 1)) // factorial(k)


def pmf_exact(j: int, n: int, s: int) -> Fraction:
    """P(K = j | n, s) as an exact fraction."""
    if j > s:
        return Fraction(0)
    return Fraction(stirling2(n, j) * factorial(s) // factorial(s - j), s**n)


def test_stirling_numbers():
    for n in range(1, 15):
        exact = log_stirling2_exact(n)
        for k in range(1, n + 1):
            assert exact[k] == pytest.approx(np.log(stirling2(n, k)), abs=1e-9)
    # Temme's approximation: within 1e-2 nats at n = 10 and 2e-3 at n >= 50
    assert np.abs(log_stirling2_temme(10)[1:] - log_stirling2_exact(10)[1:]).max() < 1e-2
    for n in (50, 400):
        assert np.abs(log_stirling2_temme(n)[1:] - log_stirling2_exact(n)[1:]).max() < 2e-3


def test_pmf_is_the_coupon_collector_distribution():
    n, s = 7, 5
    probs = np.exp(log_pmf(n, s, log_stirling2(n)))
    np.testing.assert_allclose(probs, [float(pmf_exact(j, n, s)) for j in range(1, 6)], rtol=1e-9)
    assert sum(pmf_exact(j, n, s) for j in range(1, n + 1)) == 1
    rng = np.random.default_rng(0)
    draws = rng.integers(0, s, size=(200_000, n))
    distinct = np.array([len(set(r)) for r in draws[:20000]])
    freq = np.bincount(distinct, minlength=s + 1)[1:] / len(distinct)
    np.testing.assert_allclose(freq, probs, atol=0.01)


def test_mle_and_bounds_against_brute_force():
    alpha = 0.05
    for N in range(1, 11):
        for n in range(1, 8):
            for k in range(1, min(n, N) + 1):
                lik = {s: pmf_exact(k, n, s) for s in range(k, N + 1)}
                best = max(lik.values())
                s_hat = N if k == n else min(s for s, v in lik.items() if v == best)
                assert mle_s(k, n, N) == s_hat, (k, n, N)
                upper = [
                    s for s in range(s_hat + 1, N + 1) if sum(pmf_exact(j, n, s) for j in range(1, k + 1)) >= alpha
                ]
                lower = [s for s in range(k, s_hat) if sum(pmf_exact(j, n, s) for j in range(k, n + 1)) >= alpha]
                expect = (min(lower) if lower else s_hat, max(upper) if upper else s_hat)
                assert bounds_s(k, n, N, s_hat, alpha, log_stirling2(n, "exact")) == expect, (k, n, N)


def test_all_distinct_hits_saturate():
    r = irs_from_counts(k=50, n=50, N=1000)
    assert r.k_pred_inf == 1000 and r.irs_inf == 1.0 and r.irs_inf_u == 1.0 and r.irs_inf_l < 1.0
    with pytest.raises(InputError):
        irs_from_counts(k=60, n=50, N=1000)


def test_estimator_covers_truth_in_simulation():
    """A generator drawing uniformly from s of N training images: IRS-inf is nearly unbiased and each one-sided
    bound misses s/N at most about alpha_e of the time."""
    N, s, n, reps = 3000, 900, 600, 300
    rng = np.random.default_rng(123)
    below = above = 0
    estimates = []
    for _ in range(reps):
        k = len(np.unique(rng.integers(0, s, n)))
        r = irs_from_counts(k, n, N)
        estimates.append(r.k_pred_inf)
        below += r.s_upper < s
        above += r.s_lower > s
    slack = 3 * np.sqrt(0.05 * 0.95 / reps)
    assert below / reps <= 0.05 + slack and above / reps <= 0.05 + slack
    assert abs(np.mean(estimates) / s - 1) < 0.03


def test_nearest_neighbors_chunked_equals_brute_force(tmp_path):
    rng = np.random.default_rng(4)
    train = rng.normal(size=(53, 6)).astype(np.float32)
    train[40] = train[3]  # a duplicate: ties go to the lower index
    queries = np.concatenate([rng.normal(size=(17, 6)), train[[3, 10]]]).astype(np.float32)
    d = ((queries[:, None, :].astype(np.float64) - train[None].astype(np.float64)) ** 2).sum(-1)
    got = nearest_neighbors(train, queries, train_chunk=7, query_chunk=5, device="cpu")
    np.testing.assert_array_equal(got, d.argmin(1))
    assert got[-2] == 3
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    cos = nearest_neighbors(train, queries, "cosine", train_chunk=10, query_chunk=4, device="cpu")
    np.testing.assert_array_equal(cos, (qn @ tn.T).argmax(1))
    np.save(tmp_path / "train.npy", train)  # a memory-mapped train set is read chunk by chunk
    mapped = np.load(tmp_path / "train.npy", mmap_mode="r")
    np.testing.assert_array_equal(nearest_neighbors(mapped, queries, train_chunk=8, device="cpu"), got)
    with pytest.raises(InputError, match="dimensions differ"):
        nearest_neighbors(train, queries[:, :5])


def test_irs_on_fixed_features_follows_the_definitions():
    # 10 training points on a line; queries sit next to points 0, 0, 3, 7 -> k = 3, n = 4, N = 10
    train = np.arange(10, dtype=np.float32)[:, None] * 10
    queries = np.array([[0.1], [-0.2], [31.0], [69.0]], dtype=np.float32)
    r = irs(train, queries, device="cpu")
    assert (r.n_train, r.n_sampled, r.k_measured) == (10, 4, 3)
    assert r.irs_alpha == 0.3 and r.sampling_ratio == 0.4
    lik = {s: pmf_exact(3, 4, s) for s in range(3, 11)}
    s_hat = max(lik, key=lambda s: (lik[s], -s))
    assert r.k_pred_inf == s_hat and r.irs_inf == s_hat / 10


def test_retrieval_simulation_end_to_end():
    rng = np.random.default_rng(5)
    N, s, n = 800, 240, 400
    train = rng.normal(size=(N, 12)).astype(np.float32)
    learned = rng.choice(N, s, replace=False)
    picks = learned[rng.integers(0, s, n)]
    queries = train[picks] + rng.normal(scale=1e-3, size=(n, 12)).astype(np.float32)
    r = irs(train, queries, device="cpu")
    assert r.k_measured == len(np.unique(picks))
    assert r.irs_inf_l <= s / N <= r.irs_inf_u


def test_adjusted_chunks_and_equal_query_counts():
    rng = np.random.default_rng(6)
    train = rng.normal(size=(200, 8)).astype(np.float32)
    test = train[rng.integers(0, 200, 30)] + 0.01
    snth = train[rng.integers(0, 60, 95)] + 0.01  # a generator that covers only 60 of 200
    out = irs_adjusted(train, test, snth, device="cpu")
    assert out["snth"]["n_chunks"] == 3 and out["snth"]["chunk_size"] == 30
    ratios = [c["k_pred_inf"] / out["test"]["k_pred_inf"] for c in out["snth"]["chunks"]]
    np.testing.assert_allclose(out["irs_adjusted_per_chunk"], ratios)
    assert out["irs_adjusted"] == pytest.approx(np.mean(ratios))
    assert out["irs_adjusted_sd"] == pytest.approx(np.std(ratios, ddof=1))
    assert out["irs_adjusted_last_chunk"] == ratios[-1]
    assert out["test"]["n_sampled"] == 30 and all(c["n_sampled"] == 30 for c in out["snth"]["chunks"])
    assert irs_adjusted(train, test, snth, device="cpu") == out  # seeded
    # fewer synthetic than test images: the test split is subsampled with torch.randperm(seed 42)
    small = irs_adjusted(train, test, snth[:20], device="cpu")
    keep = np.sort(torch.randperm(30, generator=torch.Generator().manual_seed(42)).numpy()[:20])
    assert small["test"] == irs(train, test[keep], device="cpu").to_dict()
    assert small["snth"]["n_chunks"] == 1
    # a large test split (>= subset_threshold): one synthetic subset of |test| images
    big = irs_adjusted(train, test, snth, subset_threshold=10, device="cpu")
    assert big["snth"]["n_chunks"] == 1 and big["snth"]["chunk_size"] == 30


def test_cli_irs_with_npy_features(tmp_path):
    from diffprobe.cli import app

    rng = np.random.default_rng(7)
    train = rng.normal(size=(300, 4)).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "test.npy", train[rng.integers(0, 300, 50)] + 0.01)
    np.save(tmp_path / "snth.npy", train[rng.integers(0, 100, 120)] + 0.01)
    np.save(tmp_path / "bad.npy", np.zeros((10, 3), np.float32))
    out = tmp_path / "irs.json"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "score",
            "irs",
            str(tmp_path / "snth.npy"),
            "--train",
            str(tmp_path / "train.npy"),
            "--test",
            str(tmp_path / "test.npy"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["synthetic"]["n_sampled"] == 120 and data["adjusted"]["snth"]["n_chunks"] == 2
    assert data["retrieval"]["metric"] == "euclidean" and "one-sided" in data["bounds"]
    res = runner.invoke(app, ["score", "irs", str(tmp_path / "bad.npy"), "--train", str(tmp_path / "train.npy")])
    assert res.exit_code == 2 and "dimension" in res.output


def test_score_irs_on_image_folders(tmp_path):
    from test_embed import MeanColor

    rng = np.random.default_rng(8)
    colors = rng.integers(0, 255, (12, 3))
    for name, idx in {"train": range(12), "test": [0, 3, 5, 7], "snth": [1, 1, 2, 2, 2, 4]}.items():
        d = tmp_path / name / "nested"
        d.mkdir(parents=True)
        for i, c in enumerate(idx):
            Image.new("RGB", (20, 20), tuple(int(v) for v in colors[c])).save(d / f"{i}.png")
    (tmp_path / "snth" / "readme.txt").write_text("not an image")
    res = score_irs(
        tmp_path / "snth", tmp_path / "train", tmp_path / "test", embedder=MeanColor(), cache=False, device="cpu"
    )
    assert res["synthetic"]["k_measured"] == 3 and res["synthetic"]["n_train"] == 12
    assert res["input"]["synthetic"]["skipped"]["count"] == 1
    assert res["adjusted"]["test"]["n_sampled"] == 4
    same = score_irs(
        tmp_path / "snth", tmp_path / "train", tmp_path / "train", embedder=MeanColor(), cache=False, device="cpu"
    )
    assert same["adjusted"]["test"]["n_train"] == 6  # 50/50 split of the training set


def test_faiss_backend_agrees_when_installed():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(9)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    for metric in ("euclidean", "cosine"):
        np.testing.assert_array_equal(
            nearest_neighbors(train, queries, metric, backend="faiss", train_chunk=64),
            nearest_neighbors(train, queries, metric, device="cpu"),
        )


def test_faiss_backend_missing_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(InputError, match="pip install faiss-cpu"):
        nearest_neighbors(np.zeros((3, 2), np.float32), np.zeros((1, 2), np.float32), backend="faiss")
