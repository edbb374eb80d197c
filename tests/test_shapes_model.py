"""The shipped shapes model: folder layout, loading through the adapter, deterministic generation, smoke runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from diffprobe.errors import ModelNotFoundError
from diffprobe.worlds import shapes


def test_folder_is_a_stable_diffusion_checkpoint_under_25_mb():
    folder = shapes.weights_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    weights = list(folder.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert sum(w.stat().st_size for w in weights) <= 25 * 2**20
    assert not list(folder.rglob("*.bin"))
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["num_train_timesteps"] == 1000
    for part in ("unet", "vae"):
        assert "_name_or_path" not in json.loads((folder / part / "config.json").read_text())


def test_weights_dir_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(shapes, "_WEIGHTS", tmp_path / "nothing")
    with pytest.raises(ModelNotFoundError, match="shapes model weights are missing"):
        shapes.weights_dir()


@pytest.fixture(scope="module")
def adapter():
    from diffprobe.models import load_model

    return load_model("shapes", device="cpu", dtype="fp32")


def test_loads_through_the_sd_adapter_with_two_cross_attention_resolutions(adapter):
    assert adapter.family == "sd"
    assert adapter.vae_scale_factor == 2 and adapter.default_size == (64, 64)
    grids = {(layer.height, layer.width) for layer in adapter.attention_layers(64, 64) if layer.kind == "cross"}
    assert {(8, 8), (4, 4)} <= grids
    cond = adapter.encode(["two red circles", ""])
    assert cond.tokens[0][:5] == ["<|startoftext|>", "two", "red", "circles", "<|endoftext|>"]


def test_generation_is_deterministic_per_seed_and_follows_the_prompt(adapter):
    from diffprobe.guidance import make_guider
    from diffprobe.sampling import sample

    cfg = make_guider("cfg", scale=3.5)
    prompts = ["a red square", "a red square", "a blue circle"]
    a = sample(adapter, cfg, prompts, [0, 1, 0], steps=8).images
    b = sample(adapter, cfg, prompts[:1], [0], steps=8).images
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    colours = [{d.color for d in shapes.detect(im)} for im in a]
    assert "red" in colours[0] | colours[1] and "blue" in colours[2]


def test_diffusers_pipeline_loads_the_folder_directly():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(shapes.weights_dir())
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a green triangle", num_inference_steps=4, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)


def test_smoke_evaluation_reports_every_category(tmp_path):
    """The evaluation command, run as a module the way the model card says, writes the results and the card."""
    import shutil
    import subprocess
    import sys

    shutil.copy(shapes.weights_dir().parent / "training.json", tmp_path / "training.json")
    subprocess.run([sys.executable, "-m", "diffprobe.worlds.shapes.evaluate", "--per-category", "2", "--steps", "4",
                    "--out", str(tmp_path / "eval.json"), "--card", str(tmp_path)], check=True, capture_output=True)
    res = json.loads((tmp_path / "eval.json").read_text())
    assert len(res["rows"]) == 8
    s = res["summary"]
    assert {"single", "count", "binding", "relation", "all"} <= set(s)
    assert s["all"]["n"] == 8 and 0 <= s["all"]["ci95"][0] <= s["all"]["accuracy"] <= s["all"]["ci95"][1] <= 1
    assert sum(s[c]["correct"] for c in ("single", "count", "binding", "relation")) == s["all"]["correct"]
    assert all(r["reason"] for r in res["rows"])
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert f"| count | {s['count']['accuracy']:.3f} |" in card and "## Evaluation" in card
    assert "rows" not in json.loads((tmp_path / "evaluation.json").read_text())


def test_wilson_interval_known_values():
    from diffprobe.worlds.shapes.evaluate import wilson

    lo, hi = wilson(8, 10)  # textbook value: 0.4902, 0.9433
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


def test_training_smoke_writes_a_loadable_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffprobe.worlds.shapes.train import train

    info = train(tmp_path, seed=1, vae_steps=2, steps=2, batch=2, device="cpu", workers=0, log_every=1)
    assert info["unet_steps"] == 2
    rows = list(csv.DictReader(open(tmp_path / "loss.csv")))
    assert [r["phase"] for r in rows] == ["vae", "vae", "unet", "unet"]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert (tmp_path / "MODEL_CARD.md").read_text().startswith("# shapes-world")
    StableDiffusionPipeline.from_pretrained(tmp_path / "weights")


def test_training_continues_from_a_trained_folder(tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    from diffprobe.errors import InputError
    from diffprobe.worlds.shapes.record import examples_seen
    from diffprobe.worlds.shapes.train import train

    first = train(tmp_path / "a", seed=1, vae_steps=2, steps=3, batch=2, device="cpu", workers=0, log_every=1)
    second = train(tmp_path / "b", seed=2, steps=2, batch=4, device="cpu", workers=0, log_every=1,
                   init=tmp_path / "a" / "weights", warmup=1, ema_decay=0.5)
    assert second["vae_steps"] == 0 and second["init"]["unet_steps"] == 3
    assert second["vae_scaling_factor"] == first["vae_scaling_factor"]  # the autoencoder is reused as is
    assert second["data_offset"] == 3 * 2 and examples_seen(second) == 3 * 2 + 2 * 4
    rows = list(csv.DictReader(open(tmp_path / "b" / "loss.csv")))
    assert [r["phase"] for r in rows] == ["unet", "unet"]
    a = UNet2DConditionModel.from_pretrained(tmp_path / "a" / "weights" / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(tmp_path / "b" / "weights" / "unet").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the continuation trained the parent's weights
    config = json.loads((tmp_path / "b" / "weights" / "unet" / "config.json").read_text())
    assert "_name_or_path" not in config  # a saved folder does not name the folder it was loaded from
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "continued from" in card
    assert "--replay training.json" in card
    with pytest.raises(InputError, match="training.json"):
        train(tmp_path / "c", steps=1, device="cpu", workers=0, init=tmp_path / "b")


def test_replay_trains_the_recorded_chain_again_and_resumes(tmp_path, monkeypatch, capsys):
    from diffusers import UNet2DConditionModel

    from diffprobe.worlds.shapes import train as training
    from diffprobe.worlds.shapes.record import chain

    train = training.train
    train(tmp_path / "a", seed=1, vae_steps=2, steps=3, batch=2, device="cpu", workers=0, log_every=1)
    record = train(tmp_path / "b", seed=2, steps=2, batch=4, lr=1e-3, device="cpu", workers=0, log_every=1,
                   init=tmp_path / "a" / "weights", warmup=1, ema_decay=0.5)
    last = training.replay(record, tmp_path / "again", device="cpu", workers=0, log_every=1)
    assert [r["unet_steps"] for r in chain(last)] == [3, 2]
    assert last["lr"] == 1e-3 and last["ema_decay"] == 0.5 and last["data_offset"] == record["data_offset"]
    original = UNet2DConditionModel.from_pretrained(tmp_path / "b" / "weights" / "unet").state_dict()
    replayed = UNet2DConditionModel.from_pretrained(tmp_path / "again" / "run2" / "weights" / "unet").state_dict()
    assert all(torch.equal(original[k], replayed[k]) for k in original)  # same seed, data and device: same weights

    # A finished run is kept: replaying again trains nothing.
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    training.replay(record, tmp_path / "again", device="cpu", workers=0)
    assert capsys.readouterr().out.count("already holds it") == 2

    # A run trained again makes every later run stale: they are trained again too.
    (tmp_path / "again" / "run1" / "training.json").unlink()
    trained = []
    monkeypatch.setattr(training, "train", lambda folder, *a, **k: trained.append(folder.name) or {})
    training.replay(record, tmp_path / "again", device="cpu", workers=0)
    assert trained == ["run1", "run2"]


def test_loss_log_rows_average_one_phase_each(tmp_path, capsys):
    from diffprobe.worlds.shapes.train import LossLog

    log = LossLog(tmp_path / "loss.csv", every=2)
    for phase, step, loss in [("vae", 1, 1.0), ("vae", 2, 3.0), ("vae", 3, 100.0), ("unet", 1, 5.0), ("unet", 2, 7.0)]:
        log.add(phase, step, torch.tensor(loss))
    log.close()
    rows = list(csv.DictReader(open(tmp_path / "loss.csv")))
    assert [(r["phase"], r["step"], float(r["loss"])) for r in rows] == [("vae", "2", 2.0), ("unet", "2", 6.0)]
    assert capsys.readouterr().out.startswith("vae 2: 2.00000 (")


def test_shapes_modules_import_without_a_cycle():
    """The evaluation does not need the trainer, and the trainer builds its card without the evaluation."""
    import subprocess
    import sys

    code = ("import sys, importlib; importlib.import_module('diffprobe.worlds.shapes.{0}');"
            "print('diffprobe.worlds.shapes.{1}' in sys.modules)")
    for module, other in (("evaluate", "train"), ("train", "evaluate")):
        out = subprocess.run([sys.executable, "-c", code.format(module, other)], check=True, capture_output=True,
                             text=True).stdout
        assert out.strip() == "False", (module, other)
