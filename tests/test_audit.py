"""``diffprobe audit`` on the shapes model at tiny sizes: grid expansion, config errors, the summary's numbers
against the statistics functions called directly, skipped measures, dry run and resume after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from report_helpers import HOSTILE_PROMPT, TINY_AUDIT, write_config
from scipy import stats
from typer.testing import CliRunner

from diffprobe.errors import InputError


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    from diffprobe.audit import run_audit

    folder = tmp_path_factory.mktemp("audit")
    config = write_config(folder)
    result = run_audit(config, folder / "out", progress=False)
    return config, result


def test_arms_expand_lists_one_arm_per_value(tmp_path):
    from diffprobe.audit import AuditConfig, expand

    config = AuditConfig.model_validate({
        "models": ["shapes"], "prompts": "shapes-eval",
        "guidance": [{"name": "cfg", "scale": 3.5}, {"name": "scfg", "scale": [2, 3.5, 5]},
                     {"name": "concept", "label": "cg", "scale": 3.5, "concept_scale": [1, 7.5],
                      "concepts": ["a red circle", "a blue square"]}]})
    arms = expand(config)
    assert [a[0] for a in arms] == ["cfg", "scfg scale=2", "scfg scale=3.5", "scfg scale=5", "cg concept_scale=1",
                                    "cg concept_scale=7.5"]
    assert [a[2]["params"].get("scale") for a in arms] == [3.5, 2, 3.5, 5, 3.5, 3.5]
    assert arms[5][2]["params"]["concepts"] == ["a red circle", "a blue square"]  # a list-valued option, not a sweep
    assert [a[3]["value"] for a in arms[1:4]] == [2, 3.5, 5]
    two = AuditConfig.model_validate({"models": ["shapes", {"name": "shapes", "label": "again"}],
                                      "prompts": "shapes-eval", "guidance": [{"name": "cfg"}]})
    assert [a[0] for a in expand(two)] == ["shapes / cfg", "again / cfg"]


@pytest.mark.parametrize(("text", "expected"), [
    ("models: [shapes]\nprompts: shapes-eval\nguidance:\n  - {name: cfg}\nmeasurez: {}\n",
     ["measurez (line 5)", "allowed: name, models, prompts"]),
    ("models:\n  - name: shapes\n    loras: x.safetensors\nprompts: shapes-eval\nguidance: [{name: cfg}]\n",
     ["models.0.loras (line 3)", "allowed: name, label, family, dtype, device, lora"]),
    ("models: [shapes]\nprompts: shapes-eval\nguidance: [{name: cfg}]\nmeasures:\n  composition: {judge: 3, x: 1}\n",
     ["measures.composition", "line 5"]),
    ("models: [shapes]\nprompts: shapes-eval\nguidance: []\n", ["guidance (line 3)", "at least 1"]),
    ("models: [shapes]\nprompts: shapes-eval\nper_category: 0\nguidance: [{name: cfg}]\n",
     ["per_category (line 3)", "greater than or equal to 1"]),
    ("models: [shapes\n", ["invalid YAML", "line 2"]),
])
def test_config_errors_name_the_field_its_line_and_what_is_allowed(tmp_path, text, expected):
    from diffprobe.audit import load_config

    with pytest.raises(InputError) as err:
        load_config(write_config(tmp_path, text))
    for part in expected:
        assert part in str(err.value), str(err.value)


def test_unknown_baseline_lists_the_arms(tmp_path):
    from diffprobe.audit import load_config, plan_arms

    path = write_config(tmp_path, TINY_AUDIT + "baseline: nope\n")
    config, _ = load_config(path)
    with pytest.raises(InputError, match=r"baseline 'nope' is not an arm; arms: 'cfg', 'scfg scale=2', 'scfg scale=4'"):
        plan_arms(config, path, tmp_path / "out")


def test_select_prompts_keeps_the_first_of_each_category():
    from diffprobe.audit import select_prompts
    from diffprobe.prompts import Prompt

    items = [Prompt(f"p{i}", {"category": "ab"[i % 2]}) for i in range(7)]
    assert [p.text for p in select_prompts(items, 2)] == ["p0", "p1", "p2", "p3"]
    assert select_prompts(items, None) == items


def _verdicts(run_dir: Path) -> dict[tuple[str, int], bool]:
    rows = [json.loads(line) for line in (run_dir / "scores" / "composition.jsonl").read_text().splitlines()]
    return {(r["prompt"], r["seed"]): r["correct"] for r in rows if r["correct"] is not None}


def test_summary_numbers_equal_the_statistics_called_directly(audit):
    from diffprobe.metrics.stats import compare_scores

    _, result = audit
    summary = json.loads((result.audit_dir / "summary.json").read_text())
    assert summary["baseline"] == "cfg"
    assert [a["label"] for a in summary["arms"]] == ["cfg", "scfg scale=2", "scfg scale=4"]
    assert [a["images"] for a in summary["arms"]] == [8, 8, 8]  # 4 prompts x 2 seeds
    assert summary["sweeps"] == [{"title": "scfg", "param": "scale",
                                  "arms": [["scfg scale=2", 2], ["scfg scale=4", 4]]}]
    runs = {a["label"]: result.audit_dir / a["run_dir"] for a in summary["arms"]}
    scs = {label: {r["prompt"]: r["scs"] for r in json.loads((run / "scores" / "scs.json").read_text())["per_prompt"]}
           for label, run in runs.items()}
    verdicts = {label: _verdicts(run) for label, run in runs.items()}
    scs_p, comp_p = [], []
    for label in ("scfg scale=2", "scfg scale=4"):
        got = summary["comparisons"][label]
        direct = compare_scores(scs["cfg"], scs[label], n_boot=10000)
        assert got["scs"]["p"] == pytest.approx(direct["wilcoxon"]["p"])
        assert got["scs"]["difference"] == pytest.approx(np.mean([scs[label][p] - scs["cfg"][p] for p in scs["cfg"]]))
        assert got["scs"]["ci"] == pytest.approx([direct["difference"]["bootstrap_ci"]["low"],
                                                  direct["difference"]["bootstrap_ci"]["high"]])
        assert got["scs"]["n_pairs"] == 4
        # McNemar by hand: a binomial test of the discordant images
        base, arm = verdicts["cfg"], verdicts[label]
        shared = [k for k in base if k in arm]
        assert got["composition"]["n_pairs"] == len(shared) == 6  # the hostile prompt has no question
        b_only = sum(arm[k] and not base[k] for k in shared)
        a_only = sum(base[k] and not arm[k] for k in shared)
        p = 1.0 if a_only + b_only == 0 else stats.binomtest(b_only, a_only + b_only, 0.5).pvalue
        assert got["composition"]["p"] == pytest.approx(p)
        assert got["composition"]["difference"] == pytest.approx((b_only - a_only) / len(shared))
        scs_p.append(got["scs"]["p"])
        comp_p.append(got["composition"]["p"])
    for metric, ps in (("scs", scs_p), ("composition", comp_p)):
        lo, hi = sorted(ps)
        holm = [min(1, 2 * lo), min(1, max(2 * lo, hi))]
        expected = holm if ps[0] <= ps[1] else holm[::-1]
        assert [summary["comparisons"][k][metric]["p_holm"] for k in ("scfg scale=2", "scfg scale=4")] == \
            pytest.approx(expected)
    # the summary's per-arm SCS mean is the mean over prompts of the score file
    assert summary["arms"][0]["measures"]["scs"]["mean"] == pytest.approx(np.mean(list(scs["cfg"].values())))


def test_the_report_shows_every_arm_and_the_hostile_prompt_as_text(audit):
    _, result = audit
    html = result.index.read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in html and "onerror=alert(1)>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for label in ("cfg", "scfg scale=2", "scfg scale=4"):
        assert f"<td>{label}</td>" in html
    for plot in ("scs_distribution.png", "scs_paired.png", "accuracy.png", "sweep_0.png"):
        assert f'src="plots/{plot}"' in html and (result.index.parent / "plots" / plot).stat().st_size > 1000
    thumbs = list((result.index.parent / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 24  # 3 arms x 4 prompts x 2 seeds, each image once
    assert HOSTILE_PROMPT not in html


def test_rerun_makes_nothing_and_dry_run_says_so(audit):
    from diffprobe.cli import app

    config, result = audit
    res = CliRunner().invoke(app, ["audit", str(config), "--out", str(result.audit_dir), "--dry-run", "--no-timing"])
    assert res.exit_code == 0, res.output
    assert "3 arm(s), 4 prompt(s) x 2 seed(s); baseline 'cfg'" in res.output
    for label in ("cfg", "scfg scale=2", "scfg scale=4"):
        assert f"  {label}: 0 image(s) to make, 8 already made" in res.output
    assert "measures: scs (efficientnet-lite0), composition (shapes)" in res.output


def test_missing_prerequisites_skip_the_measure_with_a_note(tmp_path, monkeypatch):
    from diffprobe.audit import run_audit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = TINY_AUDIT.replace("guidance:\n  - {name: cfg, scale: 3.5}\n  - {name: scfg, scale: [2, 4]}\n",
                              "guidance:\n  - {name: cfg, scale: 3.5}\n  - {name: cfg, label: strong, scale: 6}\n")
    text = text.replace("seeds: 0-1", "seeds: 0-1\nper_category: 1")
    text += ("  irs: {train: no-such-folder}\n  clip: {model: " + str(tmp_path / "no-clip") + "}\n"
             "  fd: {ref: no-such-reference, embedder: random-projection}\n")
    result = run_audit(write_config(tmp_path, text), tmp_path / "out", progress=False)
    notes = result.summary["notes"]
    assert any(n.startswith("irs: reference folder") and "no-such-folder" in n for n in notes), notes
    assert any(n.startswith("clip:") for n in notes), notes
    assert any(n.startswith("fd: reference") and "no-such-reference" in n for n in notes), notes
    measures = result.summary["arms"][0]["measures"]
    assert "scs" in measures and "composition" in measures and "clip" not in measures and "irs" not in measures
    assert "fd" not in measures
    html = result.index.read_text(encoding="utf-8")
    assert "irs: reference folder" in html


def test_an_interrupted_audit_resumes_keeping_what_it_made(tmp_path, monkeypatch):
    import diffprobe.sampling
    from diffprobe.audit import run_audit
    from diffprobe.store import open_run

    config = write_config(tmp_path, TINY_AUDIT.replace("batch_size: 8", "batch_size: 2"))
    real, calls = diffprobe.sampling.sample, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # the first arm (4 batches) is done, the second holds 2 batches
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(diffprobe.sampling, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_audit(config, tmp_path / "out", progress=False)
    monkeypatch.setattr(diffprobe.sampling, "sample", real)
    arms = sorted((tmp_path / "out" / "arms").iterdir())
    before = {}
    for run in arms:
        with open_run(run) as store:
            before[run.name] = {s.key: s.created for s in store.samples()}
    assert sorted(len(v) for v in before.values()) == [4, 8]
    result = run_audit(config, tmp_path / "out", progress=False)
    assert [a["images"] for a in result.summary["arms"]] == [8, 8, 8]
    for run in arms:
        with open_run(run) as store:
            after = {s.key: s.created for s in store.samples()}
        assert {k: after[k] for k in before[run.name]} == before[run.name]  # kept, not made again


def test_scs_shares_average_to_the_prompts_scs(audit):
    from diffprobe.report.data import gather_run, scs_contributions

    _, result = audit
    arm = gather_run(next((result.audit_dir / "arms").iterdir()))
    shares = scs_contributions(arm, arm.prompts)
    assert len(shares) == 8
    for prompt, scs in arm.per_prompt("scs").items():
        assert np.mean([v for (p, _), v in shares.items() if p == prompt]) == pytest.approx(scs)
    assert "SCS share" in result.index.read_text(encoding="utf-8")


def test_fd_against_a_reference_is_the_quality_column(tmp_path):
    from PIL import Image

    from diffprobe.audit import run_audit
    from diffprobe.metrics.fd import score_fd

    ref = tmp_path / "reference"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    text = TINY_AUDIT.replace("guidance:\n  - {name: cfg, scale: 3.5}\n  - {name: scfg, scale: [2, 4]}\n",
                              "guidance:\n  - {name: cfg, scale: 3.5}\n  - {name: cfg, label: strong, scale: 6}\n")
    text = text.replace("seeds: 0-1", "seeds: 0-1\nper_category: 1").replace("  composition: {judge: shapes}\n", "")
    text += "  fd: {ref: reference, embedder: random-projection}\n"
    result = run_audit(write_config(tmp_path, text), tmp_path / "out", progress=False)
    values = {}
    for arm in result.summary["arms"]:
        direct = score_fd(result.audit_dir / arm["run_dir"], ref, embedder="random-projection")
        assert arm["measures"]["fd"]["mean"] == pytest.approx(direct["fd"], rel=1e-9)
        assert arm["measures"]["fd"]["is_fid"] is False
        values[arm["label"]] = direct["fd"]
    html = result.index.read_text(encoding="utf-8")
    assert "FD (not FID)" in html
    assert values["cfg"] != values["strong"]


# --- seed sets: a grid against mined reliable seeds -------------------------------------------------------------


SEED_SETS = ("models: [shapes]\nprompts: shapes-eval\nguidance: [{name: cfg}, {name: scfg, scale: [2, 4]}]\n"
             "seeds:\n  - {label: grid, seeds: 0-3}\n  - label: mined\n    seeds: reliable:mined.json:2\n"
             "    use_stored_latents: true\n")


def test_seed_sets_multiply_the_arms(tmp_path):
    from diffprobe.audit import expand, load_config

    config, _ = load_config(write_config(tmp_path, SEED_SETS))
    sets = config.seed_sets()
    assert [(s.name, s.reliable, s.use_stored_latents) for s in sets] == [("grid", False, False),
                                                                           ("mined", True, True)]
    assert sets[1].spec_value() == {"reliable": "mined.json:2", "stored_latents": True}
    arms = expand(config)
    assert [a[0] for a in arms] == ["cfg", "cfg seeds=mined", "scfg scale=2", "scfg scale=4",
                                    "scfg seeds=mined scale=2", "scfg seeds=mined scale=4"]
    assert [a[3]["group"] for a in arms[2:]] == ["0:1:0", "0:1:0", "0:1:1", "0:1:1"]  # one sweep per seed set
    plain, _ = load_config(write_config(tmp_path, TINY_AUDIT))
    assert [(s.name, s.seeds) for s in plain.seed_sets()] == [("0-1", "0-1")]  # the plain form: one set
    only, _ = load_config(write_config(tmp_path, SEED_SETS.replace("{name: cfg}", "{name: cfg, seeds: [mined]}")
                                       .replace("scale: [2, 4]}", "scale: [2, 4], seeds: [grid]}")))
    assert [a[0] for a in expand(only)] == ["cfg seeds=mined", "scfg scale=2", "scfg scale=4"]
    assert "seeds" not in expand(only)[0][2]["params"]  # not a guider parameter


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("    use_stored_latents: true\n", "    use_stored_latent: true\n",
     ["seeds.1.use_stored_latent (line 8)", "unknown field; allowed: label, seeds, use_stored_latents, reliable_rng"]),
    ("{label: grid, seeds: 0-3}", "{label: grid, seeds: 0-3, use_stored_latents: true}",
     ["seeds.0 (line 5)", "use_stored_latents needs seeds: reliable:FILE[:K]"]),
    ("{label: grid, seeds: 0-3}", "{label: grid, seeds: 3-0}", ["seeds.0.seeds (line 5)", "bad seed range '3-0'"]),
    ("{label: grid, seeds: 0-3}", "{label: mined, seeds: 0-3}", ["seeds (line 5)", "seed sets 'mined' appear more"]),
    ("{name: cfg}", "{name: cfg, seeds: [grid, mind]}",
     ["guidance.0.seeds: no seed set 'mind'; seed sets: 'grid', 'mined'"]),
    ("seeds:\n  - {label: grid, seeds: 0-3}\n  - label: mined\n    seeds: reliable:mined.json:2\n"
     "    use_stored_latents: true\n", "seeds: 0-x\n", ["seeds (line 4)", "bad seed '0-x'"]),
])
def test_bad_seed_sets_name_the_field(tmp_path, old, new, expected):
    from diffprobe.audit import load_config

    assert old in SEED_SETS
    with pytest.raises(InputError) as err:
        load_config(write_config(tmp_path, SEED_SETS.replace(old, new)))
    for part in expected:
        assert part in str(err.value), str(err.value)


def test_a_missing_reliable_file_names_the_seed_set(tmp_path):
    from diffprobe.audit import load_config, plan_arms

    path = write_config(tmp_path, SEED_SETS)
    config, _ = load_config(path)
    with pytest.raises(InputError, match=r"seed set 'mined' \(reliable:mined.json:2\): .*mined.json does not exist; "
                                         "make it with 'diffprobe seeds mine'"):
        plan_arms(config, path, tmp_path / "out")


@pytest.fixture(scope="module")
def mined_audit(tiny_reliable, tmp_path_factory):
    from report_helpers import RELIABLE_AUDIT

    from diffprobe.audit import run_audit

    file, prompts = tiny_reliable
    folder = tmp_path_factory.mktemp("mined")
    config = folder / "audit.yaml"
    config.write_text(RELIABLE_AUDIT.format(prompts=prompts, file=file), encoding="utf-8")
    return file, prompts, run_audit(config, folder / "out", progress=False)


def test_mined_arms_hold_the_prompts_of_mined_categories(tiny_reliable, tmp_path):
    from report_helpers import RELIABLE_AUDIT, write_jsonl

    from diffprobe.audit import dry_run, load_config, plan_arms
    from diffprobe.prompts import load_prompts

    file, prompts = tiny_reliable
    mined = load_prompts(str(prompts))
    others = [next(p for p in load_prompts("shapes-eval") if p.meta["category"] == c) for c in ("binding", "count")]
    assert others[1].meta["question"]["count"] != 3  # a count that was not mined
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*others, *mined])
    path = tmp_path / "audit.yaml"
    path.write_text(RELIABLE_AUDIT.format(prompts=mixed, file=file), encoding="utf-8")
    notes = []
    arms, all_prompts, _ = plan_arms(load_config(path)[0], path, tmp_path / "out", notes)
    assert len(all_prompts) == 4 and arms[0].spec.prompts == [p.text for p in all_prompts]
    assert arms[1].spec.prompts == [p.text for p in mined]
    assert notes == [f"seeds 'mined': its arms hold the 2 of 4 prompts whose count or relation category "
                     f"{file.name} has mined; their comparisons pair on those prompts, and their accuracy 'all' is "
                     "over those prompts only"]
    lines = dry_run(path, tmp_path / "out", console=None, timing=False)
    assert lines[0].endswith("x seed sets grid (2 per prompt), mined (2 per prompt); baseline 'cfg'; output "
                             f"{tmp_path / 'out'}") and lines[1] == f"note: {notes[0]}"


def _images(run: Path) -> dict[tuple[str, int], np.ndarray]:
    from diffprobe.store import open_run

    with open_run(run) as store:
        return {(s.prompt, s.seed): np.asarray(s.image()) for s in store.samples()}


def test_a_mined_arm_makes_the_images_of_generate_with_reliable_seeds(mined_audit, tmp_path):
    from diffprobe.cli import app

    file, prompts, result = mined_audit
    arm = next(a for a in result.summary["arms"] if a["seed_set"] == "mined")
    res = CliRunner().invoke(app, ["generate", "--model", "shapes", "--prompts", str(prompts), "--seeds",
                                   f"reliable:{file}:2", "--steps", "2", "--scale", "3.5", "-q", "--out",
                                   str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    ours, theirs = _images(result.audit_dir / arm["run_dir"]), _images(tmp_path / "run")
    assert len(ours) == 4 and ours.keys() == theirs.keys()  # 2 prompts x K=2 seeds of each prompt's category
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    from diffprobe.prompts import load_prompts
    from diffprobe.seeds.reliable import prompt_category

    top = {name: c["top"] for name, c in json.loads(file.read_text())["categories"].items()}
    category = {p.text: prompt_category(p) for p in load_prompts(str(prompts))}
    assert all(seed in top[category[prompt]] for prompt, seed in ours)  # each a top seed of its prompt's category


def test_mined_arms_pair_with_the_grid_by_image_index(mined_audit):
    from diffprobe.metrics.stats import compare_scores, mcnemar
    from diffprobe.sampling.latents import file_sha256
    from diffprobe.store import open_run

    file, _, result = mined_audit
    summary = result.summary
    assert [a["label"] for a in summary["arms"]] == ["cfg", "cfg seeds=mined"]
    runs = {a["seed_set"]: result.audit_dir / a["run_dir"] for a in summary["arms"]}
    order = {}
    for name, run in runs.items():
        with open_run(run) as store:
            order[name] = _seed_order(store.spec)
    assert all(order["grid"][p] == [0, 1] for p in order["grid"])
    assert any(order["mined"][p] != [0, 1] for p in order["mined"])  # the mined seeds differ from the grid's
    verdicts = {name: _verdicts(run) for name, run in runs.items()}
    x, y = [], []
    for prompt, seeds in order["grid"].items():
        for i, seed in enumerate(seeds):
            a, b = verdicts["grid"].get((prompt, seed)), verdicts["mined"].get((prompt, order["mined"][prompt][i]))
            if a is not None and b is not None:
                x.append(a)
                y.append(b)
    got = summary["comparisons"]["cfg seeds=mined"]["composition"]
    direct = mcnemar(x, y)
    assert got["n_pairs"] == len(x) == 4
    assert got["p"] == pytest.approx(direct["p"])
    assert (got["detail"]["b_only_correct"], got["detail"]["a_only_correct"]) == (direct["b_only_correct"],
                                                                                  direct["a_only_correct"])
    assert got["difference"] == pytest.approx(np.mean(np.asarray(y, float) - np.asarray(x, float)))
    assert got["pairing"] == "same prompt and image index"
    scs = {name: {r["prompt"]: r["scs"] for r in json.loads((run / "scores" / "scs.json").read_text())["per_prompt"]}
           for name, run in runs.items()}
    assert summary["comparisons"]["cfg seeds=mined"]["scs"]["p"] == pytest.approx(
        compare_scores(scs["grid"], scs["mined"], n_boot=10000)["wilcoxon"]["p"])
    sets = {s["label"]: s for s in summary["seed_sets"]}
    assert sets["grid"]["kind"] == "grid" and sets["grid"]["seeds_used"] == [0, 1]
    assert sets["mined"]["kind"] == "reliable" and sets["mined"]["source"]["k"] == 2
    assert sets["mined"]["source"]["sha256"] == file_sha256(file)
    assert sets["mined"]["per_prompt"] == order["mined"]


def _seed_order(spec) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for prompt, seed in spec.pairs():
        out.setdefault(prompt, []).append(seed)
    return out


def test_the_report_shows_the_seed_reliability_heatmap(mined_audit, tmp_path):
    from diffprobe.report import build_report

    _, _, result = mined_audit
    page = result.index.read_text(encoding="utf-8")
    heatmaps = list((result.index.parent / "plots").glob("reliability_*.png"))
    assert len(heatmaps) == 1 and f'src="plots/{heatmaps[0].name}"' in page
    assert "Seed reliability: reliable_seeds.json" in page and "used by cfg seeds=mined." in page
    assert "image 1" in page and "lined up by image index" in page  # the grid says how arms are lined up
    # a single run generated with reliable seeds: its report shows the heatmap too
    arm = next(a for a in result.summary["arms"] if a["seed_set"] == "mined")
    index = build_report(result.audit_dir / arm["run_dir"], tmp_path / "single")
    assert list((index.parent / "plots").glob("reliability_*.png"))
    assert "Seed reliability" in index.read_text(encoding="utf-8")


# --- LoRA arms --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd_path, tmp_path_factory):
    """A LoRA for the tiny SD model, trained 3 steps by ``seeds finetune --lora`` (as in test_lora)."""
    from test_finetune import write_data

    from diffprobe.finetune import FinetuneOptions, finetune

    root = tmp_path_factory.mktemp("lora")
    finetune(write_data(root / "data"), str(tiny_sd_path), root / "adapter",
             FinetuneOptions(batch=2, accumulation=1, steps=3, lr=5e-2, log_every=1, checkpoint_every=0, lora_rank=4,
                             ema_decay=None), device="cpu")
    return root / "adapter"


def test_lora_arms_change_the_images_and_share_their_model(tiny_sd_path, tiny_lora, tmp_path, monkeypatch):
    import diffprobe.models
    from diffprobe.audit import run_audit

    loads = []
    real = diffprobe.models.load_model

    def counting(name, **kwargs):
        loads.append((name, tuple(x.source for x in kwargs.get("lora") or ())))
        return real(name, **kwargs)

    monkeypatch.setattr(diffprobe.models, "load_model", counting)
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "mine").symlink_to(tiny_lora, target_is_directory=True)
    text = (f"models:\n  - {{name: {tiny_sd_path}, label: base, device: cpu}}\n"
            f"  - {{name: {tiny_sd_path}, label: lora, device: cpu, lora: [adapters/mine]}}\n"
            "prompts: [two red bars]\nseeds: 0-1\nsampler: {steps: 2}\n"
            "guidance: [{name: cfg, scale: 3.5}, {name: cfg, label: strong, scale: 6}]\n"
            "measures: {scs: false, composition: false}\n")
    result = run_audit(write_config(tmp_path, text), tmp_path / "out", progress=False)
    arms = {a["label"]: result.audit_dir / a["run_dir"] for a in result.summary["arms"]}
    assert list(arms) == ["base / cfg", "base / strong", "lora / cfg", "lora / strong"]
    resolved = str((tmp_path / "adapters" / "mine").resolve())
    assert loads == [(str(tiny_sd_path), ()), (str(tiny_sd_path), (resolved,))]  # two models for four arms
    images = {label: _images(run) for label, run in arms.items()}
    for guidance in ("cfg", "strong"):
        base, lora = images[f"base / {guidance}"], images[f"lora / {guidance}"]
        assert base.keys() == lora.keys() and len(base) == 2
        assert all(not np.array_equal(base[k], lora[k]) for k in base)  # the adapter changes every image
    identity = next(a for a in result.summary["arms"] if a["label"] == "lora / cfg")["model_identity"]
    assert [(x["scale"], x["source"]) for x in identity["lora"]] == [(1.0, resolved)]
    assert "lora" not in next(a for a in result.summary["arms"] if a["label"] == "base / cfg")["model_identity"]
    page = result.index.read_text(encoding="utf-8")
    assert identity["lora"][0]["sha256"] in page  # the adapter's identity in the report's provenance


class _Recorded:
    """A step of the progress view that also records its stage, title, total and the images counted."""

    def __init__(self, inner, record: list):
        self.inner, self.record = inner, record

    def __enter__(self):
        advance = self.inner.__enter__()

        def count(n: int) -> None:
            self.record[3] += n
            advance(n)

        return count

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


def test_one_progress_view_counts_every_stage(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from diffprobe.audit import run_audit
    from diffprobe.console import StageProgress

    steps, real = [], StageProgress.step

    def recording(self, stage, what, total):
        steps.append([stage, what, total, 0])
        return _Recorded(real(self, stage, what, total), steps[-1])

    monkeypatch.setattr(StageProgress, "step", recording)
    text = TINY_AUDIT.replace("  - {name: scfg, scale: [2, 4]}\n", "")
    out = io.StringIO()
    run_audit(write_config(tmp_path, text), tmp_path / "out", console=Console(file=out, width=200), report=False)
    assert steps == [["generate", "[1/1] cfg", 8, 8], ["embed", "[1/1] scs: cfg", 8, 8],
                     ["judge", "[1/1] composition: cfg", 8, 6],  # the hostile prompt (2 images) has no question
                     ["score", "paired comparisons and the summary", 1, 0]]
    log = out.getvalue()
    assert "generating" not in log and "judging" not in log  # no bar of an inner command
    assert "audit" in log and "4/4" in log


def test_the_demo_config_plans_its_mined_arm_from_train_prompts(tmp_path):
    from diffprobe.audit import dry_run
    from diffprobe.prompts import load_prompts

    examples = Path(__file__).resolve().parents[1] / "examples"
    lines = dry_run(examples / "audit-shapes.yaml", tmp_path / "demo", console=None, timing=False)
    assert lines[0].startswith("audit shapes-guidance: 6 arm(s), 8 prompt(s) x seed sets grid (3 per prompt), mined "
                               "(3 per prompt); baseline 'cfg'")
    assert lines[1].startswith("note: seeds 'mined': its arms hold the 4 of 8 prompts")
    assert lines[2].startswith("  cfg: 24 image(s) to make") and lines[3].startswith("  cfg seeds=mined: 12 image(s)")
    # the seeds were mined on train prompts only
    mined = json.loads((examples / "shapes-reliable-seeds.json").read_text())
    train = {p.text for p in load_prompts("shapes-train")}
    used = load_prompts(str(examples / "shapes-mine-prompts.jsonl"))
    assert used and all(p.text in train and p.meta["split"] == "train" for p in used)
    assert mined["prompt_source"].endswith("shapes-mine-prompts.jsonl") and mined["sampler"]["steps"] == 25
