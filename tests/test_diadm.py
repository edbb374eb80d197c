"""DiADM at toy scale: training lowers the loss, the pseudo-label changes the sample, a killed run resumes to the
weights of an uninterrupted one, sampling writes a run every score reads, and bad inputs give clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffprobe.diadm import DiadmOptions, load, sample_diadm, train_diadm
from diffprobe.diadm.data import Batches, read_training_images
from diffprobe.diadm.model import condition_vectors
from diffprobe.diadm.sample import ddim_sample
from diffprobe.errors import InputError

TINY = dict(embedder="random-projection", resolution=8, channels=1, width=8, batch=4, warmup=0, log_every=5,
            checkpoint_every=0, seed=0)


def write_images(folder, per_class=4, classes=("dark", "light")):
    """Tiny 8x8 grayscale images: a bright square on a background whose level depends on the class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            im = np.full((8, 8), 40 + 150 * c, np.uint8)
            r, k = rng.integers(0, 5, size=2)
            im[r:r + 3, k:k + 3] = 255 - im[0, 0]
            Image.fromarray(im).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "train")


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """A pseudocond model trained for 20 steps (its loss.csv shows the loss going down)."""
    out = tmp_path_factory.mktemp("models") / "pseudo"
    train_diadm(images, out, DiadmOptions(cond="pseudocond", steps=20, lr=2e-3, **TINY), device="cpu",
                cache_dir=tmp_path_factory.mktemp("cache"))
    return out


def test_training_lowers_the_loss_and_writes_a_model_folder(trained):
    rows = (trained / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert len(losses) == 4  # 20 steps, one row per 5
    assert losses[-1] < 0.7 * losses[0], losses  # about 0.94 -> 0.42
    card = json.loads((trained / "diadm.json").read_text())
    assert card["mode"] == "pseudocond" and card["steps"] == 20 and card["images_seen"] == 80
    assert card["data"]["classes"] == ["dark", "light"] and card["data"]["images"] == 8
    assert card["embedder"]["spec"] == "random-projection" and card["conditioning"]["dim"] == card["embedder"]["dim"]
    assert not trained.with_name("pseudo.training").exists()  # checkpoints are removed once the model is written


def test_the_pseudo_label_is_the_l2_normalised_feature_times_sqrt_dim(trained):
    model = load(trained)
    vectors = condition_vectors("pseudocond", model.features, None, 0)
    expected = model.features / model.features.norm(dim=1, keepdim=True) * model.features.shape[1] ** 0.5
    assert torch.allclose(vectors, expected, atol=1e-5)
    assert torch.allclose(vectors.norm(dim=1), torch.full((8,), model.features.shape[1] ** 0.5), atol=1e-3)
    one_hot = condition_vectors("class", None, [1, 0], 2)
    assert torch.equal(one_hot, torch.tensor([[0.0, 2 ** 0.5], [2 ** 0.5, 0.0]]))


def test_the_condition_changes_the_sample_and_the_seed_fixes_it(trained):
    model = load(trained)
    cond = condition_vectors("pseudocond", model.features, None, 0)
    picks = cond[[0, 5, 0]]  # a dark-class image, a light-class one, the first again
    x = ddim_sample(model, [3, 3, 3], picks, steps=4, device=torch.device("cpu"))
    assert torch.equal(x[0], x[2])
    assert (x[0] - x[1]).abs().mean() > 0.01  # a model that ignored the condition would give 0 exactly
    again = ddim_sample(model, [3], picks[:1], steps=4, device=torch.device("cpu"))
    assert torch.allclose(again[0], x[0], atol=1e-5)  # batch size does not decide the image


def test_sampling_writes_one_image_per_training_feature_and_resumes(trained, tmp_path):
    from diffprobe.metrics.images import load_image_set
    from diffprobe.store import open_run

    first = sample_diadm(trained, tmp_path / "run", steps=3, batch_size=3, limit=5, device="cpu")
    assert (first.generated, first.skipped) == (5, 0)
    full = sample_diadm(trained, tmp_path / "run", steps=3, batch_size=3, device="cpu")
    assert (full.total, full.generated, full.skipped) == (8, 3, 5)
    with open_run(tmp_path / "run") as run:
        samples = run.samples()
        spec = run.spec
        assert run.get_meta("diadm_sampling")["images"] == 8  # summed over both calls
    assert sorted(s.seed for s in samples) == list(range(8))
    files = json.loads((trained / "diadm.json").read_text())["data"]["files"]
    by_seed = {s.seed: s for s in samples}
    assert all(files[i] in by_seed[i].prompt for i in range(8))  # image i is conditioned on training image i
    assert by_seed[0].provenance["sampler"]["steps"] == 3 and by_seed[0].provenance["sampler"]["scheduler"] == "ddim"
    assert spec.model.family == "diadm" and spec.sampler.steps == 3
    assert Image.open(by_seed[0].image_path).size == (8, 8)
    found = load_image_set(tmp_path / "run", flat=True)
    assert found.source == "run" and len(found.items) == 8


def test_held_out_features_condition_the_sample(trained, tmp_path):
    held_out = write_images(tmp_path / "test", per_class=2)
    result = sample_diadm(trained, tmp_path / "run", features_from=held_out, steps=3, device="cpu",
                          cache_dir=tmp_path / "cache")
    assert result.generated == 4
    model = load(trained)
    features = np.random.default_rng(1).normal(size=(3, model.cond_dim)).astype(np.float32)
    np.save(tmp_path / "f.npy", features)
    from_array = sample_diadm(trained, tmp_path / "run2", features_from=tmp_path / "f.npy", steps=3, device="cpu")
    assert from_array.generated == 3


def test_uncond_and_class_models_sample_as_many_images_as_training_images(images, tmp_path):
    for mode in ("uncond", "class"):
        out = tmp_path / mode
        train_diadm(images, out, DiadmOptions(cond=mode, steps=2, **TINY), device="cpu")
        result = sample_diadm(out, tmp_path / f"run-{mode}", steps=2, device="cpu")
        assert result.generated == 8
    from diffprobe.store import open_run

    with open_run(tmp_path / "run-class") as run:
        prompts = sorted({s.prompt for s in run.samples()})
    assert prompts == ["class: dark", "class: light"]
    assert not (tmp_path / "uncond" / "condition.safetensors").exists()
    with pytest.raises(InputError, match="--features-from applies to pseudocond"):
        sample_diadm(tmp_path / "uncond", tmp_path / "r", features_from=images, device="cpu")


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(images, tmp_path):
    options = DiadmOptions(cond="pseudocond", steps=6, lr=1e-3, **{**TINY, "checkpoint_every": 2})
    straight = train_diadm(images, tmp_path / "a", options, device="cpu", cache_dir=tmp_path / "cache")
    killed = train_diadm(images, tmp_path / "b", options, device="cpu", cache_dir=tmp_path / "cache",
                         stop=lambda step: step == 5)
    assert killed.out is None and not (tmp_path / "b").exists()
    resumed = train_diadm(images, tmp_path / "b", options, device="cpu", cache_dir=tmp_path / "cache")
    assert straight.resumed_from is None and resumed.resumed_from == 4 and resumed.steps == 6
    for name in ("unet/diffusion_pytorch_model.safetensors", "condition.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    loss = [(tmp_path / d / "loss.csv").read_text() for d in ("a", "b")]
    assert [r.split(",")[:3] for r in loss[0].splitlines()] == [r.split(",")[:3] for r in loss[1].splitlines()]


def test_batches_are_a_pure_function_of_their_position():
    pixels = torch.arange(10.0).view(10, 1, 1, 1)
    stream = Batches(pixels, None, 4, seed=3)(0, 0, 1)
    seq = [next(stream)[0].flatten().tolist() for _ in range(5)]  # 20 items: two shuffled epochs of 10
    assert sorted(v for b in seq for v in b) == sorted(list(range(10)) * 2)
    assert sorted(seq[0] + seq[1] + seq[2][:2]) == list(range(10))  # the first epoch holds every image once
    assert next(Batches(pixels, None, 4, seed=3)(3, 0, 1))[0].flatten().tolist() == seq[3]  # a resume at 3
    assert next(Batches(pixels, None, 4, seed=4)(0, 0, 1))[0].flatten().tolist() != seq[0]


def test_bad_inputs_give_clear_errors(images, trained, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        train_diadm(tmp_path / "empty", tmp_path / "m", DiadmOptions(**TINY), device="cpu")
    with pytest.raises(InputError, match="no such folder"):
        train_diadm(tmp_path / "missing", tmp_path / "m", DiadmOptions(**TINY), device="cpu")
    with pytest.raises(InputError, match="unknown --cond 'label'"):
        train_diadm(images, tmp_path / "m", DiadmOptions(cond="label", **TINY), device="cpu")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (8, 8)).save(flat / "a.png")
    with pytest.raises(InputError, match="--cond class needs a class per image"):
        train_diadm(flat, tmp_path / "m", DiadmOptions(cond="class", **TINY), device="cpu")
    (flat / "b.png").write_text("not an image")
    used_whole = r"b\.png: unreadable image .*\(fix or remove them: a training set is used whole\)$"
    with pytest.raises(InputError, match=used_whole):
        train_diadm(flat, tmp_path / "m", DiadmOptions(cond="uncond", **TINY), device="cpu")
    (flat / "b.png").unlink()
    np.save(tmp_path / "wrong.npy", np.ones((2, 7), np.float32))
    with pytest.raises(InputError, match=r"dimension 7, but the model was trained on \d+-dimensional"):
        sample_diadm(trained, tmp_path / "run", features_from=tmp_path / "wrong.npy", device="cpu")
    with pytest.raises(InputError, match="not a DiADM model folder"):
        sample_diadm(tmp_path, tmp_path / "run", device="cpu")
    with pytest.raises(InputError, match="already holds a trained DiADM model"):
        train_diadm(images, trained, DiadmOptions(**TINY), device="cpu")
    assert not (tmp_path / "m").exists() and not (tmp_path / "run").exists()


def test_the_cli_trains_and_samples_and_refuses_bad_input(images, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffprobe.cli import app

    monkeypatch.setenv("DIFFPROBE_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "diadm", "--images", str(images), "--cond", "class", "--steps", "2",
                              "--resolution", "8", "--channels", "1", "--width", "8", "--batch-size", "2",
                              "--device", "cpu", "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "diadm", str(tmp_path / "m"), "--steps", "2", "--device", "cpu", "-q",
                              "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "8 sampled, 0 already in the run" in res.output
    res = runner.invoke(app, ["train", "diadm", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no such folder" in res.output
    res = runner.invoke(app, ["train", "diadm", "--images", str(images), "--cond", "both",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown --cond 'both'" in res.output


def test_images_are_read_in_path_order_with_their_classes(images):
    data = read_training_images(images)
    assert data.relative() == [f"{c}/{i}.png" for c in ("dark", "light") for i in range(4)]
    assert data.labels == [0] * 4 + [1] * 4 and data.classes == ["dark", "light"]


def test_nearest_distances_match_brute_force():
    from diffprobe.metrics.memorisation import distance_summary, nearest_distances

    rng = np.random.default_rng(0)
    train, queries = rng.normal(size=(50, 6)), rng.normal(size=(13, 6))
    idx, dist = nearest_distances(train, queries, chunk=5)
    brute = np.linalg.norm(queries[:, None, :] - train[None, :, :], axis=2)
    assert np.array_equal(idx, brute.argmin(1)) and np.allclose(dist, brute.min(1), atol=1e-5)
    s = distance_summary(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0, 5.0]), copy_quantile=0.5)
    assert s["median"] == 1.5 and s["median_over_reference"] == 0.5 and s["near_copy_threshold"] == 3.0
    assert s["near_copy_fraction"] == 0.75


def write_idx(path, array):
    """An IDX file as the MNIST distribution has them (gzipped, big-endian sizes, uint8 data)."""
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_a_dataset_name_is_written_once_as_a_class_folder(tmp_path, monkeypatch):
    from diffprobe.diadm import data

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, size=(12, 28, 28)), np.arange(12) % 10
    for im_file, lab_file in data.FASHION_FILES.values():
        write_idx(tmp_path / im_file, images)
        write_idx(tmp_path / lab_file, labels)
    monkeypatch.setattr(data, "FASHION_MNIST", tmp_path)
    found = read_training_images("fashion-mnist:train:5", cache_dir=tmp_path / "cache")
    chosen = np.sort(np.random.default_rng(data.SUBSET_SEED).permutation(12)[:5])
    assert len(found) == 5 and found.root.parent == tmp_path / "cache" / "datasets"
    assert sorted(p.name for p in found.paths) == [f"train-{i:05d}.png" for i in chosen]
    for path, label in zip(found.paths, found.labels, strict=True):
        i = int(path.stem.split("-")[1])
        assert found.classes[label] == f"{labels[i]}-{data.FASHION_CLASSES[labels[i]]}"
        assert np.array_equal(np.asarray(Image.open(path)), images[i])
    assert len(read_training_images("fashion-mnist:test", cache_dir=tmp_path / "cache")) == 12
    for bad in ("fashion-mnist:val", "fashion-mnist:train:0", "fashion-mnist:train:x", "fashion-mnist:train:13"):
        with pytest.raises(InputError, match="fashion-mnist"):
            read_training_images(bad, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(data, "FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        read_training_images("fashion-mnist:train:4", cache_dir=tmp_path / "cache")
