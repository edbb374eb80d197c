"""Paired statistics for model comparison, and the compare command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from diffprobe.errors import InputError
from diffprobe.metrics.stats import bootstrap_mean_ci, compare_scores, rank_biserial


def _scores(values, prefix="p"):
    return {f"{prefix}{i}": float(v) for i, v in enumerate(values)}


def test_compare_matches_scipy_and_hand_values():
    rng = np.random.default_rng(0)
    a = rng.normal(88.9, 7.1, 100)
    b = a + rng.normal(4.5, 3.0, 100)
    out = compare_scores(_scores(a), _scores(b), n_boot=2000)
    assert out["n_pairs"] == 100
    assert out["wilcoxon"]["p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert out["ks_2samp"]["p"] == pytest.approx(stats.ks_2samp(a, b).pvalue)
    d = b - a
    assert out["difference"]["mean"] == pytest.approx(d.mean())
    assert out["effect_size"]["cohens_dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    ci = out["difference"]["bootstrap_ci"]
    assert ci["low"] < d.mean() < ci["high"]
    # the percentile CI is close to the normal-theory CI of a mean for this sample size
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert ci["low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.1)
    assert out["A"]["sd"] == pytest.approx(a.std(ddof=0))
    assert out["A"]["normality"]["kstest_standard_normal_p"] < 1e-10  # the degenerate parity check


def test_rank_biserial_by_hand():
    # |d| ranks: 1 -> 1, -2 -> 2, 3 -> 3, zero dropped: (1 + 3 - 2) / 6
    assert rank_biserial(np.array([1.0, -2.0, 3.0, 0.0])) == pytest.approx(2 / 6)
    assert rank_biserial(np.array([1.0, 2.0])) == 1.0


def test_bootstrap_ci_seeded():
    d = np.arange(10.0)
    assert bootstrap_mean_ci(d, 500, seed=3) == bootstrap_mean_ci(d, 500, seed=3)
    low, high = bootstrap_mean_ci(np.full(8, 2.5), 500)
    assert low == high == 2.5


def test_prompt_sets_must_match():
    a = _scores([1, 2, 3, 4])
    b = {"p1": 2.5, "p2": 3.5, "p3": 4.5, "other": 9.0}
    with pytest.raises(InputError, match="prompt sets differ"):
        compare_scores(a, b)
    out = compare_scores(a, b, intersection=True, n_boot=200)
    assert out["n_pairs"] == 3 and out["dropped"] == {"only_A": 1, "only_B": 1}
    assert out["difference"]["mean"] == pytest.approx(0.5)
    by_order = compare_scores(a, b, by_order=True, n_boot=200)
    assert by_order["n_pairs"] == 4


def test_identical_scores():
    a = _scores([90.0, 91.0, 92.0])
    out = compare_scores(a, dict(a), n_boot=100)
    assert out["wilcoxon"]["p"] == 1.0 and out["difference"]["ties"] == 3


def _result_json(path, values, embedder_id="emb", prompts=None):
    prompts = prompts or [f"prompt {i}" for i in range(len(values))]
    rows = [
        {"prompt_id": f"id{i}", "prompt": p, "n_images": 20, "scs": v}
        for i, (p, v) in enumerate(zip(prompts, values, strict=True))
    ]
    path.write_text(json.dumps({"metric": "scs", "embedder": {"id": embedder_id}, "per_prompt": rows}))
    return path


def test_cli_compare(tmp_path):
    from diffprobe.cli import app

    rng = np.random.default_rng(1)
    base = rng.normal(90, 5, 50)
    a = _result_json(tmp_path / "a.json", base.tolist())
    b = _result_json(tmp_path / "b.json", (base + 2.8 + rng.normal(0, 1, 50)).tolist())
    out = tmp_path / "cmp.json"
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out), "--n-boot", "500"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["n_pairs"] == 50 and data["wilcoxon"]["p"] < 1e-6 and data["difference"]["mean"] > 2
    # different prompt texts (a LoRA trigger word) pair only by order
    c = _result_json(tmp_path / "c.json", base.tolist(), prompts=[f"prompt {i} in the style of TOK" for i in range(50)])
    res = runner.invoke(app, ["compare", str(a), str(c), "--out", str(out)])
    assert res.exit_code == 2 and "prompt sets differ" in res.output
    res = runner.invoke(app, ["compare", str(a), str(c), "--pair-by", "order", "--out", str(out), "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    e = _result_json(tmp_path / "e.json", base.tolist(), embedder_id="other")
    res = runner.invoke(app, ["compare", str(a), str(e), "--out", str(out)])
    assert res.exit_code == 2 and "different embedders" in res.output


def test_cli_compare_two_folders_scores_them(tmp_path, monkeypatch):
    from PIL import Image

    from diffprobe.cli import app

    monkeypatch.setenv("DIFFPROBE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(2)
    for model, spread in (("a", 80), ("b", 10)):  # b's images vary less per prompt
        for p in range(3):
            d = tmp_path / model / f"prompt{p}"
            d.mkdir(parents=True)
            base = rng.integers(60, 180, 3)
            for i in range(3):
                color = np.clip(base + rng.integers(-spread, spread + 1, 3), 0, 255)
                Image.new("RGB", (32, 32), tuple(int(c) for c in color)).save(d / f"{i}.png")
    out = tmp_path / "cmp.json"
    res = CliRunner().invoke(
        app,
        [
            "compare",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--embedder",
            "efficientnet-lite0",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--n-boot",
            "200",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["metric"] == "scs" and data["n_pairs"] == 3
    assert data["embedder"]["name"] == "efficientnet-lite0"
    assert [p["prompt"] for p in data["pairs"]] == ["prompt0", "prompt1", "prompt2"]
