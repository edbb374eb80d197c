"""Fréchet distance, KID, reference statistics, the TorchScript Inception path, and the extractor study."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn
from typer.testing import CliRunner

from diffprobe.embed import get_embedder
from diffprobe.errors import InputError
from diffprobe.metrics.extractors import agreement_matrix, consensus, evaluate_extractors, extractor_agreement
from diffprobe.metrics.fd import (
    StatsAccumulator,
    check_identity,
    frechet_distance,
    gaussian_stats,
    kid,
    read_stats,
    score_fd,
    write_stats,
)

# ---------------------------------------------------------------- the distance


def scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook computation: np.cov and scipy.linalg.sqrtm of the product."""
    m1, m2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(c1 @ c2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * root))


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_identical_sets_are_at_distance_zero(method):
    x = np.random.default_rng(0).normal(size=(300, 12))
    s = gaussian_stats(x)
    out = frechet_distance(s.mean, s.cov, s.mean, s.cov, method)
    assert out["fd"] == pytest.approx(0.0, abs=1e-9)
    assert out["mean_term"] == 0.0


def test_diagonal_gaussians_match_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    for method in ("eigh", "sqrtm"):
        out = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method)
        assert out["fd"] == pytest.approx(expected, rel=1e-10)
        assert out["mean_term"] == pytest.approx(((mu1 - mu2) ** 2).sum())


def test_rotated_gaussians_match_the_closed_form():
    # same rotation of two diagonal covariances: the distance does not change
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = 4.0 + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    out = frechet_distance(np.zeros(5), q @ np.diag(s1) @ q.T, np.full(5, 2 / np.sqrt(5)), q @ np.diag(s2) @ q.T)
    assert out["fd"] == pytest.approx(expected, rel=1e-9)


def test_agrees_with_a_direct_scipy_implementation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 20)) @ rng.normal(size=(20, 20))
    y = rng.normal(size=(350, 20)) @ rng.normal(size=(20, 20)) + 0.5
    sx, sy = gaussian_stats(x), gaussian_stats(y)
    np.testing.assert_allclose(sx.cov, np.cov(x, rowvar=False), rtol=1e-10)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(sx.mean, sx.cov, sy.mean, sy.cov, method)["fd"] == pytest.approx(scipy_fd(x, y),
                                                                                                rel=1e-8)


def test_rank_deficient_covariances_give_a_finite_distance():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(15, 64)) + 0.1
    sx, sy = gaussian_stats(x), gaussian_stats(y)
    out = frechet_distance(sx.mean, sx.cov, sy.mean, sy.cov)
    assert np.isfinite(out["fd"]) and out["fd"] > 0
    # tr sqrt(C1 C2) from the eigenvalues of the (non-symmetric) product itself
    eig = np.clip(np.linalg.eigvals(sx.cov @ sy.cov).real, 0, None)
    expected = np.sum((sx.mean - sy.mean) ** 2) + np.trace(sx.cov) + np.trace(sy.cov) - 2 * np.sqrt(eig).sum()
    assert out["fd"] == pytest.approx(expected, rel=1e-6)
    legacy = frechet_distance(sx.mean, sx.cov, sy.mean, sy.cov, "sqrtm")
    assert np.isfinite(legacy["fd"]) and legacy["fd"] == pytest.approx(out["fd"], rel=1e-3)


def test_streaming_statistics_stay_accurate_with_a_large_offset():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1000, 7)) + 1e6
    acc = StatsAccumulator(7)
    for start in range(0, 1000, 128):
        acc.update(x[start : start + 128])
    s = acc.compute()
    np.testing.assert_allclose(s.cov, np.cov(x - 1e6, rowvar=False), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12)
    with pytest.raises(InputError):
        gaussian_stats(x[:1])


# ---------------------------------------------------------------- KID


def brute_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b, strict=True)) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_brute_force_loop():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 0.7
    out = kid(x, y, subsets=3, subset_size=12)  # each subset is the whole set, in some order
    assert out["kid"] == pytest.approx(brute_mmd2(x, y), rel=1e-10)
    assert out["kid_sd"] == pytest.approx(0.0, abs=1e-9)
    # subsets of 6 out of 12: every subset's value is the brute force on the rows it drew
    rng2 = np.random.default_rng(0)
    expected = []
    for _ in range(4):
        a = x[np.sort(rng2.choice(12, 6, replace=False))]
        b = y[np.sort(rng2.choice(12, 6, replace=False))]
        expected.append(brute_mmd2(a, b))
    out = kid(x, y, subsets=4, subset_size=6, seed=0)
    assert out["kid"] == pytest.approx(np.mean(expected), rel=1e-10)
    assert out["kid_sd"] == pytest.approx(np.std(expected, ddof=1), rel=1e-8)


def test_kid_is_unbiased_near_zero_for_one_distribution():
    rng = np.random.default_rng(7)
    same = kid(rng.normal(size=(600, 8)), rng.normal(size=(600, 8)), subsets=20, subset_size=200)
    shifted = kid(rng.normal(size=(600, 8)), rng.normal(size=(600, 8)) + 0.5, subsets=20, subset_size=200)
    assert abs(same["kid"]) < 3 * same["kid_sd"] / np.sqrt(20) + 1e-3
    assert shifted["kid"] > 10 * abs(same["kid"])
    assert kid(np.zeros((5, 3)), np.ones((50, 3)), subsets=2, subset_size=100)["subset_size"] == 5


# ---------------------------------------------------------------- statistics files


def test_stats_round_trip_and_identity_refusal(tmp_path):
    x = np.random.default_rng(8).normal(size=(30, 5)).astype(np.float32)
    s = gaussian_stats(x, keep_features=True)
    ident = {"id": "pixels|none|x", "name": "pixels"}
    path = write_stats(tmp_path / "ref.npz", s, ident)
    back, saved = read_stats(path)
    np.testing.assert_array_equal(back.mean, s.mean)
    np.testing.assert_array_equal(back.cov, s.cov)
    np.testing.assert_array_equal(back.features, x)
    assert back.count == 30 and saved == ident
    check_identity(saved, dict(ident), path)
    with pytest.raises(InputError, match="computed with embedder 'pixels"):
        check_identity(saved, {"id": "random-projection|...", "name": "random-projection"}, path)
    np.savez(tmp_path / "other.npz", mu=s.mean, sigma=s.cov)  # pytorch-fid style: no identity
    with pytest.raises(InputError, match="not a diffprobe statistics file"):
        read_stats(tmp_path / "other.npz")
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(InputError):
        read_stats(tmp_path / "bad.npz")


def _folder(path, seed: int, n: int, shift: int = 0, size: int = 20):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(rng.integers(0, 200, (size, size, 3)) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path / f"{i:03d}.png")
    return path


def test_score_fd_on_folders_and_from_saved_stats(tmp_path):
    a = _folder(tmp_path / "a", 0, 12)
    b = _folder(tmp_path / "b", 1, 10, shift=40)
    first = score_fd(a, b, embedder="random-projection", save_stats=tmp_path / "b.npz", kid_subset_size=8, cache=None)
    assert not first["is_fid"] and "not comparable with published FID" in first["fid_note"]
    assert any("rank-deficient" in w for w in first["warnings"])  # 12 images, 512-d features
    feats_a = get_embedder("random-projection").embed([Image.open(p) for p in sorted(a.iterdir())])
    feats_b = get_embedder("random-projection").embed([Image.open(p) for p in sorted(b.iterdir())])
    sa, sb = gaussian_stats(feats_a), gaussian_stats(feats_b)
    assert first["fd"] == pytest.approx(frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)["fd"], rel=1e-9)
    again = score_fd(a, tmp_path / "b.npz", embedder="random-projection", kid_subset_size=8, cache=None)
    assert again["fd"] == pytest.approx(first["fd"], rel=1e-12)
    assert again["kid"]["kid"] == pytest.approx(first["kid"]["kid"], rel=1e-12)
    with pytest.raises(InputError, match="computed with embedder"):
        score_fd(a, tmp_path / "b.npz", embedder="pixels", cache=None)
    with pytest.raises(InputError, match="already a statistics file"):
        score_fd(a, tmp_path / "b.npz", embedder="random-projection", save_stats=tmp_path / "c.npz", cache=None)
    with pytest.raises(InputError, match="--inception"):
        score_fd(a, b, embedder="random-projection", resize="legacy-tensorflow", cache=None)


def test_cli_fd(tmp_path):
    from diffprobe.cli import app

    a = _folder(tmp_path / "a", 0, 8)
    b = _folder(tmp_path / "b", 1, 8, shift=30)
    out, stats = tmp_path / "fd.json", tmp_path / "ref.npz"
    res = CliRunner().invoke(app, ["score", "fd", str(a), "--ref", str(b), "--embedder", "random-projection",
                                   "--save-stats", str(stats), "--kid-subsets", "5", "--kid-subset-size", "6",
                                   "--out", str(out), "--no-cache"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["metric"] == "fd" and result["kid"]["subsets"] == 5 and stats.is_file()
    assert "not comparable with published FID" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["score", "fd", str(a), "--ref", str(stats), "--embedder", "pixels",
                                   "--out", str(out), "--no-cache"])
    assert res.exit_code == 2 and "computed with embedder" in res.output


# ---------------------------------------------------------------- the TorchScript Inception path


class TinyLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 5, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.tanh(self.conv(x)))  # [B, 6, 1, 1], as the real file's [B, 2048, 1, 1]


class TinyInception(nn.Module):
    """The call signature of inception-2015-12-05.pt: ``layers`` on normalised 299x299 input, and
    ``forward(img, return_features)`` on [0, 255] images of any size that resizes inside."""

    def __init__(self):
        super().__init__()
        self.layers = TinyLayers()
        self.fc = nn.Linear(6, 10)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.layers((x - 128.0) / 128.0).flatten(1)
        return feats if return_features else self.fc(feats)


@pytest.fixture
def tiny_inception(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(TinyInception().eval()).save(str(path))
    return path


def test_torchscript_inception_calls_the_network_like_clean_fid(tiny_inception):
    net = torch.jit.load(str(tiny_inception))
    rng = np.random.default_rng(9)
    images = [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(3)]
    # clean: per-channel float bicubic to 299 in PIL, (x - 128) / 128, then layers
    manual = []
    for im in images:
        arr = np.asarray(im)
        chans = [np.asarray(Image.fromarray(arr[:, :, c].astype(np.float32)).resize((299, 299), Image.BICUBIC))
                 for c in range(3)]
        manual.append(torch.from_numpy(np.stack(chans)))
    with torch.no_grad():
        clean_ref = net.layers((torch.stack(manual) - 128) / 128).flatten(1).numpy()
        raw = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() for im in images])
        tf_ref = net(raw, return_features=True).numpy()
        pt_ref = net.layers((F.interpolate(raw, size=(299, 299), mode="bilinear") - 128) / 128).flatten(1).numpy()
    ids = set()
    for mode, ref in (("clean", clean_ref), ("legacy-tensorflow", tf_ref), ("legacy-pytorch", pt_ref)):
        emb = get_embedder("inception-torchscript", weights=tiny_inception, resize=mode, device="cpu")
        assert emb.dim == 6 and emb.describe()["resize"] == mode
        np.testing.assert_allclose(emb.embed(images), ref, rtol=1e-4, atol=1e-5)
        ids.add(emb.id)
    assert len(ids) == 3  # the resize mode is part of the feature cache key
    mixed = [images[0], Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))]
    legacy = get_embedder("inception-torchscript", weights=tiny_inception, resize="legacy-tensorflow", device="cpu")
    np.testing.assert_allclose(legacy.embed(mixed), np.concatenate([legacy.embed([im]) for im in mixed]), rtol=1e-5)
    by_path = get_embedder(f"inception-torchscript:{tiny_inception}", device="cpu")
    assert by_path.id == get_embedder("inception-torchscript", weights=tiny_inception, device="cpu").id


def test_torchscript_inception_refuses_other_files(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(InputError, match="not a TorchScript file"):
        get_embedder("inception-torchscript", weights=tmp_path / "weights.pt")
    torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "linear.pt"))
    with pytest.raises(InputError, match="'layers'"):
        get_embedder("inception-torchscript", weights=tmp_path / "linear.pt")
    with pytest.raises(InputError, match="resize mode"):
        get_embedder("inception-torchscript", weights=tmp_path / "linear.pt", resize="nearest")


def test_fid_with_the_torchscript_file(tmp_path, tiny_inception):
    from diffprobe.cli import app

    a = _folder(tmp_path / "a", 0, 6, size=24)
    b = _folder(tmp_path / "b", 1, 6, shift=50, size=24)
    out = tmp_path / "fid.json"
    res = CliRunner().invoke(app, ["score", "fd", str(a), "--ref", str(b), "--inception", str(tiny_inception),
                                   "--resize", "legacy-tensorflow", "--kid-subset-size", "4", "--out", str(out),
                                   "--no-cache", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["is_fid"] and result["resize"] == "legacy-tensorflow" and result["fid_note"] is None
    assert "FID (legacy-tensorflow resize)" in res.output
    with pytest.raises(InputError, match="drop --embedder pixels"):
        score_fd(a, b, embedder="pixels", inception=tiny_inception, cache=None)


# ---------------------------------------------------------------- the extractor study


def test_consensus_and_agreement_by_hand():
    nn_idx = np.array([[0, 1, 2, 3], [0, 1, 5, 4], [0, 2, 5, 6]])
    truth, votes = consensus(nn_idx, 2)
    assert truth.tolist() == [0, 1, 5, -1] and votes.tolist() == [3, 2, 2, 1]
    np.testing.assert_allclose(agreement_matrix(nn_idx), [[1, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 1]])
    out = extractor_agreement({"a": nn_idx[0], "b": nn_idx[1], "c": nn_idx[2]}, n_train=7)
    assert out["min_agree"] == 2 and out["n_consensus"] == 3
    assert [r["agreement"] for r in out["per_extractor"]] == pytest.approx([2 / 3, 1.0, 2 / 3])
    assert [r["real_irs"]["k_measured"] for r in out["per_extractor"]] == [4, 4, 4]
    # against the consensus of the two others (both must agree): a 1/2, b 1/1, c 1/2
    assert out["min_agree_others"] == 2
    assert [r["agreement_others"] for r in out["per_extractor"]] == pytest.approx([0.5, 1.0, 0.5])
    assert [r["n_consensus_others"] for r in out["per_extractor"]] == [2, 1, 2]
    assert out["vote_histogram"] == {"1": 1, "2": 2, "3": 1}
    with pytest.raises(InputError, match="strict majority"):
        consensus(nn_idx, 1)


def test_planted_truth_is_recovered():
    rng = np.random.default_rng(10)
    N, n = 300, 80
    truth = rng.choice(N, n, replace=False)
    train, test = {}, {}
    for name, noise in (("good1", 0.05), ("good2", 0.05), ("good3", 0.05), ("noisy", 1.5), ("random", None)):
        t = rng.normal(size=(N, 16))
        train[name] = t
        test[name] = rng.normal(size=(n, 16)) if noise is None else t[truth] + noise * rng.normal(size=(n, 16))
    out = evaluate_extractors(train, test, device="cpu")
    assert out["min_agree"] == 3 and out["n_consensus"] == n
    assert out["pseudo_truth"] == truth.tolist()
    agree = {r["extractor"]: r["agreement"] for r in out["per_extractor"]}
    assert agree["good1"] == agree["good2"] == agree["good3"] == 1.0
    assert agree["random"] < 0.05 and 0.05 < agree["noisy"] < 0.95
    others = {r["extractor"]: r["agreement_others"] for r in out["per_extractor"]}
    assert others["good1"] == 1.0 and others["random"] < 0.05
    names = out["extractors"]
    m = np.array(out["pairwise_agreement"])
    assert m[names.index("good1"), names.index("good2")] == 1.0
    assert m[names.index("good1"), names.index("random")] == pytest.approx(agree["random"])
    good_irs = next(r for r in out["per_extractor"] if r["extractor"] == "good1")["real_irs"]
    assert good_irs["k_measured"] == n


def test_cli_extractors_on_copied_images(tmp_path):
    from diffprobe.cli import app

    train = _folder(tmp_path / "train", 0, 10)
    test = tmp_path / "test"
    test.mkdir()
    for j, i in enumerate((7, 2, 5)):  # held-out images that are copies of training images 7, 2, 5
        (test / f"q{j}.png").write_bytes((train / f"{i:03d}.png").read_bytes())
    out = tmp_path / "ext.json"
    res = CliRunner().invoke(app, ["score", "extractors", "--train", str(train), "--test", str(test), "--embedders",
                                   "pixels,random-projection", "--out", str(out), "--no-cache"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["pseudo_truth"] == [7, 2, 5] and result["consensus_rate"] == 1.0
    assert [r["agreement"] for r in result["per_extractor"]] == [1.0, 1.0]
    assert "pairwise agreement" in res.output
    res = CliRunner().invoke(app, ["score", "extractors", "--train", str(train), "--test", str(test), "--embedders",
                                   "pixels,random-projection", "--consensus", "1", "--out", str(out), "--no-cache"])
    assert res.exit_code == 2 and "strict majority" in res.output


# ---------------------------------------------------------------- extractors for the study


def test_pixel_and_random_projection_baselines():
    rng = np.random.default_rng(11)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(3)]  # grayscale
    pixels = get_embedder("pixels", device="cpu")
    manual = np.stack([np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32)
                       .transpose(2, 0, 1).ravel() / 255 for im in images])
    np.testing.assert_allclose(pixels.embed(images), manual, atol=1e-6)
    proj = get_embedder("random-projection", device="cpu")
    assert proj.dim == 512 and "seed0" in proj.id
    expected = manual @ get_embedder("random-projection", device="cpu").matrix.numpy()  # same seed, same matrix
    np.testing.assert_allclose(proj.embed(images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["efficientnet-lite1", "efficientnet-lite2"])
def test_efficientnet_lite1_lite2_load_strictly(variant):
    from diffprobe.embed.effnet import LITE_VARIANTS, EfficientNetLite, lite_weights_path

    state = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
    assert set(state) == set(EfficientNetLite(LITE_VARIANTS[variant][0]).state_dict())
    emb = get_embedder(f"{variant}@64", device="cpu")
    assert emb.id.startswith(f"{variant}|sha256:") and emb.preprocess.resize == 64
    feats = emb.embed([Image.new("RGB", (28, 28), (120, 30, 200))])
    assert feats.shape == (1, 1280) and np.isfinite(feats).all()
    assert get_embedder(variant, device="cpu").preprocess.resize == LITE_VARIANTS[variant][1]
    with pytest.raises(InputError, match="after @"):
        get_embedder(f"{variant}@tiny")
