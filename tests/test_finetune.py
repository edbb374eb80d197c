"""``diffprobe seeds finetune`` and the training core: what trains, what stays bitwise equal, that the loss goes
down, exact resume after a kill, and the errors for bad input (nothing written)."""

from __future__ import annotations

import csv
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffprobe.errors import InputError
from diffprobe.finetune import FinetuneOptions, diffusion_loss, finetune, noise_scheduler_of, select, work_folder
from diffprobe.finetune.data import Batches, read_image_folder
from diffprobe.finetune.layers import attention_blocks, parse_blocks

FAST = dict(batch=2, accumulation=1, steps=3, checkpoint_every=0, log_every=1, lr=1e-3)


def write_data(folder, n=4, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = np.full((size, size + 8, 3), 30 * i, np.uint8)  # not square: exercises resize + crop
        arr[:, : 6 * (i + 1)] = (255, 40 * i, 0)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"{i + 1} red bars", "count": i + 1})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "set")


def unet_state(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()


def component_state(folder, name):
    from safetensors.torch import load_file

    (file,) = (folder / name).glob("*.safetensors")
    return load_file(str(file))


# Independent of the selection code: the official rule written as a regular expression over parameter names.
QK_DEFAULT = re.compile(r"^(down_blocks\.[12]|mid_block|up_blocks\.[12])\..*\.attn[12]\.to_[qk]\.(weight|bias)$")


def test_qk_only_trains_exactly_the_selected_projections(tiny_sd_path, data, tmp_path):
    out = tmp_path / "qk"
    result = finetune(data, str(tiny_sd_path), out, FinetuneOptions(**FAST), device="cpu")
    base, tuned = unet_state(tiny_sd_path), unet_state(out)
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    expected = {k for k in base if QK_DEFAULT.match(k)}
    # q,k x attn1,attn2 x 7 transformers (one in each down block and the mid block, two in each up block)
    assert changed == expected and len(expected) == 2 * 2 * 7
    assert result.trainable_parameters == sum(base[k].numel() for k in expected)
    for name in ("text_encoder", "vae"):  # the other components are the base model's files
        a, b = component_state(tiny_sd_path, name), component_state(out, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((out / "finetune.json").read_text())
    assert card["kind"] == "projections" and card["steps"] == 3 and card["prediction_type"] == "epsilon"
    assert card["selection"]["blocks"] == ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1",
                                           "up_blocks.2"]
    assert card["saved"].startswith("EMA") and card["data"]["images"] == 4
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "q, k" in (out / "README.md").read_text()
    assert [int(r["step"]) for r in csv.DictReader(open(out / "loss.csv"))] == [1, 2, 3]
    assert not work_folder(out).exists()  # checkpoints are removed once the model is complete

    from diffprobe.models import load_model

    assert load_model(str(out), device="cpu").family == "sd"  # --model OUT loads it


def test_modules_and_layers_select_the_ablations(tiny_sd_path, data, tmp_path):
    out = tmp_path / "vo"
    finetune(data, str(tiny_sd_path), out, FinetuneOptions(**{**FAST, "steps": 1}, layers="d0", attentions="attn2",
                                                           projections="v,o"), device="cpu")
    base, tuned = unet_state(tiny_sd_path), unet_state(out)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    pattern = re.compile(r"^down_blocks\.0\..*\.attn2\.(to_v\.weight|to_out\.0\.(weight|bias))$")
    assert changed == {k for k in base if pattern.match(k)} and changed


def test_full_fine_tuning_changes_the_rest_too(tiny_sd_path, data, tmp_path):
    out = tmp_path / "full"
    result = finetune(data, str(tiny_sd_path), out, FinetuneOptions(**{**FAST, "steps": 1}, full=True),
                      device="cpu")
    base, tuned = unet_state(tiny_sd_path), unet_state(out)
    assert result.trainable_parameters == result.total_parameters
    assert not torch.equal(base["conv_in.weight"], tuned["conv_in.weight"])
    assert not torch.equal(base["down_blocks.0.resnets.0.conv1.weight"], tuned["down_blocks.0.resnets.0.conv1.weight"])


def fixed_set_loss(model_path, data) -> float:
    """The diffusion loss on the 4 images with 16 fixed draws of noise and timestep (the same for every model)."""
    from diffprobe.models import load_model

    adapter = load_model(str(model_path), device="cpu", dtype="fp32")
    pixels, texts = Batches(read_image_folder(data), 4, 32, 0, random_flip=False).batch(0)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        scheduler = noise_scheduler_of(adapter)
        return float(torch.stack([diffusion_loss(adapter, scheduler, pixels, texts, gen) for _ in range(16)]).mean())


LOSS_OPTS = dict(batch=4, accumulation=1, checkpoint_every=0, log_every=5, ema_decay=None, random_flip=False)


def test_qk_fine_tuning_lowers_the_loss_on_a_fixed_set(tiny_sd_path, data, tmp_path):
    base = fixed_set_loss(tiny_sd_path, data)
    finetune(data, str(tiny_sd_path), tmp_path / "qk", FinetuneOptions(**LOSS_OPTS, steps=12, lr=3e-2), device="cpu")
    assert fixed_set_loss(tmp_path / "qk", data) < base - 0.005  # paired draws: the same noise and timesteps


@pytest.mark.slow
def test_full_fine_tuning_lowers_it_further(tiny_sd_path, data, tmp_path):
    finetune(data, str(tiny_sd_path), tmp_path / "qk", FinetuneOptions(**LOSS_OPTS, steps=12, lr=3e-2), device="cpu")
    finetune(data, str(tiny_sd_path), tmp_path / "full", FinetuneOptions(**LOSS_OPTS, steps=5, lr=3e-3, full=True),
             device="cpu")
    # the whole denoiser fits four images much faster than its Q/K projections
    assert fixed_set_loss(tmp_path / "full", data) < fixed_set_loss(tmp_path / "qk", data)


def test_v_prediction_models_train_on_the_velocity(tiny_sd_v_path, data):
    """The loss target follows the scheduler: for v-prediction it is alpha*noise - sigma*x0, not the noise."""
    from diffprobe.models import load_model

    adapter = load_model(str(tiny_sd_v_path), device="cpu", dtype="fp32")
    scheduler = noise_scheduler_of(adapter)
    assert scheduler.config.prediction_type == "v_prediction"
    pixels, texts = Batches(read_image_folder(data), 2, 32, 0, random_flip=False).batch(0)
    seen = {}
    original = adapter.predict

    def spy(noisy, t, cond, denoiser=None):
        out = original(noisy, t, cond, denoiser=denoiser)
        seen.update(noisy=noisy, t=t, out=out)
        return out

    adapter.predict = spy
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        loss = diffusion_loss(adapter, scheduler, pixels, texts, gen)
    # Rebuild x0 and the noise from the same generator draws and the textbook formulas.
    from diffprobe.finetune.run import encode_latents

    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x0 = encode_latents(adapter.vae, pixels, gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    assert torch.equal(t, seen["t"])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(seen["noisy"], a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-5)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert loss == pytest.approx(float(((seen["out"] - v) ** 2).mean()), rel=1e-5)


def test_a_killed_run_resumes_to_the_same_weights_bit_for_bit(tiny_sd_path, data, tmp_path):
    opts = FinetuneOptions(batch=2, accumulation=2, steps=5, checkpoint_every=2, log_every=3, lr=1e-3,
                           ema_decay=0.9)
    finetune(data, str(tiny_sd_path), tmp_path / "straight", opts, device="cpu")
    out = tmp_path / "killed"
    # "Killed" after step 3: step 3 is lost, the checkpoint of step 2 remains.
    stopped = finetune(data, str(tiny_sd_path), out, opts, device="cpu", stop=lambda step: step == 3)
    assert stopped.out is None and stopped.steps == 3 and not out.exists()
    assert sorted(p.name for p in work_folder(out).glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = finetune(data, str(tiny_sd_path), out, opts, device="cpu")
    assert resumed.resumed_from == 2 and resumed.steps == 5
    a, b = unet_state(tmp_path / "straight"), unet_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [list(csv.DictReader(open(p / "loss.csv"))) for p in (tmp_path / "straight", out)]
    assert [(r["step"], r["loss"]) for r in rows[0]] == [(r["step"], r["loss"]) for r in rows[1]]


def test_worker_processes_read_the_same_batches(data):
    """Batches are a function of their position: in DataLoader workers, or as process 1 of 2, the same ones."""
    examples = read_image_folder(data)
    plain, ahead = Batches(examples, 3, 16, 7), Batches(examples, 3, 16, 7, workers=2)
    direct = [plain.batch(n) for n in (5, 7, 9)]  # process 1 of 2 from position 2 reads batches 5, 7, 9
    fetched = [b for b, _ in zip(ahead(2, 1, 2), range(3), strict=False)]
    for (pa, ta), (pb, tb) in zip(direct, fetched, strict=True):
        assert torch.equal(pa, pb) and ta == tb
    # 4 images, batches of 3: batch 1 spans the end of epoch 0 and the start of epoch 1; each epoch is a permutation
    epoch0 = plain.batch(0)[1] + plain.batch(1)[1][:1]
    assert sorted(epoch0) == sorted(e.text for e in examples)


def test_resuming_with_other_settings_is_refused(tiny_sd_path, data, tmp_path):
    opts = FinetuneOptions(**{**FAST, "checkpoint_every": 1})
    finetune(data, str(tiny_sd_path), tmp_path / "m", opts, device="cpu", stop=lambda step: step == 1)
    with pytest.raises(InputError, match=r"other settings .*lr: 0.001 \(stored\) != 0.002 \(now\)"):
        finetune(data, str(tiny_sd_path), tmp_path / "m", FinetuneOptions(**{**FAST, "checkpoint_every": 1,
                                                                              "lr": 2e-3}), device="cpu")


def test_the_shapes_model_uses_the_same_block_rule(tmp_path):
    """The shapes UNet has attention in down_blocks.1-3, mid and up_blocks.0-2; the rule by name trains
    down_blocks.1, down_blocks.2, mid_block, up_blocks.1, up_blocks.2 and leaves the 4x4 down_blocks.3 and
    up_blocks.0 frozen."""
    from diffusers import UNet2DConditionModel

    from diffprobe.worlds import shapes

    unet = UNet2DConditionModel.from_pretrained(shapes.weights_dir() / "unet")
    assert list(attention_blocks(unet)) == ["down_blocks.1", "down_blocks.2", "down_blocks.3", "up_blocks.0",
                                            "up_blocks.1", "up_blocks.2", "mid_block"]
    chosen = select(unet)
    assert {m.split(".attentions")[0] for m in chosen.modules} == {"down_blocks.1", "down_blocks.2", "mid_block",
                                                                   "up_blocks.1", "up_blocks.2"}
    assert all(m.endswith((".attn1.to_q", ".attn1.to_k", ".attn2.to_q", ".attn2.to_k")) for m in chosen.modules)


def test_shapes_fine_tuning_loads_back(tmp_path):
    from diffprobe.models import load_model

    data = write_data(tmp_path / "data", n=2, size=64)
    out = tmp_path / "shapes-qk"
    finetune(data, "shapes", out, FinetuneOptions(**{**FAST, "steps": 1}), device="cpu")
    adapter = load_model(str(out), device="cpu")
    assert adapter.default_size == (64, 64) and (out / "diffprobe.json").is_file()  # recommended settings kept


def test_pixart_and_sdxl_defaults_and_one_step(tiny_pixart_path, tiny_sdxl_path, data, tmp_path):
    from diffusers import PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel.from_pretrained(tiny_pixart_path / "transformer")
    chosen = select(transformer)  # ours: q and k of self- and cross-attention in every transformer block
    assert chosen.blocks == ("transformer_blocks.0", "transformer_blocks.1") and len(chosen.modules) == 8
    assert parse_blocks("d1d2mu1u2", []) == ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1",
                                             "up_blocks.2")
    assert parse_blocks("1", []) == ("transformer_blocks.1",)
    for path, name in ((tiny_pixart_path, "transformer"), (tiny_sdxl_path, "unet")):
        out = tmp_path / name
        finetune(data, str(path), out, FinetuneOptions(**{**FAST, "steps": 1}), device="cpu")
        base, tuned = component_state(path, name), component_state(out, name)
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        assert changed and all(re.search(r"\.attn[12]\.to_[qk]\.(weight|bias)$", k) for k in changed)


# --- bad input: a clear message, nothing written ------------------------------------------------------------


def nothing_written(tmp_path, out):
    assert not out.exists() and not work_folder(out).exists()
    assert not list(tmp_path.glob(".*partial"))


def test_bad_data_and_layers_are_refused_before_anything_is_written(tiny_sd_path, data, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="has no metadata.jsonl"):
        finetune(empty, str(tiny_sd_path), out, FinetuneOptions(**FAST), device="cpu")
    (empty / "metadata.jsonl").write_text("\n")
    with pytest.raises(InputError, match="lists no images"):
        finetune(empty, str(tiny_sd_path), out, FinetuneOptions(**FAST), device="cpu")
    (empty / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(InputError, match="'missing.png' is not in"):
        finetune(empty, str(tiny_sd_path), out, FinetuneOptions(**FAST), device="cpu")
    (empty / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(InputError, match='line 1: needs "file_name" and "text"'):
        finetune(empty, str(tiny_sd_path), out, FinetuneOptions(**FAST), device="cpu")
    with pytest.raises(InputError, match=r"unknown layer\(s\) 'down_blocks.7'.*are: down_blocks.0, down_blocks.1, "
                                         r"down_blocks.2, up_blocks.1"):
        finetune(data, str(tiny_sd_path), out, FinetuneOptions(**FAST, layers="d7"), device="cpu")
    with pytest.raises(InputError, match="unknown projection 'x'; choose from q, k, v, o"):
        finetune(data, str(tiny_sd_path), out, FinetuneOptions(**FAST, projections="q,x"), device="cpu")
    with pytest.raises(InputError, match="--full and --lora exclude each other"):
        finetune(data, str(tiny_sd_path), out, FinetuneOptions(**FAST, full=True, lora_rank=2), device="cpu")
    nothing_written(tmp_path, out)


def test_the_cli_prints_one_line_for_bad_input(tiny_sd_path, data, tmp_path, capsys, monkeypatch):
    from diffprobe.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["diffprobe", "seeds", "finetune", str(data), "--model", str(tiny_sd_path),
                                      "--out", str(out), "--layers", "up_blocks.9", "--device", "cpu"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().startswith("error: unknown layer(s) 'up_blocks.9'")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    nothing_written(tmp_path, out)


def test_the_cli_trains_and_names_the_output(tiny_sd_path, data, tmp_path, capsys, monkeypatch):
    from diffprobe.cli import main

    out = tmp_path / "cli-out"
    monkeypatch.setattr(sys, "argv", ["diffprobe", "seeds", "finetune", str(data), "--model", str(tiny_sd_path),
                                      "--out", str(out), "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
                                      "--checkpoint-every", "1", "--log-every", "1", "--device", "cpu"])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    assert exc.value.code in (0, None), captured.err
    assert captured.out.strip().splitlines()[-1] == str(out)
    assert (out / "unet" / "config.json").is_file() and (out / "finetune.json").is_file()
    with pytest.raises(SystemExit) as exc:  # the finished folder is never overwritten
        main()
    assert exc.value.code == 2 and "already holds a fine-tuned model" in capsys.readouterr().err
