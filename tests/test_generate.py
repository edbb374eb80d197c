import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffprobe.errors import InputError, ResolutionError, RunMismatchError
from diffprobe.generate import batches, generate, plan, resolved_config
from diffprobe.guidance import make_guider
from diffprobe.prompts import Prompt
from diffprobe.spec import GuidanceSpec, ModelSpec, RunSpec, SamplerSpec, job_key
from diffprobe.store import create_run, open_run

STEPS = 2
SIZE = 16  # pixels: the smallest size the tiny model accepts, to keep CPU tests quick


def make_spec(path, prompts=("a red cube", "a blue ball"), seeds=(0, 1, 2), **sampler) -> RunSpec:
    sampler = {"steps": STEPS, "height": SIZE, "width": SIZE, **sampler}
    return RunSpec(model=ModelSpec(name=str(path), device="cpu"), prompts=list(prompts), seeds=list(seeds),
                   sampler=SamplerSpec(**sampler), guidance=GuidanceSpec(params={"scale": 5.0}))


def by_job(run) -> dict[tuple[str, int], str]:
    with open_run(run) as store:
        return {(s.prompt, s.seed): s.image_sha256 for s in store.samples()}


def test_batches_group_equal_branch_counts():
    class Uneven:
        def branches(self, prompt):
            return ["", prompt] + (["x"] if prompt.startswith("c") else [])

    jobs = plan(["a", "b", "c"], [0, 1, 2], {"model": {}, "sampler": {}, "guidance": {}})
    got = [[(j.prompt, j.seed) for j in b] for b in batches(jobs, Uneven(), 4)]
    assert got == [[("a", 0), ("a", 1), ("a", 2), ("b", 0)], [("b", 1), ("b", 2)], [("c", 0), ("c", 1), ("c", 2)]]


def test_generate_resume_and_extend(tiny_sd, tiny_sd_path, tmp_path, monkeypatch):
    run = tmp_path / "run"
    spec = make_spec(tiny_sd_path)
    first = generate(spec, run, prompts=[Prompt("a red cube", {"n": 1})], batch_size=4, adapter=tiny_sd,
                     progress=False)
    assert (first.total, first.generated, first.skipped) == (6, 6, 0)
    with open_run(run) as store:
        samples = store.samples()
        assert len(samples) == 6 and store.verify() == []
        config = resolved_config(tiny_sd, spec, make_guider("cfg", scale=5.0))
        s = samples[0]
        assert s.key == job_key(config["model"], s.prompt, s.seed, config["sampler"], config["guidance"])
        assert s.provenance["model"] == tiny_sd.identity() and "weights_sha256" in s.provenance["model"]
        assert s.provenance["sampler"] == {"steps": STEPS, "scheduler": "default", "height": SIZE, "width": SIZE,
                                           "dtype": "float32", "generator_device": "cpu"}
        assert s.guidance == {"name": "cfg", "scale": 5.0, "rescale": 0.0}
        assert set(s.provenance["versions"]) >= {"torch", "diffusers", "transformers", "diffprobe"}
        assert s.provenance["batch_size"] == 4 and s.provenance["scheduler_class"] == "DDIMScheduler"
        assert [x.prompt_meta for x in samples if x.prompt == "a red cube"][0] == {"n": 1}
        assert s.width == s.height == SIZE

    # A complete run is answered from the store alone: loading a model would fail here.
    def no_load(*args, **kwargs):
        raise AssertionError("model loaded for a complete run")

    monkeypatch.setattr("diffprobe.models.load_model", no_load)
    again = generate(spec, run, progress=False)
    assert (again.generated, again.skipped) == (0, 6)

    more = make_spec(tiny_sd_path, seeds=(0, 1, 2, 3))
    with pytest.raises(RunMismatchError, match="--extend"):
        generate(more, run, adapter=tiny_sd, progress=False)
    extended = generate(more, run, adapter=tiny_sd, extend=True, batch_size=3, progress=False)
    assert (extended.generated, extended.skipped) == (2, 6)
    assert len(by_job(run)) == 8

    with pytest.raises(RunMismatchError, match="sampler.steps"):
        generate(make_spec(tiny_sd_path).model_copy(update={"sampler": SamplerSpec(steps=3)}), run,
                 adapter=tiny_sd, progress=False)


def test_defaults_are_compared_once_resolved(tiny_sd, tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_sd, "recommended", {"steps": STEPS})
    run = tmp_path / "run"
    spec = make_spec(tiny_sd_path, prompts=("a cat",), seeds=(0,), steps=None)
    assert generate(spec, run, adapter=tiny_sd, progress=False).generated == 1
    # the same settings spelled out: same keys, nothing to do
    explicit = spec.model_copy(update={"model": ModelSpec(name=str(tiny_sd_path), dtype="fp32"),
                                       "sampler": SamplerSpec(steps=STEPS, height=SIZE, width=SIZE)})
    again = generate(explicit, run, adapter=tiny_sd, progress=False)
    assert (again.generated, again.skipped) == (0, 1)
    # an explicit value that differs from the resolved default is refused
    other = spec.model_copy(update={"sampler": SamplerSpec(steps=STEPS + 1, height=SIZE, width=SIZE)})
    with pytest.raises(RunMismatchError, match=rf"sampler.steps: {STEPS} \(run\) != {STEPS + 1} \(now\)"):
        generate(other, run, adapter=tiny_sd, progress=False)


def test_model_recommended_scale_applies_only_when_unset(tiny_sd, tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_sd, "recommended", {"guidance_scale": 2.5})
    unset = make_spec(tiny_sd_path, prompts=("a cat",), seeds=(0,))
    unset = unset.model_copy(update={"guidance": GuidanceSpec(params={})})
    generate(unset, tmp_path / "a", adapter=tiny_sd, progress=False)
    explicit = make_spec(tiny_sd_path, prompts=("a cat",), seeds=(0,))  # scale 5.0
    generate(explicit, tmp_path / "b", adapter=tiny_sd, progress=False)
    with open_run(tmp_path / "a") as a, open_run(tmp_path / "b") as b:
        assert a.samples()[0].guidance["scale"] == 2.5
        assert b.samples()[0].guidance["scale"] == 5.0


def pixels(run) -> dict[tuple[str, int], np.ndarray]:
    with open_run(run) as store:
        return {(s.prompt, s.seed): np.asarray(s.image(), dtype=np.int16) for s in store.samples()}


def test_image_depends_only_on_its_seed(tiny_sd, tiny_sd_path, tmp_path):
    """Same seed, same image: batch size 1 vs 4, other batch positions, other prompts in the same batch."""
    from diffprobe.sampling import initial_latents

    # The initial noise is bit-identical whatever the batch around it ...
    alone = [initial_latents(tiny_sd, [s], 32, 32) for s in (5, 9)]
    together = initial_latents(tiny_sd, [9, 1, 5], 32, 32)
    assert torch.equal(together[2:3], alone[0]) and torch.equal(together[0:1], alone[1])
    assert not torch.equal(alone[0], alone[1])

    # ... and so is every stored image, up to float reordering inside batched convolutions (at most 1/255).
    prompts = ("a red cube", "a blue ball")
    one = generate(make_spec(tiny_sd_path, prompts, (0, 1, 2)), tmp_path / "b1", batch_size=1, adapter=tiny_sd,
                   progress=False)
    four = generate(make_spec(tiny_sd_path, prompts, (2, 0, 1)), tmp_path / "b4", batch_size=4, adapter=tiny_sd,
                    progress=False)
    # 4 images x 2 CFG branches in denoiser calls of at most 3 rows
    split = generate(make_spec(tiny_sd_path, prompts, (0, 1, 2)), tmp_path / "b4s", batch_size=4, max_model_batch=3,
                     adapter=tiny_sd, progress=False)
    assert one.generated == four.generated == split.generated == 6
    a, b, c = pixels(tmp_path / "b1"), pixels(tmp_path / "b4"), pixels(tmp_path / "b4s")
    assert a.keys() == b.keys() == c.keys()
    assert max(int(np.abs(a[k] - b[k]).max()) for k in a) <= 1
    assert max(int(np.abs(a[k] - c[k]).max()) for k in a) <= 1
    # seeds and prompts do change the image (by far more than that tolerance)
    assert np.abs(a[(prompts[0], 0)] - a[(prompts[0], 1)]).max() > 20
    with open_run(tmp_path / "b1") as r1, open_run(tmp_path / "b4") as r4:
        assert {s.key for s in r1.samples()} == {s.key for s in r4.samples()}  # batch size is not in the key


def test_nothing_is_created_until_the_model_and_size_check_out(tiny_sd, tiny_sd_path, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ResolutionError, match="multiples of"):
        generate(make_spec(tiny_sd_path, height=12, width=16), run, adapter=tiny_sd, progress=False)
    assert not run.exists()
    # a run whose first call produced nothing takes the corrected settings without --new
    with create_run(run, make_spec(tiny_sd_path, height=24)):
        pass
    result = generate(make_spec(tiny_sd_path, seeds=(0,)), run, adapter=tiny_sd, progress=False)
    assert result.generated == 2
    with open_run(run) as store:
        assert store.spec.sampler.height == SIZE


def test_truncated_prompt_is_warned_once_and_recorded(tiny_sd, tiny_sd_path, tmp_path):
    from io import StringIO

    from rich.console import Console

    long = "a very long prompt " * 8  # the tiny tokenizer spells words out: far over 77 tokens
    out = StringIO()
    result = generate(make_spec(tiny_sd_path, (long.strip(), "a cat"), (0,)), tmp_path / "run", batch_size=2,
                      adapter=tiny_sd, console=Console(file=out, width=300), progress=False)
    assert result.truncated_prompts == [long.strip()]
    assert out.getvalue().count("was truncated") == 1
    with open_run(tmp_path / "run") as store:
        flags = {(s.prompt, s.seed): s.truncated for s in store.samples()}
    assert flags == {(long.strip(), 0): True, ("a cat", 0): False}


def test_changed_weights_are_refused(tiny_sd_path, tmp_path):
    from diffprobe.models.tiny import build_tiny_sd

    model = build_tiny_sd(tmp_path / "model", seed=0)
    run = tmp_path / "run"
    generate(make_spec(model, seeds=(0,)), run, progress=False)
    build_tiny_sd(model, seed=1)  # same folder, new weights
    with pytest.raises(RunMismatchError, match="model.weights_sha256"):
        generate(make_spec(model, seeds=(0, 1)), run, extend=True, progress=False)


def _count_rows(run: Path) -> int:
    import sqlite3

    if not (run / "run.sqlite").exists():
        return 0
    conn = sqlite3.connect(run / "run.sqlite", timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet
        return 0
    finally:
        conn.close()


def test_sigkill_loses_nothing_and_resume_completes(tiny_sd, tiny_sd_path, tmp_path):
    prompts, seeds = ("a red cube",), tuple(range(6))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffprobe.cli", "generate", "--model", str(tiny_sd_path), "--device", "cpu",
           "-p", prompts[0], "--seeds", "0-5", "--steps", str(STEPS), "--scale", "5",
           "--batch-size", "1", "--height", str(SIZE), "--width", str(SIZE), "--out", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while _count_rows(run) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]

    with open_run(run) as store:
        kept = len(store)
        assert 2 <= kept < 6
        assert store.verify() == []  # every row has its complete file
        assert store.check().missing == []

    resumed = generate(make_spec(tiny_sd_path, prompts, seeds), run, batch_size=1, progress=False)
    assert (resumed.generated, resumed.skipped) == (6 - kept, kept)
    assert resumed.repair.missing_rows == []
    # the writer cleaned up what the kill left behind
    assert not list(run.glob("images/*/*.tmp"))
    assert len(list(run.glob("images/*/*.png"))) == 6  # no file without a row
    clean = generate(make_spec(tiny_sd_path, prompts, seeds), tmp_path / "clean", batch_size=1, adapter=tiny_sd,
                     progress=False)
    assert clean.generated == 6
    assert by_job(run) == by_job(tmp_path / "clean")


def test_many_jobs_images_match_sampler_directly(tiny_sd, tiny_sd_path, tmp_path):
    """The stored PNG holds exactly the sampler's pixels."""
    from diffprobe.sampling import sample

    generate(make_spec(tiny_sd_path, ("a cat",), (7,)), tmp_path / "run", adapter=tiny_sd, progress=False)
    direct = sample(tiny_sd, make_guider("cfg", scale=5.0), ["a cat"], [7], steps=STEPS, height=SIZE,
                    width=SIZE).images[0]
    with open_run(tmp_path / "run") as store:
        stored = store.samples()[0].image()
    assert np.array_equal(np.asarray(stored), np.asarray(direct.convert("RGB")))


def test_concept_guidance_with_suite_noun_phrases(tiny_sd, tiny_sd_path, tmp_path):
    """--concepts suite: each prompt is guided by its own reference noun phrases (cc500 style metadata)."""
    prompts = [Prompt("a green bench and a red car", {"noun_phrases": ["a green bench", "a red car"]}),
               Prompt("a blue cat", {"noun_phrases": "a blue cat"})]  # csv cells come as ';'-joined text
    spec = RunSpec(model=ModelSpec(name=str(tiny_sd_path)), prompts=[p.text for p in prompts], seeds=[0],
                   sampler=SamplerSpec(steps=STEPS, height=SIZE, width=SIZE),
                   guidance=GuidanceSpec(name="concept", params={"scale": 5.0, "extractor": "suite"}))
    result = generate(spec, tmp_path / "run", prompts=prompts, batch_size=2, adapter=tiny_sd, progress=False)
    assert result.generated == 2
    with open_run(tmp_path / "run") as store:
        records = {s.prompt: s.records for s in store.samples()}
        assert {s.guidance["extractor"] for s in store.samples()} == {"suite"}
    assert records["a green bench and a red car"]["concepts"] == ["a green bench", "a red car"]
    assert records["a blue cat"]["concepts"] == ["a blue cat"]
    # a resumed call without the Prompt objects finds the metadata in the run
    again = generate(spec.model_copy(update={"seeds": [0, 1]}), tmp_path / "run", extend=True, batch_size=2,
                     adapter=tiny_sd, progress=False)
    assert again.generated == 2
    with pytest.raises(InputError, match="1 prompt\\(s\\) have none"):
        generate(spec.model_copy(update={"prompts": ["a blue cat", "a dog"]}), tmp_path / "other",
                 prompts=prompts, adapter=tiny_sd, progress=False)


@pytest.mark.slow
def test_ctrl_c_keeps_finished_images(tiny_sd_path, tmp_path):
    """SIGINT: exit code 130, a message that says how to resume, and every finished batch stored."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffprobe.cli", "generate", "--model", str(tiny_sd_path), "--device", "cpu",
           "-p", "a red cube", "--seeds", "0-7", "--steps", str(STEPS), "--batch-size", "1", "--height", str(SIZE),
           "--width", str(SIZE), "--out", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "400"})
    deadline = time.time() + 180
    while _count_rows(run) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err
    with open_run(run) as store:
        assert 2 <= len(store) < 8 and store.verify() == [] and not store.check()
