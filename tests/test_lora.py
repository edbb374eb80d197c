"""``generate --lora``: a LoRA folder from ``seeds finetune --lora`` loads, changes the images, and keys them by
its identity and scale; runs without LoRA keep their old specs, run folders and job keys."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from test_finetune import write_data

from diffprobe.errors import DiffprobeError, InputError
from diffprobe.finetune import FinetuneOptions, finetune
from diffprobe.spec import LoraSpec, ModelSpec, RunSpec, parse_lora
from diffprobe.store import open_run


@pytest.fixture(scope="module")
def lora_dir(tiny_sd_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    data = write_data(root / "data")
    out = root / "adapter"
    finetune(data, str(tiny_sd_path), out, FinetuneOptions(batch=2, accumulation=1, steps=3, lr=5e-2, log_every=1,
                                                           checkpoint_every=0, lora_rank=4, ema_decay=None),
             device="cpu")
    return out


def test_parse_lora_forms():
    assert parse_lora("owner/name") == LoraSpec(source="owner/name", scale=1.0)
    assert parse_lora("owner/name:0.5") == LoraSpec(source="owner/name", scale=0.5)
    assert parse_lora("/a/b:c") == LoraSpec(source="/a/b:c")  # a colon that is not a scale stays in the path
    assert parse_lora("dir:-1e-1").scale == -0.1
    with pytest.raises(InputError, match="empty --lora"):
        parse_lora("  ")
    with pytest.raises(ValueError, match="finite"):
        LoraSpec(source="x", scale=float("nan"))
    spec = ModelSpec(name="m", lora=["a/b:0.3", {"source": "c", "scale": 2}])
    assert spec.lora == (LoraSpec(source="a/b", scale=0.3), LoraSpec(source="c", scale=2.0))
    assert ModelSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_a_spec_without_lora_is_stored_and_placed_as_before():
    from diffprobe.commands.generate import default_out, spec_from_flags

    spec, _, _ = spec_from_flags(model="shapes", family=None, dtype=None, device=None, prompt=["a red circle"],
                                 prompts_file=None, seeds="0-3", steps=2, scheduler=None, height=None, width=None,
                                 generator_device="cpu", guidance="cfg", scale=None, guidance_param=[],
                                 concepts=None)
    # Recorded with the code before LoRA existed: the same command must land in the same run folder.
    assert str(default_out(spec)) == "runs/shapes-2faac8ef"
    assert set(spec.model_dump()["model"]) == {"name", "family", "dtype", "device"}
    assert RunSpec.model_validate(spec.model_dump(mode="json")) == spec
    with_lora, _, _ = spec_from_flags(model="shapes", family=None, dtype=None, device=None, prompt=["a red circle"],
                                      prompts_file=None, seeds="0-3", steps=2, scheduler=None, height=None,
                                      width=None, generator_device="cpu", guidance="cfg", scale=None,
                                      guidance_param=[], concepts=None, lora=["x/y:0.5"])
    assert with_lora.model.lora == (LoraSpec(source="x/y", scale=0.5),)
    assert default_out(with_lora) != default_out(spec)


def test_the_lora_folder_holds_adapters_and_a_card(lora_dir, tiny_sd_path):
    from safetensors.torch import load_file

    weights = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    assert weights and all("lora" in k for k in weights)
    # the official default modules: q and k of attn1/attn2 in the five blocks, an A and a B matrix each
    assert all(k.split("unet.", 1)[1].startswith(("down_blocks.1.", "down_blocks.2.", "mid_block.", "up_blocks.1.",
                                                   "up_blocks.2.")) for k in weights)
    assert len(weights) == 28 * 2
    card = json.loads((lora_dir / "finetune.json").read_text())
    assert card["kind"] == "lora" and card["lora"] == {"rank": 4, "alpha": 4}
    assert not (lora_dir / "unet").exists()  # an adapter, not a model folder


def run_images(run):
    store = open_run(run)
    try:
        return {s.seed: np.asarray(s.image()) for s in store.samples()}, store.keys(), \
            store.get_meta("config")["model"]
    finally:
        store.close()


def generate(args, capsys, monkeypatch):
    from diffprobe.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr(sys, "argv", ["diffprobe", "generate", "-q", "--steps", "2", "-p", "two red bars",
                                      "--seeds", "0-1", "--device", "cpu", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_generate_with_lora_changes_the_images_and_keys_them(lora_dir, tiny_sd_path, tmp_path, capsys,
                                                             monkeypatch):
    runs = {}
    for name, extra in (("base", []), ("lora", ["--lora", lora_dir]), ("zero", ["--lora", f"{lora_dir}:0"])):
        code, err = generate(["--model", tiny_sd_path, "--out", tmp_path / name, *extra], capsys, monkeypatch)
        assert code == 0, err
        runs[name] = run_images(tmp_path / name)
    (base, base_keys, base_id), (lora, lora_keys, lora_id), (zero, zero_keys, zero_id) = (
        runs["base"], runs["lora"], runs["zero"])
    assert "lora" not in base_id
    assert [(e["scale"], len(e["sha256"])) for e in lora_id["lora"]] == [(1.0, 64)]
    assert zero_id["lora"][0]["scale"] == 0.0 and zero_id["lora"][0]["sha256"] == lora_id["lora"][0]["sha256"]
    assert all(not np.array_equal(base[s], lora[s]) for s in base)  # the adapter changes every image
    assert all(np.array_equal(base[s], zero[s]) for s in base)  # scale 0 adds nothing
    assert not (base_keys & lora_keys) and not (lora_keys & zero_keys) and not (base_keys & zero_keys)
    # The same LoRA call again generates nothing: its keys are stable.
    code, err = generate(["--model", tiny_sd_path, "--out", tmp_path / "lora", "--lora", lora_dir], capsys,
                         monkeypatch)
    assert code == 0 and "0 generated, 2 already there" in err


def test_bad_lora_sources_give_one_line(tiny_sd_path, tiny_pixart_path, lora_dir, tmp_path, capsys, monkeypatch):
    code, err = generate(["--model", tiny_sd_path, "--out", tmp_path / "a", "--lora", tmp_path / "nope"], capsys,
                         monkeypatch)
    assert code == 2 and "neither a local folder or file nor a hub id" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = generate(["--model", tiny_sd_path, "--out", tmp_path / "b", "--lora", empty], capsys, monkeypatch)
    assert code == 2 and "holds no weights" in err
    code, err = generate(["--model", tiny_pixart_path, "--out", tmp_path / "c", "--lora", lora_dir], capsys,
                         monkeypatch)
    assert code == 2 and "no LoRA loading for PixArtAlphaPipeline" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_lora_training_is_refused_where_diffusers_cannot_load_it(tiny_pixart_path, tmp_path):
    data = write_data(tmp_path / "data", n=1)
    with pytest.raises(DiffprobeError, match="only into sd, sdxl pipelines"):
        finetune(data, str(tiny_pixart_path), tmp_path / "out", FinetuneOptions(lora_rank=2, steps=1, batch=1),
                 device="cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.training").exists()


def test_a_spec_file_names_lora_adapters_under_the_model(tmp_path):
    from diffprobe.spec import load_spec_file

    file = tmp_path / "run.yaml"
    file.write_text('model: {name: shapes, lora: ["some/lora:0.7", {source: ./local, scale: 2}]}\n'
                    "prompts: [a red circle]\nseeds: 0-1\n")
    spec, _, _ = load_spec_file(file)
    assert spec.model.lora == (LoraSpec(source="some/lora", scale=0.7), LoraSpec(source="./local", scale=2.0))
    file.write_text('model: {name: shapes, lora: [{source: x, scale: .nan}]}\nprompts: [a]\n')
    with pytest.raises(InputError, match="model.lora.0.scale: a LoRA scale must be a finite number"):
        load_spec_file(file)
