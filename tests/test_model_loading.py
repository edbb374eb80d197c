"""Loading models: broken folders and bad options give one clear error naming the folder; built-in models come
from the registry; the model's recommended settings reach the Python API and the CLI alike."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import assert_user_error, cli

from diffprobe.errors import InputError, ModelNotFoundError
from diffprobe.guidance import make_guider
from diffprobe.models import choose_device, load_model, registry
from diffprobe.models.libraries import quiet_libraries
from diffprobe.sampling import sample

SIZE = ["--height", "16", "--width", "16", "--steps", "1"]


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _remove_tokenizer_vocabulary(folder: Path) -> None:
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (folder / "tokenizer" / name).unlink()


def _bad_unet_values(folder: Path) -> None:
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = "x"
    (folder / "unet" / "config.json").write_text(json.dumps(config))


# name -> (how to break a copy of the tiny SD folder, a fragment the error must contain)
BROKEN = {
    "index-garbage": (lambda d: _write(d / "model_index.json", "{nope"), "model_index.json cannot be read as JSON"),
    "index-list": (lambda d: _write(d / "model_index.json", "[1, 2]"), "model_index.json holds a JSON list"),
    "index-no-class": (lambda d: _write(d / "model_index.json", '{"unet": ["diffusers", "UNet2DConditionModel"]}'),
                       "no pipeline class"),
    "missing-unet": (lambda d: shutil.rmtree(d / "unet"), "component folder(s) unet"),
    "missing-tokenizer-folder": (lambda d: shutil.rmtree(d / "tokenizer"), "component folder(s) tokenizer"),
    "missing-tokenizer-files": (_remove_tokenizer_vocabulary, "tokenizer/ has no vocabulary files"),
    "missing-weights": (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
                        "vae/ holds no weights"),
    "truncated-safetensors": (lambda d: _truncate(d / "unet" / "diffusion_pytorch_model.safetensors"),
                              "unet/diffusion_pytorch_model.safetensors is not a complete safetensors file"),
    "config-garbage": (lambda d: _write(d / "unet" / "config.json", "{bad"), "unet/config.json cannot be read"),
    "config-list": (lambda d: _write(d / "text_encoder" / "config.json", "[]"), "text_encoder/config.json holds"),
    "config-missing": (lambda d: (d / "text_encoder" / "config.json").unlink(), "text_encoder/config.json is missing"),
    "config-bad-values": (_bad_unet_values, "block_out_channels"),
    "scheduler-garbage": (lambda d: _write(d / "scheduler" / "scheduler_config.json", "{x"),
                          "scheduler/scheduler_config.json cannot be read"),
    "recommended-garbage": (lambda d: _write(d / "diffprobe.json", '{"steps": "many"}'), '"steps" must be'),
}


@pytest.fixture
def broken(tiny_sd_path, tmp_path, request) -> tuple[Path, str]:
    break_it, fragment = BROKEN[request.param]
    folder = tmp_path / f"model-{request.param}"
    shutil.copytree(tiny_sd_path, folder)
    break_it(folder)
    return folder, fragment


@pytest.mark.parametrize("broken", list(BROKEN), indirect=True)
def test_broken_folder_names_the_folder_and_the_fault(broken, tmp_path, capsys, monkeypatch):
    folder, fragment = broken
    with pytest.raises(ModelNotFoundError) as err:
        load_model(str(folder), device="cpu")
    assert str(folder) in str(err.value) and fragment in str(err.value)
    run = tmp_path / "run"
    result = cli(["generate", "--model", folder, "--prompt", "a cat", *SIZE, "--out", run, "-q"], capsys, monkeypatch)
    assert_user_error(result, str(folder), fragment)
    assert not run.exists()


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine, as one without CUDA and MPS (whatever it really has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(("device", "fragment"), [
    ("cuda", "no usable CUDA device"), ("cuda:1", "no usable CUDA device"), ("mps", "MPS (Apple silicon) is not"),
    ("bogus", "unknown device 'bogus'"), ("meta", "not supported"),
])
def test_unavailable_device_is_one_line(no_gpu, device, fragment, tiny_sd_path, tmp_path, capsys, monkeypatch):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        choose_device(device)
    result = cli(["generate", "--model", tiny_sd_path, "--prompt", "a cat", *SIZE, "--device", device,
                  "--out", tmp_path / "run", "-q"], capsys, monkeypatch)
    assert_user_error(result, f"'{device}'", fragment)


def test_auto_device_without_gpu_is_cpu(no_gpu):
    assert choose_device(None) == choose_device("auto") == torch.device("cpu")
    assert choose_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("family", ["sdxl", "pixart"])
def test_family_that_contradicts_the_folder(family, tiny_sd_path, tmp_path, capsys, monkeypatch):
    with pytest.raises(InputError, match=f"--family {family} does not match"):
        load_model(str(tiny_sd_path), family=family, device="cpu")
    result = cli(["generate", "--model", tiny_sd_path, "--family", family, "--prompt", "a cat", *SIZE,
                  "--out", tmp_path / "run", "-q"], capsys, monkeypatch)
    assert_user_error(result, str(tiny_sd_path), "StableDiffusionPipeline", "--family sd")


def test_home_folder_of_unknown_user(tmp_path, capsys, monkeypatch):
    model = "~diffprobe-no-such-user/x"
    with pytest.raises(ModelNotFoundError, match="cannot expand the home folder"):
        load_model(model)
    result = cli(["generate", "--model", model, "--prompt", "a cat", "--out", tmp_path / "run", "-q"],
                 capsys, monkeypatch)
    assert_user_error(result, model)


def test_unknown_scheduler_is_refused_before_loading(tiny_sd_path):
    with pytest.raises(InputError, match="unknown scheduler 'fast'"):
        load_model(str(tiny_sd_path), device="cpu", scheduler="fast")


def test_registered_model_loads_by_name(tiny_sd_path, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "tiny-registered", lambda: tiny_sd_path)
    assert "tiny-registered" in registry.available_models()
    adapter = load_model("tiny-registered", device="cpu")
    assert adapter.model_id == "tiny-registered"
    assert adapter.identity()["weights_sha256"] == load_model(str(tiny_sd_path), device="cpu").weights["weights_sha256"]


def test_shapes_is_found_without_importing_the_world_first():
    """``load_model("shapes")`` in a fresh interpreter: the registry imports the provider by itself, and the shipped
    recommendations (25 steps, scale 3.5) reach ``sample`` and ``make_guider``."""
    code = (
        "import sys\n"
        "from diffprobe.models import load_model\n"
        "from diffprobe.guidance import make_guider\n"
        "print('before', 'diffprobe.worlds.shapes' in sys.modules)\n"
        "a = load_model('shapes', device='cpu')\n"
        "print('after', 'diffprobe.worlds.shapes' in sys.modules)\n"
        "print(a.model_id, a.recommended, a.default_steps, make_guider('cfg', **a.guidance_defaults()).config())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout.splitlines()
    assert out[0] == "before False" and out[1] == "after True"
    assert out[2] == "shapes {'steps': 25, 'guidance_scale': 3.5} 25 {'name': 'cfg', 'scale': 3.5, 'rescale': 0.0}"


def test_sample_uses_the_recommended_steps_when_unset(tiny_sd, monkeypatch):
    def steps_run(**kwargs) -> int:
        seen = []
        sample(tiny_sd, make_guider("cfg"), ["a cat"], [0], height=16, width=16, decode=False,
               on_step=lambda i, n: seen.append(n), **kwargs)
        return seen[-1]

    assert steps_run() == 50  # the tiny checkpoint recommends nothing
    monkeypatch.setattr(tiny_sd, "recommended", {"steps": 3, "guidance_scale": 2.5})
    assert tiny_sd.default_steps == 3 and steps_run() == 3 and steps_run(steps=2) == 2
    assert tiny_sd.guidance_defaults() == {"scale": 2.5}
    assert make_guider("cfg", **tiny_sd.guidance_defaults()).config()["scale"] == 2.5


def test_encode_encodes_each_text_once_and_indexes_back(tiny_sd):
    texts = ["", "a red cube", "", "a blue ball", "a red cube"]
    both = tiny_sd.encode(texts)
    alone = {t: tiny_sd.encode([t]) for t in set(texts)}
    for i, text in enumerate(texts):
        assert torch.equal(both.tensors["prompt_embeds"][i], alone[text].tensors["prompt_embeds"][0])
        assert both.tokens[i] == alone[text].tokens[0] and both.truncated[i] == alone[text].truncated[0]


def test_library_warnings_are_held_back_and_what_matters_is_said_once(caplog):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    caplog.set_level(logging.WARNING, logger="diffprobe")
    with quiet_libraries("MODEL"):
        for _ in range(2):
            diffusers_logging.get_logger("diffusers.models").warning("Some weights of unet were not initialized")
        transformers_logging.get_logger("transformers.x").warning("`CLIPImageProcessor` requires torchvision")
    said = [r.getMessage() for r in caplog.records if r.name == "diffprobe"]
    assert said == ["warning while loading MODEL: diffusers: Some weights of unet were not initialized"]


def generate_stderr(model: Path, out: Path, *global_options: str) -> str:
    args = [sys.executable, "-m", "diffprobe.cli", *global_options, "generate", "--model", str(model),
            "--prompt", "a cat", *SIZE, "--out", str(out), "-q"]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_generate_shows_library_output_only_with_verbose(tiny_sd_path, tmp_path):
    quiet = generate_stderr(tiny_sd_path, tmp_path / "quiet")
    assert "Loading pipeline components" not in quiet and "Loading weights" not in quiet
    assert "torchvision" not in quiet and "1 generated" in quiet
    verbose = generate_stderr(tiny_sd_path, tmp_path / "verbose", "--verbose")
    assert "Loading pipeline components" in verbose and "1 generated" in verbose
