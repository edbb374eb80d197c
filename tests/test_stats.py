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


# --- score JSONs built by hand: pairing, undefined scores, settings, malformed inputs ------------------------------


def _write(path, rows, metric="scs", **extra):
    path.write_text(json.dumps({"metric": metric, "embedder": {"id": "emb"}, "per_prompt": rows, **extra}))
    return path


def _rows(values, texts=None, n_images=20, metric="scs"):
    texts = texts or [f"prompt {i}" for i in range(len(values))]
    return [{"prompt_id": f"id{i}", "prompt": t, "n_images": n_images, metric: v}
            for i, (t, v) in enumerate(zip(texts, values, strict=True))]


def user_error(res) -> str:
    """The one-line message of a command that ended on a user error (exit 2, no traceback), whitespace folded."""
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    return " ".join(res.output.split())


def _compare(tmp_path, a, b, *options):
    from diffprobe.cli import app

    out = tmp_path / "cmp.json"
    res = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(out), "--n-boot", "200", *options])
    return res, (json.loads(out.read_text()) if res.exit_code == 0 else None)


def test_repeated_prompt_texts_are_refused_when_pairing_by_text(tmp_path):
    # two prompts share a text: pairing by text used to keep only the later one (n 6 -> 5)
    texts = ["a red cube", "a blue ball", "a red cube", "a green cone", "a tall tree", "a small dog"]
    a = _write(tmp_path / "a.json", _rows([80.0, 81.0, 82.0, 83.0, 84.0, 85.0], texts))
    b = _write(tmp_path / "b.json", _rows([81.0, 83.0, 85.0, 87.0, 89.0, 91.0], texts))
    res, _ = _compare(tmp_path, a, b)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    message = " ".join(res.output.split())
    assert "'a red cube' (ids id0, id2)" in message and "--pair-by id" in message
    res, data = _compare(tmp_path, a, b, "--pair-by", "id")
    assert res.exit_code == 0, res.output
    assert data["n_pairs"] == 6
    assert [(p["prompt"], p["A"], p["B"]) for p in data["pairs"]][:3] == [("id0", 80.0, 81.0), ("id1", 81.0, 83.0),
                                                                          ("id2", 82.0, 85.0)]
    assert data["difference"]["mean"] == pytest.approx(3.5)
    # pairing by position keeps repeats apart too
    res, data = _compare(tmp_path, a, b, "--pair-by", "order")
    assert res.exit_code == 0 and data["n_pairs"] == 6


def test_undefined_scores_are_refused_or_dropped(tmp_path):
    rows_a = _rows([80.0, None, 82.0, 83.0, 84.0, 85.0, 86.0])
    rows_a[1]["n_images"] = 1
    a = _write(tmp_path / "a.json", rows_a)
    b = _write(tmp_path / "b.json", _rows([81.0, 90.0, 84.0, 86.0, 88.0, 90.0, 92.0]))
    res, _ = _compare(tmp_path, a, b)
    assert res.exit_code == 2, res.output
    message = " ".join(res.output.split())
    assert "undefined for 1 paired prompt(s) of A and 0 of B" in message
    assert "'prompt 1'" in message and "--drop-undefined" in message
    res, data = _compare(tmp_path, a, b, "--drop-undefined")
    assert res.exit_code == 0, res.output
    assert data["n_pairs"] == 6 and data["dropped"]["undefined"] == 1
    assert "prompt 1" not in [p["prompt"] for p in data["pairs"]]
    assert data["difference"]["mean"] == pytest.approx(np.mean([1, 2, 3, 4, 5, 6]))
    assert "left out 1 prompt(s) with an undefined score: 'prompt 1'" in " ".join(res.output.split())
    # the dropped single-image prompt does not count as an images-per-prompt difference
    assert data["warnings"] == []


def test_min_attainable_wilcoxon_p_is_exact():
    from diffprobe.metrics.stats import min_pairs_for, min_wilcoxon_p

    for n in range(1, 9):  # all differences positive: scipy's exact two-sided p is the smallest attainable
        assert min_wilcoxon_p(n) == pytest.approx(stats.wilcoxon(np.arange(1.0, n + 1)).pvalue)
    assert min_wilcoxon_p(5) == 0.0625 and min_wilcoxon_p(6) == 0.03125
    assert min_pairs_for(0.05) == 6 and min_pairs_for(0.0625) == 6 and min_pairs_for(0.01) == 8


def test_too_few_prompts_for_significance_warns(tmp_path):
    a = _write(tmp_path / "a.json", _rows([80.0, 81.0, 82.0, 83.0, 84.0]))
    b = _write(tmp_path / "b.json", _rows([81.0, 83.0, 85.0, 87.0, 89.0]))
    res, data = _compare(tmp_path, a, b)
    assert res.exit_code == 0, res.output
    assert data["wilcoxon"]["p"] == pytest.approx(0.0625) and data["wilcoxon"]["min_attainable_p"] == 0.0625
    assert data["warnings"] == [
        "only 5 paired prompt(s) differ: the Wilcoxon signed-rank test cannot reach p < 0.05 with them (smallest "
        "possible two-sided p = 0.0625, when every difference has the same sign); compare at least 6 prompts"
    ]
    assert "cannot reach p < 0.05" in " ".join(res.output.split())
    a6 = _write(tmp_path / "a6.json", _rows([80.0, 81.0, 82.0, 83.0, 84.0, 85.0]))
    b6 = _write(tmp_path / "b6.json", _rows([81.0, 83.0, 85.0, 87.0, 89.0, 91.0]))
    res, data = _compare(tmp_path, a6, b6)
    assert data["warnings"] == [] and data["wilcoxon"]["min_attainable_p"] == 0.03125


def test_different_seeds_images_and_sampler_settings_warn(tmp_path):
    sampler = {"steps": 25, "scheduler": "default", "height": 64, "width": 64, "dtype": "float32",
               "generator_device": "cpu"}
    values = [80.0, 81.0, 82.0, 83.0, 84.0, 85.0]
    a = _write(tmp_path / "a.json", _rows(values), generation={"seeds": list(range(20)), "sampler": [sampler]})
    b = _write(tmp_path / "b.json", _rows([v + 1 for v in values], n_images=10),
               generation={"seeds": list(range(10)), "sampler": [{**sampler, "steps": 50}]})
    res, data = _compare(tmp_path, a, b)
    assert res.exit_code == 0, res.output
    assert data["warnings"] == [
        "A and B were generated with different seeds (A: 0-19; B: 0-9); paired prompts compare best over the "
        "same seeds",
        "images per prompt differ on 6 of 6 paired prompts (A: 20 (6 prompts); B: 10 (6 prompts)); a score over "
        "fewer images is noisier: generate the same seeds for both",
        "A and B were sampled with different settings: steps 25 (A) vs 50 (B)",
    ]
    # the same settings on both sides: no warning
    same = _write(tmp_path / "c.json", _rows([v + 1 for v in values]),
                  generation={"seeds": list(range(19, -1, -1)), "sampler": [sampler]})
    res, data = _compare(tmp_path, a, same)
    assert res.exit_code == 0 and data["warnings"] == []


def test_score_scs_records_seeds_and_sampler_of_a_run(tmp_path, monkeypatch):
    from diffprobe.generate import generate
    from diffprobe.metrics.scs import score_scs
    from diffprobe.spec import RunSpec

    spec = RunSpec.model_validate({"model": {"name": "shapes", "device": "cpu"}, "prompts": ["two red circles"],
                                   "seeds": [3, 1], "sampler": {"steps": 2}})
    generate(spec, tmp_path / "run", progress=False)
    result = score_scs(tmp_path / "run", "efficientnet-lite0", device="cpu", sensitivity=False)
    assert result["generation"]["seeds"] == [1, 3]
    assert [s["steps"] for s in result["generation"]["sampler"]] == [2]
    assert result["generation"]["sampler"][0]["height"] == 64


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "top level: Input should be a valid dictionary"),
        ('{"metric": "irs", "per_prompt": []}', "metric: Input should be 'scs' or 'clip_score'"),
        ('{"metric": "scs"}', "per_prompt: Field required"),
        ('{"metric": "scs", "per_prompt": {"a": 1}}', "per_prompt: Input should be a valid list"),
        ('{"metric": "scs", "per_prompt": []}', "per_prompt: List should have at least 1 item"),
        ('{"metric": "scs", "per_prompt": [7]}', "per_prompt[0]: Input should be a valid dictionary"),
        ('{"metric": "scs", "per_prompt": [{"prompt_id": "a"}]}', "per_prompt[0].scs: Field required"),
        ('{"metric": "scs", "per_prompt": [{"prompt_id": "a", "scs": "91.5"}]}',
         "per_prompt[0].scs: Input should be a valid number (got '91.5')"),
        ('{"metric": "scs", "per_prompt": [{"prompt_id": "a", "scs": true}]}',
         "per_prompt[0].scs: Input should be a valid number (got True)"),
        ('{"metric": "scs", "per_prompt": [{"prompt_id": "a", "scs": NaN}]}',
         "per_prompt[0].scs: Input should be a finite number (got nan)"),
        ('{"metric": "clip_score", "per_prompt": [{"prompt_id": "a", "clip_score": -Infinity}]}',
         "per_prompt[0].clip_score: Input should be a finite number (got -inf)"),
        ('{"metric": "scs", "per_prompt": [{"prompt_id": 3, "scs": 1.0}]}',
         "per_prompt[0].prompt_id: Input should be a valid string (got 3)"),
        ('{"metric": "scs", "per_prompt": [{"prompt_id": "a", "n_images": "20", "scs": 1.0}]}',
         "per_prompt[0].n_images: Input should be a valid integer (got '20')"),
        ('{"metric": "scs", "per_prompt": [{"prompt_id": "a", "scs": 1.0}, {"prompt_id": "b", "scs": 2.0}, '
         '{"prompt_id": "a", "scs": 3.0}]}', "lists prompt id 'a' 2 times (per_prompt rows 0, 2)"),
        ('{"metric": "scs", "per_prompt": [{"prompt_id": "a", "scs": 1}], "generation": {"seeds": ["0"]}}',
         "generation.seeds[0]: Input should be a valid integer"),
        ("[" * 100000 + "]" * 100000, "cannot read score JSON"),
        ("{not json", "cannot read score JSON"),
    ],
)
def test_malformed_score_json_is_an_input_error(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    good = _write(tmp_path / "good.json", _rows([80.0, 81.0, 82.0]))
    res, _ = _compare(tmp_path, bad, good)
    assert message in user_error(res)
    assert not (tmp_path / "cmp.json").exists()


def test_score_json_not_utf8_is_an_input_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"metric": "scs\xff"}')
    res, _ = _compare(tmp_path, bad, bad)
    assert "cannot read score JSON" in user_error(res)


def test_one_prompt_by_order_and_overflowing_scores_are_input_errors(tmp_path):
    one = _write(tmp_path / "one.json", _rows([80.0]))
    res, _ = _compare(tmp_path, one, one, "--pair-by", "order")
    assert "at least 2 paired prompts" in user_error(res)
    huge = _write(tmp_path / "huge.json", _rows([1e308, -1e308, 1e308]))
    small = _write(tmp_path / "small.json", _rows([1.0, 2.0, 3.0]))
    res, _ = _compare(tmp_path, huge, small)
    assert "too large" in user_error(res)
