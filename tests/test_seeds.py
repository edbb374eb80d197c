"""Reliable seeds: mining (tallies, chi-square, ranking), reliable:FILE seed choice, stored latents, the data set.

The end-to-end tests mine a tiny grid of the shapes model (2 steps, 64 px) with a judge whose verdicts are a hash of
the image, so the per-seed tables are varied and every number can be recomputed from the stored verdicts.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chi2_contingency
from typer.testing import CliRunner

from diffprobe.cli import app
from diffprobe.errors import InputError
from diffprobe.finetune.data import read_image_folder
from diffprobe.judges import register_judge
from diffprobe.judges.base import Judge, Verdict
from diffprobe.metrics.stats import wilson
from diffprobe.prompts import Prompt
from diffprobe.seeds.dataset import relabel_caption
from diffprobe.seeds.file import ReliableSeeds, read_reliable
from diffprobe.seeds.mining import SeedTally, chi_square, mine, rank
from diffprobe.seeds.reliable import choose_seeds
from diffprobe.store import open_run

PROMPTS = [
    {"prompt": "two red circles", "kind": "count", "objects": ["red circle"], "count": 2},
    {"prompt": "two blue squares", "kind": "count", "objects": ["blue square"], "count": 2},
    {"prompt": "three green triangles", "kind": "count", "objects": ["green triangle"], "count": 3},
    {"prompt": "a red circle to the left of a blue square", "kind": "relation",
     "objects": ["red circle", "blue square"], "relation": "left_of"},
]
SEEDS = list(range(6))
STEPS = "2"
SIZE = "32"  # pixels (the model's own 64 costs four times as much)


class HashJudge(Judge):
    """Correct iff the first byte of the image's pixel hash is even; a wrong count answer is count + 1."""

    name = "hash-test"

    def judge(self, image: Image.Image, question) -> Verdict:
        ok = hashlib.sha256(image.tobytes()).digest()[0] % 2 == 0
        if question.kind == "count":
            return Verdict(ok, str(question.count if ok else question.count + 1), "pixel hash")
        return Verdict(ok, "yes" if ok else "no", "pixel hash")


class MuteJudge(Judge):
    """Answers that never parse."""

    name = "mute-test"

    def judge(self, image: Image.Image, question) -> Verdict:
        return Verdict(None, "", "no answer")


register_judge("hash-test", HashJudge)
register_judge("mute-test", MuteJudge)


def invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    return path


def pairs_to_sha(run):
    with open_run(run) as store:
        return {(s.prompt, s.seed): s.image_sha256 for s in store.samples()}


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    prompts = write_prompts(folder / "prompts.jsonl", PROMPTS)
    res = invoke(["seeds", "mine", "--model", "shapes", "--prompts", prompts, "--seeds", "0-5", "--steps", STEPS,
                  "--height", SIZE, "--width", SIZE, "--judge", "hash-test", "--top", "2", "--out", folder / "run",
                  "-q"])
    assert res.exit_code == 0, res.output
    return folder, prompts, folder / "run" / "reliable_seeds.json"


# --- pure arithmetic ---------------------------------------------------------------------------------------


def test_rank_by_hand():
    tallies = {5: SeedTally(5, 3, 4), 2: SeedTally(2, 6, 8), 9: SeedTally(9, 1, 1), 1: SeedTally(1, 0, 3),
               4: SeedTally(4, 3, 4), 7: SeedTally(7, 0, 0, unparsed=2)}
    # 9: 1.0; 2: 0.75 with 6 correct before 4 and 5 (0.75 with 3; the smaller seed first); 1: 0.0; 7 has no verdict
    assert rank(tallies) == [9, 2, 4, 5, 1]


def test_chi_square_equals_scipy_and_names_degenerate_tables():
    tallies = {0: SeedTally(0, 9, 12), 1: SeedTally(1, 2, 12), 2: SeedTally(2, 5, 10), 3: SeedTally(3, 0, 0)}
    ref = chi2_contingency([[9, 3], [2, 10], [5, 5]])  # seed 3 (no verdict) is left out
    got = chi_square(tallies)
    assert got["statistic"] == pytest.approx(ref.statistic) and got["p"] == pytest.approx(ref.pvalue)
    assert got["dof"] == 2 and got["seeds"] == 3 and got["significant"] == (ref.pvalue < 0.05)
    assert got["low_expected"] == pytest.approx(float((ref.expected_freq < 5).mean()))
    two = chi_square({0: SeedTally(0, 9, 12), 1: SeedTally(1, 2, 12)})
    assert two["yates"] and two["statistic"] == pytest.approx(chi2_contingency([[9, 3], [2, 10]]).statistic)
    every = chi_square({0: SeedTally(0, 4, 4), 1: SeedTally(1, 3, 3)})
    assert every["p"] is None and "every verdict is correct" in every["note"]
    one = chi_square({0: SeedTally(0, 1, 4), 1: SeedTally(1, 0, 0)})
    assert one["p"] is None and "at least two seeds" in one["note"]


def test_mine_refuses_a_category_without_verdicts():
    rows = [{"seed": 0, "category": "count 2", "correct": True, "prompt": "a"},
            {"seed": 0, "category": "count 3", "correct": None, "prompt": "b"},
            {"seed": 1, "category": "count 3", "correct": None, "prompt": "b"}]
    with pytest.raises(InputError, match="category 'count 3' has no verdicts to rank seeds by.*2 image"):
        mine(rows, [0, 1])
    with pytest.raises(InputError, match="no judged image is in a count or relation category .*attribute"):
        mine([{"seed": 0, "category": "attribute", "correct": True}], [0])


def test_relabel_caption():
    assert relabel_caption("three red circles", 3, 4) == "four red circles"
    assert relabel_caption("there are three red circles", 3, 2) == "there are two red circles"
    assert relabel_caption("Three apples, on a sunny beach", 3, 0) == "Zero apples, on a sunny beach"
    assert relabel_caption("3 apples", 3, 12) == "12 apples"
    assert relabel_caption("a red circle", 3, 4) is None


# --- reliable:FILE seed choice -----------------------------------------------------------------------------


def fake_reliable(tmp_path, tops):
    data = {"categories": {name: {"top": top} for name, top in tops.items()}}
    return ReliableSeeds(tmp_path / "reliable_seeds.json", data)


def test_reliable_choice_is_per_category_and_reproducible(tmp_path):
    from diffprobe.prompts import load_suite

    prompts = load_suite("shapes-train-count")[:40] + load_suite("shapes-train-relation")[:20]
    tops = {f"count {n}": [100 * n + i for i in range(3)] for n in range(2, 7)}
    tops |= {f"relation {r}": [1000 + 10 * i + len(r) for i in range(3)]
             for r in ("left_of", "right_of", "above", "below")}
    reliable = fake_reliable(tmp_path, tops)
    chosen = choose_seeds(prompts, reliable, k=2, rng_seed=5)
    for p in prompts:
        q = p.meta["question"]
        category = f"count {q['count']}" if q["kind"] == "count" else f"relation {q['relation']}"
        assert len(chosen[p.text]) == 2 and len(set(chosen[p.text])) == 2
        assert set(chosen[p.text]) <= set(tops[category])
    assert choose_seeds(prompts, reliable, k=2, rng_seed=5) == chosen  # reproducible
    assert choose_seeds(prompts[::-1][:10], reliable, k=2, rng_seed=5) == {p.text: chosen[p.text]
                                                                          for p in prompts[::-1][:10]}
    other = choose_seeds(prompts, reliable, k=2, rng_seed=6)
    assert other != chosen  # another RNG seed draws differently (60 prompts: the same draw is ~impossible)
    with pytest.raises(InputError, match="fewer than the 4 asked for"):
        choose_seeds(prompts, reliable, k=4)
    with pytest.raises(InputError, match="has no question"):
        choose_seeds([Prompt("a red circle")], reliable)
    with pytest.raises(InputError, match="no reliable seeds for category 'count 9'"):
        choose_seeds([Prompt("nine red circles", {"kind": "count", "objects": ["red circle"], "count": 9})],
                     reliable)


# --- end to end on the shapes model ------------------------------------------------------------------------


def test_mining_matches_the_stored_verdicts(mined):
    folder, _, file = mined
    data = json.loads(file.read_text())
    assert data["format"] == "diffprobe-reliable-seeds" and data["top_n"] == 2 and data["seeds"] == SEEDS
    assert data["model"]["model"] == "shapes" and data["sampler"]["height"] == data["sampler"]["width"] == 32
    assert data["sampler"]["generator_device"] == "cpu" and data["sampler"]["dtype"] == "float32"
    assert data["scheduler_class"] and data["sampler"]["steps"] == 2
    with open_run(folder / "run") as store:
        seed_of = {s.key: s.seed for s in store.samples()}
        verdicts = store.judge_verdicts({"name": "hash-test"})
    assert len(verdicts) == len(PROMPTS) * len(SEEDS)
    table: dict[str, dict[int, list[int]]] = {}
    for v in verdicts:
        q = v.question
        cat = f"count {q['count']}" if q["kind"] == "count" else f"relation {q['relation']}"
        cell = table.setdefault(cat, {s: [0, 0] for s in SEEDS})[seed_of[v.key]]
        cell[0 if v.correct else 1] += 1
    assert list(data["categories"]) == ["count 2", "count 3", "relation left_of"]
    tested = 0
    for cat, c in data["categories"].items():
        rows = [table[cat][s] for s in SEEDS]
        for s, row in zip(SEEDS, c["seeds"], strict=True):
            k, n = table[cat][s][0], sum(table[cat][s])
            assert row["seed"] == s and row["correct"] == k and row["n"] == n
            assert row["ci95"] == pytest.approx(list(wilson(k, n)))
        by_hand = sorted(SEEDS, key=lambda s: (-table[cat][s][0] / sum(table[cat][s]), -table[cat][s][0], s))
        assert c["ranking"] == by_hand and c["top"] == by_hand[:2]
        if 0 < sum(r[0] for r in rows) < sum(map(sum, rows)):
            ref = chi2_contingency(rows)
            assert c["chi2"]["statistic"] == pytest.approx(ref.statistic)
            assert c["chi2"]["p"] == pytest.approx(ref.pvalue)
            tested += 1
    assert tested >= 1
    # The stored latents are the noise the generator drew for each top seed.
    from safetensors.torch import load_file

    from diffprobe.models import load_model
    from diffprobe.sampling import initial_latents

    stored = load_file(str(file.with_suffix(".safetensors")))
    top = sorted({s for c in data["categories"].values() for s in c["top"]})
    assert sorted(map(int, stored)) == top == data["latents"]["seeds"]
    adapter = load_model("shapes", device="cpu")
    f = adapter.vae_scale_factor
    assert data["latent_shape"] == [adapter.latent_channels, 32 // f, 32 // f]
    for s in top:
        assert torch.equal(stored[str(s)], initial_latents(adapter, [s], 32, 32)[0])


def test_mining_again_resumes_and_generates_nothing(mined):
    folder, prompts, file = mined
    before = json.loads(file.read_text())
    res = invoke(["seeds", "mine", "--model", "shapes", "--prompts", prompts, "--seeds", "0-5", "--steps", STEPS,
                  "--height", SIZE, "--width", SIZE, "--judge", "hash-test", "--top", "2", "--out", folder / "run",
                  "-q"])
    assert res.exit_code == 0, res.output
    after = json.loads(file.read_text())
    assert after["timing"]["images_generated"] == 0 and after["timing"]["images_judged"] == 0
    assert after["categories"] == before["categories"] and after["latents"] == before["latents"]


def test_reliable_seeds_from_a_spec_file_and_extend(mined, tmp_path):
    from diffprobe.spec import load_spec_file

    _, prompts, file = mined
    (tmp_path / "run.yaml").write_text(f"prompts: {prompts}\nseeds: {{reliable: {file}, k: 2, rng_seed: 3}}\n")
    spec, _, _ = load_spec_file(tmp_path / "run.yaml")
    assert spec.seed_source.k == 2 and spec.seed_source.rng_seed == 3 and not spec.seed_source.stored_latents
    assert set(spec.prompt_seeds) == {p["prompt"] for p in PROMPTS} and spec.sampler.height == 32
    assert sorted(spec.pairs()) == sorted((p, s) for p, seeds in spec.prompt_seeds.items() for s in seeds)
    # A reliable run extended with a prompt draws that prompt's seeds and keeps the others'.
    first = write_prompts(tmp_path / "first.jsonl", PROMPTS[:1])
    base = ["generate", "--model", "shapes", "--seeds", f"reliable:{file}", "--steps", STEPS, "--out",
            tmp_path / "run", "-q"]
    assert invoke([*base, "--prompts", first]).exit_code == 0
    res = invoke([*base, "--prompts", write_prompts(tmp_path / "two.jsonl", PROMPTS[:2])])
    assert res.exit_code == 2 and "--extend" in res.output
    res = invoke([*base, "--prompts", tmp_path / "two.jsonl", "--extend"])
    assert res.exit_code == 0, res.output
    with open_run(tmp_path / "run") as store:
        assert sorted((s.prompt, s.seed) for s in store.samples()) == sorted(store.spec.pairs())
        assert len(store) == 2 and set(store.spec.prompt_seeds) == {PROMPTS[0]["prompt"], PROMPTS[1]["prompt"]}


def test_seeds_show_prints_the_table_and_writes_a_heatmap(mined, tmp_path):
    _, _, file = mined
    png = tmp_path / "heat.png"
    res = invoke(["seeds", "show", file, "--png", png])
    assert res.exit_code == 0, res.output
    assert "count 2" in res.output and "relation left_of" in res.output and "top seeds" in res.output
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100
    res = invoke(["seeds", "show", png])
    assert res.exit_code == 2 and "is not a reliable seeds file" in res.output


def test_generate_with_reliable_seeds_and_stored_latents(mined, tmp_path):
    folder, prompts, file = mined
    reliable = read_reliable(file)
    mined_images = pairs_to_sha(folder / "run")
    runs = {}
    for name, extra in (("a", []), ("b", []), ("latents", ["--use-stored-latents"])):
        res = invoke(["generate", "--model", "shapes", "--prompts", prompts, "--seeds", f"reliable:{file}:2",
                      "--steps", STEPS, "--out", tmp_path / name, "-q", *extra])  # the size comes from the file
        assert res.exit_code == 0, res.output
        with open_run(tmp_path / name) as store:
            runs[name] = (store.spec, store.get_meta("config"), store.samples())
    spec_a, config_a, samples_a = runs["a"]
    assert spec_a.prompt_seeds == runs["b"][0].prompt_seeds  # the same command draws the same seeds
    assert spec_a.seed_source.rng_seed == 77 and spec_a.seed_source.k == 2
    for p in PROMPTS:
        cat = f"count {p['count']}" if p["kind"] == "count" else f"relation {p['relation']}"
        assert sorted(spec_a.prompt_seeds[p["prompt"]]) == sorted(reliable.top(cat))  # K = top n = 2
    # The seeded run and the stored-latents run both reproduce the mined images bit for bit.
    for _, _, samples in runs.values():
        assert len(samples) == len(PROMPTS) * 2
        assert all(mined_images[(s.prompt, s.seed)] == s.image_sha256 for s in samples)
    spec_l, config_l, samples_l = runs["latents"]
    latents_sha = hashlib.sha256(file.with_suffix(".safetensors").read_bytes()).hexdigest()
    assert config_l["sampler"]["initial_latents"] == latents_sha and "initial_latents" not in config_a["sampler"]
    assert samples_l[0].provenance["initial_latents_file"] == str(file.with_suffix(".safetensors").resolve())
    assert {s.key for s in samples_l}.isdisjoint({s.key for s in samples_a})  # the job key records the latents


def test_stored_latents_are_the_starting_noise(tmp_path):
    """A latents file that is not the seeded noise gives the images sample(latents=...) makes, not the seeded ones."""
    from diffprobe.generate import generate
    from diffprobe.guidance import make_guider
    from diffprobe.models import load_model
    from diffprobe.sampling import initial_latents, sample
    from diffprobe.sampling.latents import write_initial_latents
    from diffprobe.spec import RunSpec, SamplerSpec

    adapter = load_model("shapes", device="cpu")
    noise = -initial_latents(adapter, [3], 32, 32)
    write_initial_latents(tmp_path / "noise.safetensors", {3: noise[0]})
    spec = RunSpec(prompts=["two red circles"], seeds=[3], sampler=SamplerSpec(
        steps=2, height=32, width=32, initial_latents=str(tmp_path / "noise.safetensors")))
    generate(spec, tmp_path / "run", adapter=adapter, progress=False)
    [stored] = open_run(tmp_path / "run").samples()
    guider = make_guider("cfg", **spec.guidance.params)  # what the driver uses (the spec sets the scale)
    direct = sample(adapter, guider, ["two red circles"], [3], steps=2, height=32, width=32, latents=noise).images[0]
    seeded = sample(adapter, guider, ["two red circles"], [3], steps=2, height=32, width=32).images[0]
    assert np.array_equal(np.asarray(stored.image()), np.asarray(direct))
    assert not np.array_equal(np.asarray(direct), np.asarray(seeded))
    bad = spec.model_copy(update={"seeds": [4]})
    with pytest.raises(InputError, match="holds no latents for seed"):
        generate(bad, tmp_path / "run-bad", adapter=adapter, progress=False)
    assert not (tmp_path / "run-bad").exists()


def test_dataset_relabel_and_filter(mined, tmp_path):
    folder, prompts, file = mined
    mined_images = pairs_to_sha(folder / "run")
    res = invoke(["seeds", "dataset", "--model", "shapes", "--seeds-file", file, "--prompts", prompts, "--steps",
                  STEPS, "--rectify", "relabel", "--judge", "hash-test", "--out", tmp_path / "data", "-q"])
    assert res.exit_code == 0, res.output
    items = read_image_folder(tmp_path / "data")
    assert len(items) == len(PROMPTS)
    manifest = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert manifest["rectify"] == "relabel" and manifest["rng_seed"] == 77 and manifest["images"] == len(PROMPTS)
    reliable = read_reliable(file)
    judge = HashJudge()
    for item in items:
        r = item.record
        assert r["seed"] in reliable.top(r["category"])
        assert hashlib.sha256(item.path.read_bytes()).hexdigest() == mined_images[(r["prompt"], r["seed"])]
        q = _question(r["prompt"])
        with Image.open(item.path) as im:
            ok = judge.judge(im.convert("RGB"), q).correct
        assert r["correct"] == ok
        if ok or q.kind == "relation":
            assert item.text == r["prompt"]
        else:
            assert item.text == relabel_caption(r["prompt"], q.count, q.count + 1) != r["prompt"]
            assert r["action"].startswith("relabelled")
    res = invoke(["seeds", "dataset", "--model", "shapes", "--seeds-file", file, "--prompts", prompts, "--steps",
                  STEPS, "--rectify", "filter", "--judge", "hash-test", "--out", tmp_path / "filtered", "-q"])
    wrong = sum(1 for item in items if item.record["correct"] is False)
    if wrong == len(items):
        assert res.exit_code == 2 and "no image is left" in res.output
    else:
        assert res.exit_code == 0, res.output
        kept = read_image_folder(tmp_path / "filtered")
        assert len(kept) == len(items) - wrong and all(i.record["correct"] for i in kept)


def _question(text):
    from diffprobe.judges.questions import question_for

    meta = next(p for p in PROMPTS if p["prompt"] == text)
    return question_for(Prompt(text, {k: v for k, v in meta.items() if k != "prompt"}))[0]


# --- bad input: one clear message, nothing written ----------------------------------------------------------


def test_seeds_file_from_another_model_is_refused(mined, tmp_path, tiny_sd_path):
    _, prompts, file = mined
    out = tmp_path / "other"
    res = invoke(["generate", "--model", tiny_sd_path, "--prompts", prompts, "--seeds", f"reliable:{file}",
                  "--steps", STEPS, "--out", out, "-q"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "were mined with other settings (model: " in text and "--use-stored-latents" in text
    assert not out.exists()
    res = invoke(["generate", "--model", "shapes", "--prompts", prompts, "--seeds", f"reliable:{file}", "--steps",
                  STEPS, "--height", "64", "--width", "64", "--out", out, "-q"])
    assert res.exit_code == 2 and "sampler.height: 32 (seeds file) != 64 (now)" in " ".join(res.output.split())
    assert not out.exists()


def test_stored_latents_carry_the_seeds_to_another_model_folder(mined, tmp_path):
    """The same weights under another path are another model identity: the seed integers are refused there, the
    stored latents are accepted and give the mined images."""
    import shutil

    from diffprobe.worlds.shapes import weights_dir

    folder, prompts, file = mined
    copy = tmp_path / "shapes-copy"
    shutil.copytree(weights_dir(), copy)
    base = ["generate", "--model", copy, "--prompts", prompts, "--seeds", f"reliable:{file}", "--steps", STEPS, "-q"]
    res = invoke([*base, "--out", tmp_path / "seeded"])
    assert res.exit_code == 2 and "(model: " in res.output and not (tmp_path / "seeded").exists()
    res = invoke([*base, "--use-stored-latents", "--out", tmp_path / "latents"])
    assert res.exit_code == 0, res.output
    mined_images = pairs_to_sha(folder / "run")
    made = pairs_to_sha(tmp_path / "latents")
    assert len(made) == len(PROMPTS) and all(mined_images[pair] == sha for pair, sha in made.items())


@pytest.mark.parametrize(("prompts", "judge", "message"), [
    ([{"prompt": "two red circles", "kind": "count", "objects": ["red circle"], "count": 2}], "mute-test",
     "category 'count 2' has no verdicts to rank seeds by"),
    ([{"prompt": "a red circle"}, {"prompt": "a blue square and a red circle",
                                    "kind": "attribute", "objects": ["blue square", "red circle"]}], "hash-test",
     "no prompt has a count or relation question (found: 1 no question, 1 attribute)"),
    ([], "hash-test", "holds no prompts"),
])
def test_mining_bad_input_is_one_message_and_no_seeds_file(tmp_path, prompts, judge, message):
    file = write_prompts(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "run"
    res = invoke(["seeds", "mine", "--prompts", file, "--seeds", "0-1", "--steps", STEPS, "--judge", judge,
                  "--out", out, "-q"])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not (out / "reliable_seeds.json").exists() and not (out / "reliable_seeds.safetensors").exists()
    if judge == "hash-test":
        assert not out.exists()  # refused before any image


def test_reliable_flags_need_a_reliable_seeds_file(tmp_path):
    res = invoke(["generate", "-p", "two red circles", "--use-stored-latents", "--out", tmp_path / "x"])
    assert res.exit_code == 2 and "--use-stored-latents needs --seeds reliable:FILE" in res.output
    res = invoke(["generate", "-p", "two red circles", "--seeds", f"reliable:{tmp_path / 'none.json'}",
                  "--out", tmp_path / "x"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = invoke(["seeds", "dataset", "--seeds-file", tmp_path / "none.json", "--prompts", "shapes-train-count",
                  "--rectify", "relabel", "--out", tmp_path / "d"])
    assert res.exit_code == 2 and "--rectify relabel needs --judge" in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "d").exists()
