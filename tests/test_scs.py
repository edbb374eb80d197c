"""Semantic Consistency Score: parity with the formula, sensitivity curve, folders, runs and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from PIL import Image
from test_embed import MeanColor
from typer.testing import CliRunner

from diffprobe.embed import FeatureCache
from diffprobe.errors import InputError
from diffprobe.metrics.scs import score_scs, scs, scs_batch, scs_per_prompt, scs_sensitivity, summarize


def scs_reference(features) -> float:
    """Direct transcription of the official formula: mean over i < j of max(100 * cos, 0)."""
    total, pairs = 0.0, 0
    for i, j in itertools.combinations(range(len(features)), 2):
        a, b = features[i], features[j]
        cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        total += max(100.0 * cos, 0.0)
        pairs += 1
    return total / pairs


def test_scs_by_hand():
    # pairwise cosines 0, 1/sqrt(2), 1/sqrt(2)
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    assert scs(feats) == pytest.approx((0 + 2 * 100 / math.sqrt(2)) / 3)


def test_scs_matches_transcription_including_negative_pairs():
    rng = np.random.default_rng(1)
    for n in (2, 3, 7, 20):
        feats = rng.normal(size=(n, 5))  # random directions: many negative cosines, so the clamp matters
        assert scs(feats) == pytest.approx(scs_reference(feats), abs=1e-9)


def test_clamp_is_per_pair_not_after_the_mean():
    feats = np.array([[1.0, 0.0], [-1.0, 0.1], [1.0, 0.2]])
    cos = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in itertools.combinations(feats, 2)]
    per_pair = np.mean([max(100 * c, 0) for c in cos])
    after_mean = max(100 * np.mean(cos), 0)
    assert per_pair != pytest.approx(after_mean)
    assert scs(feats) == pytest.approx(per_pair)
    assert scs(feats, clamp=False) == pytest.approx(100 * np.mean(cos))


def test_batched_equals_per_prompt_and_groups_of_unequal_size():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(4, 6, 8)) + 2.0
    np.testing.assert_allclose(scs_batch(feats), [scs_reference(f) for f in feats], atol=1e-9)
    flat = rng.normal(size=(10, 8)) + 1.0
    out = scs_per_prompt(flat, {"a": [0, 1, 2], "b": [3, 4, 5, 6, 7], "c": [8, 9], "one": [5]})
    assert out["one"] is None
    for g, idx in {"a": [0, 1, 2], "b": [3, 4, 5, 6, 7], "c": [8, 9]}.items():
        assert out[g] == pytest.approx(scs_reference(flat[idx]), abs=1e-9)


def test_summary_uses_population_sd():
    s = summarize([90.0, 94.0])
    assert s["mean"] == 92.0 and s["sd"] == 2.0 and s["sd_sample"] == pytest.approx(math.sqrt(8))


def test_sensitivity_curve():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 16)) + 1.5
    groups = {"p0": list(range(20)), "p1": list(range(20, 40))}
    sens = scs_sensitivity(feats, groups, n_boot=300, seed=0)
    curve = {c["n"]: c for c in sens["curve"]}
    assert sorted(curve) == list(range(2, 21))
    # at N' = N every subset is the full set: no spread, nothing to extrapolate, and the mean is the full SCS
    assert curve[20]["sd_subsets"] == pytest.approx(0.0, abs=1e-9) and curve[20]["sd_per_prompt"] is None
    full = np.mean([scs(feats[idx]) for idx in groups.values()])
    assert curve[20]["mean_scs"] == pytest.approx(full)
    # SCS is a mean of pair scores, so subsets are unbiased and their spread shrinks with N'
    assert curve[5]["mean_scs"] == pytest.approx(full, abs=1.0)
    assert curve[2]["sd_per_prompt"] > curve[5]["sd_per_prompt"] > curve[15]["sd_per_prompt"]
    assert curve[10]["sd_per_prompt"] == pytest.approx(curve[10]["sd_subsets"] / np.sqrt(10 / 19))
    usable = [c for c in sens["curve"] if c["sd_per_prompt"] is not None]
    assert sens["suggested_n"] == next((c["n"] for c in usable if c["sd_per_prompt"] <= 1.0), None)
    const = np.median([c["sd_per_prompt"] * np.sqrt(c["n"]) for c in usable])
    assert sens["projected_n"] == int(np.ceil(const**2))
    again = scs_sensitivity(feats, groups, n_boot=300, seed=0)
    assert again == sens


def test_sensitivity_estimates_the_sd_over_fresh_seeds():
    """From 20 images of one prompt, sd_per_prompt predicts the SD of SCS over n independent new images."""
    rng = np.random.default_rng(0)
    population = rng.normal(size=32) + 0.8 * rng.normal(size=(20000, 32))
    for n in (4, 8):
        truth = np.std([scs(population[rng.choice(20000, n, replace=False)]) for _ in range(800)])
        estimates = []
        for rep in range(8):
            sample = population[rng.choice(20000, 20, replace=False)]
            sens = scs_sensitivity(sample, {"p": list(range(20))}, n_values=[n], n_boot=300, seed=rep)
            estimates.append(sens["curve"][0]["sd_per_prompt"])
        assert np.mean(estimates) == pytest.approx(truth, rel=0.15)


def _grouped_folder(root, n_prompts=3, per_prompt=4, single=None):
    rng = np.random.default_rng(0)
    for p in range(n_prompts):
        d = root / f"prompt{p}"
        d.mkdir(parents=True)
        (d / "prompt.txt").write_text(f"prompt number {p}")
        count = 1 if p == single else per_prompt
        base = rng.integers(0, 200, 3)
        for i in range(count):
            Image.new("RGB", (24, 24), tuple(int(c) for c in base + 10 * i)).save(d / f"{i}.png")
    return root


def test_score_scs_folder_with_cache_and_bad_files(tmp_path):
    root = _grouped_folder(tmp_path / "imgs")
    (root / "prompt0" / "broken.png").write_bytes(b"\x89PNG garbage")
    (root / "prompt1" / "notes.md").write_text("hello")
    emb = MeanColor()
    cache = FeatureCache(tmp_path / "cache.sqlite")
    result = score_scs(root, emb, cache=cache, n_boot=20)
    assert result["input"]["skipped"]["count"] == 2 and result["input"]["source"] == "subfolders"
    assert cache.computed == 12 and emb.images_seen == 12
    assert [r["prompt"] for r in result["per_prompt"]] == ["prompt number 0", "prompt number 1", "prompt number 2"]
    # parity with the transcription on the embedder's own features
    from diffprobe.metrics.images import load_image_set

    images = load_image_set(root)
    feats = images.features(emb, cache=cache)
    for row in result["per_prompt"]:
        idx = images.groups()[row["prompt_id"]]
        assert row["scs"] == pytest.approx(scs_reference(feats[idx].astype(np.float64)), abs=1e-9)
    # second scoring: nothing is computed
    cache.computed = 0
    again = score_scs(root, emb, cache=cache, n_boot=20)
    assert cache.computed == 0 and emb.images_seen == 12
    assert again["summary"] == result["summary"]
    assert result["embedder"]["id"] == emb.id and "numpy" in result["provenance"]["versions"]
    with pytest.raises(InputError, match="bad file"):
        score_scs(root, emb, cache=False, strict=True)


def test_single_image_prompts(tmp_path):
    root = _grouped_folder(tmp_path / "imgs", single=1)
    result = score_scs(root, MeanColor(), cache=False, sensitivity=False)
    row = {r["prompt_id"]: r for r in result["per_prompt"]}
    assert row["prompt1"]["scs"] is None and result["summary"]["n_prompts"] == 2
    assert any("single image" in w for w in result["warnings"])
    solo = _grouped_folder(tmp_path / "solo", n_prompts=2, single=0, per_prompt=1)
    with pytest.raises(InputError, match="undefined for every prompt"):
        score_scs(solo, MeanColor(), cache=False)


def test_manifest_grouping_and_errors(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (10, 10), (i * 40 + 10, 5, 5)).save(root / f"{i}.png")
        rows.append({"file": f"{i}.png", "prompt": "red" if i < 3 else "dark", "seed": i})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = score_scs(root, MeanColor(), cache=False, sensitivity=False)
    assert result["input"]["source"] == "manifest"
    assert [(r["prompt_id"], r["n_images"]) for r in result["per_prompt"]] == [("red", 3), ("dark", 3)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no readable images"):
        score_scs(tmp_path / "empty", MeanColor())
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(InputError, match="grouped per prompt"):
        score_scs(flat, MeanColor(), cache=False)


def test_run_directory_cache_lives_in_the_run(tmp_path):
    from diffprobe.spec import RunSpec
    from diffprobe.store import NewSample, create_run

    run = tmp_path / "run"
    store = create_run(run, RunSpec(prompts=["a cat", "a dog"], seeds=[1, 2, 3]))
    items = []
    for p, prompt in enumerate(["a cat", "a dog"]):
        for seed in (1, 2, 3):
            image = Image.new("RGB", (16, 16), (50 * p + seed, 20 * seed, 0))
            items.append(
                NewSample(
                    key=f"{prompt}-{seed}",
                    prompt=prompt,
                    seed=seed,
                    image=image,
                    guidance={"name": "cfg", "scale": 7.5},
                    provenance={},
                )
            )
    store.add(items)
    store.close()
    emb = MeanColor()
    result = score_scs(run, emb, n_boot=10)
    assert result["input"]["source"] == "run" and (run / "features.sqlite").is_file()
    assert [r["prompt"] for r in result["per_prompt"]] == ["a cat", "a dog"]
    score_scs(run, emb, n_boot=10)
    assert emb.images_seen == 6  # second scoring read the run's cache


def test_cli_scs_and_bad_input(tmp_path, monkeypatch):
    from diffprobe.cli import app

    monkeypatch.setenv("DIFFPROBE_CACHE", str(tmp_path / "cache"))
    root = _grouped_folder(tmp_path / "imgs", n_prompts=2, per_prompt=3)
    out = tmp_path / "scs.json"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "score",
            "scs",
            str(root),
            "--embedder",
            "efficientnet-lite0",
            "--out",
            str(out),
            "--n-boot",
            "5",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["embedder"]["name"] == "efficientnet-lite0" and len(data["per_prompt"]) == 2
    assert 0 <= data["summary"]["mean"] <= 100
    assert (tmp_path / "cache" / "features.sqlite").is_file()
    res = runner.invoke(app, ["score", "scs", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output
