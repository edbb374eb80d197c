"""Finding images for the metrics: manifests, subfolders, flat sets, runs with several guidance variants."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffprobe.errors import InputError, ModelNotFoundError
from diffprobe.metrics.images import load_features, load_image_set


def test_csv_manifest_mixed_sizes_and_missing_files(tmp_path):
    Image.new("RGB", (10, 12)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "b.jpg")
    Image.new("L", (10, 12)).save(tmp_path / "c.png")
    (tmp_path / "manifest.csv").write_text(
        "file,prompt,prompt_id,seed\na.png,a cat,p1,1\nb.jpg,a cat,p1,2\nc.png,a dog,p2,1\ngone.png,a dog,p2,2\n"
    )
    images = load_image_set(tmp_path)
    assert images.source == "manifest"
    assert images.groups() == {"p1": [0, 1], "p2": [2]}
    assert images.prompt_texts() == {"p1": "a cat", "p2": "a dog"}
    assert images.sizes == {"10x12": 2, "30x20": 1}
    assert [reason for _, reason in images.skipped] == ["file missing"]
    assert [it.seed for it in images.items] == [1, 2, 1]
    with pytest.raises(InputError, match="1 bad file"):
        load_image_set(tmp_path, strict=True)


def test_manifest_needs_columns(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"path": "a.png", "prompt": "x"}\n')
    with pytest.raises(InputError, match="'file' and 'prompt'"):
        load_image_set(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="not valid JSON"):
        load_image_set(tmp_path)


def test_flat_recursive_and_not_a_directory(tmp_path):
    for sub in ("x", "y/z"):
        (tmp_path / sub).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / sub / "i.png")
    (tmp_path / "x" / "empty.png").write_bytes(b"")
    flat = load_image_set(tmp_path, flat=True)
    assert flat.source == "flat" and len(flat.items) == 2 and len(flat.skipped) == 1
    grouped = load_image_set(tmp_path)
    assert grouped.source == "subfolders" and list(grouped.groups()) == ["x"]  # y holds no image directly
    with pytest.raises(InputError, match="not a directory"):
        load_image_set(tmp_path / "x" / "i.png")
    with pytest.raises(InputError, match="non-empty 2-D"):
        np.save(tmp_path / "f.npy", np.zeros(3))
        load_features(tmp_path / "f.npy", None)


def test_run_with_two_guidance_variants_needs_a_choice(tmp_path):
    from diffprobe.spec import RunSpec
    from diffprobe.store import NewSample, create_run

    store = create_run(tmp_path / "run", RunSpec(prompts=["a cat"], seeds=[1, 2]))
    items = [
        NewSample(
            key=f"{name}-{seed}",
            prompt="a cat",
            seed=seed,
            image=Image.new("RGB", (8, 8), (seed, 9, 9)),
            guidance={"name": name},
            provenance={},
        )
        for name in ("cfg", "scfg")
        for seed in (1, 2)
    ]
    store.add(items)
    store.close()
    with pytest.raises(InputError, match="2 guidance variants"):
        load_image_set(tmp_path / "run")
    chosen = load_image_set(tmp_path / "run", guidance="scfg")
    assert chosen.source == "run" and [it.seed for it in chosen.items] == [1, 2]
    assert all(it.sha256 and it.path.is_file() for it in chosen.items)

    # IRS reads a synthetic run the same way: one variant, or a clear refusal
    from test_embed import MeanColor

    with pytest.raises(InputError, match="pick one with --guidance"):
        load_features(tmp_path / "run", MeanColor(), cache=False)
    feats, info = load_features(tmp_path / "run", MeanColor(), cache=False, guidance="scfg")
    assert feats.shape == (2, 3) and info["n_images"] == 2
    assert np.allclose(sorted(feats[:, 0] * 255), [1, 2])  # red channel = seed of each scfg image


@pytest.mark.parametrize("row, fragment", [
    ('["a.png", "a cat"]', "row 1 is not an object"),
    ('{"file": 3, "prompt": "a cat"}', "'file' must be a path"),
    ('{"file": "a.png", "prompt": null}', "'prompt' must be text"),
    ('{"file": "a.png", "prompt": "a cat", "seed": "abc"}', "'seed' must be an integer"),
    ('{"file": "a.png", "prompt": "a cat", "seed": 1.5}', "'seed' must be an integer"),
    ('{"file": "a.png", "prompt": "a cat", "seed": true}', "'seed' must be an integer"),
    ('{"file": "a.png", "prompt": "a cat", "prompt_id": [1]}', "'prompt_id' must be text or an integer"),
    ('{"file": "../outside.png", "prompt": "a cat"}', "points outside"),
    ('{"file": "/etc/passwd", "prompt": "a cat"}', "points outside"),
    ('{"file": "sub/../../outside.png", "prompt": "a cat"}', "points outside"),
])
def test_manifest_rows_of_the_wrong_shape(tmp_path, row, fragment):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (folder / "manifest.jsonl").write_text(row + "\n")
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_image_set(folder)


def test_manifest_seeds_from_csv_and_json(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "b.png")
    (tmp_path / "manifest.jsonl").write_text('{"file": "a.png", "prompt": "x", "seed": 0, "prompt_id": 7}\n'
                                             '{"file": "sub/b.png", "prompt": "x", "seed": null}\n')
    images = load_image_set(tmp_path)
    assert [it.seed for it in images.items] == [0, None]  # seed 0 is a seed, not "no seed"
    assert [it.group for it in images.items] == ["7", "x"]
    (tmp_path / "manifest.jsonl").unlink()
    (tmp_path / "manifest.csv").write_text("file,prompt,seed\na.png,x,3\nsub/b.png,x,\n")
    assert [it.seed for it in load_image_set(tmp_path).items] == [3, None]


def test_feature_files_must_be_numeric_and_finite(tmp_path, capsys, monkeypatch):
    from test_cli import assert_user_error, cli

    train = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    nan = train[:10].copy()
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    inf = train[:10].copy()
    inf[0, 0] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    np.save(tmp_path / "object.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    np.savez(tmp_path / "archive.npy", a=train)  # a zip archive under an .npy name
    (tmp_path / "archive.npy.npz").rename(tmp_path / "archive.npy")
    cases = {"nan": "NaN or infinite values (first in row 3)", "inf": "NaN or infinite values (first in row 0)",
             "object": "not a numeric .npy feature array", "text": "must be a numeric",
             "garbage": "not a numeric .npy feature array", "archive": "not a single .npy array"}
    for name, fragment in cases.items():
        args = ["score", "irs", tmp_path / f"{name}.npy", "--train", tmp_path / "train.npy",
                "--out", tmp_path / "o.json"]
        assert_user_error(cli(args, capsys, monkeypatch), fragment)
    with pytest.raises(InputError, match="NaN or infinite"):
        load_features(tmp_path / "nan.npy", None)
    # the Python API refuses non-finite arrays too
    from diffprobe.metrics.irs import nearest_neighbors

    with pytest.raises(InputError, match="NaN or infinite"):
        nearest_neighbors(train, nan)
    with pytest.raises(InputError, match="NaN or infinite"):
        nearest_neighbors(nan, train[:5])


def test_guidance_applies_to_runs_only(tmp_path):
    for sub in ("p1", "p2"):
        (tmp_path / sub).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / sub / f"{i}.png")
    with pytest.raises(InputError, match="--guidance applies to run directories"):
        load_image_set(tmp_path, guidance="scfg")
    np.save(tmp_path / "f.npy", np.ones((3, 2), np.float32))
    with pytest.raises(InputError, match="--guidance applies to run directories"):
        load_features(tmp_path / "f.npy", None, guidance="scfg")


def test_cache_dir_that_is_a_file(tmp_path):
    from test_embed import MeanColor

    from diffprobe.embed import FeatureCache
    from diffprobe.metrics.scs import score_scs

    for sub in ("p1", "p2"):
        (tmp_path / "set" / sub).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i, 9, 0)).save(tmp_path / "set" / sub / f"{i}.png")
    (tmp_path / "cache").write_text("a file")
    with pytest.raises(InputError, match="is a file; give --cache-dir a folder"):
        FeatureCache.for_location(cache_dir=tmp_path / "cache")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "features.sqlite").write_bytes(b"not a database at all" * 50)
    with pytest.raises(InputError, match="cannot use the feature cache .*--no-cache"):
        score_scs(tmp_path / "set", MeanColor(), cache=FeatureCache.for_location(cache_dir=tmp_path / "dir"))


def test_read_only_run_needs_no_cache(tmp_path):
    """On read-only storage the run's feature cache cannot be made: a clear error that names --no-cache, and
    --no-cache works."""
    import subprocess
    import sys
    from pathlib import Path

    from test_store import item

    from diffprobe.spec import RunSpec
    from diffprobe.store import create_run

    run = tmp_path / "run"
    with create_run(run, RunSpec(prompts=["a cat"], seeds=[0, 1])) as store:
        store.add([item("k0", 0, 10), item("k1", 1, 20)])
    tests = Path(__file__).parent
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_embed import MeanColor; "
            "from diffprobe.errors import InputError; from diffprobe.metrics.scs import score_scs\n"
            "try:\n    score_scs(sys.argv[1], MeanColor(), sensitivity=False)\n"
            "except InputError as err:\n    print('refused:', err)\n"
            "result = score_scs(sys.argv[1], MeanColor(), cache=False, sensitivity=False)\n"
            "print('no-cache:', result['summary']['n_prompts'])")
    script = (f"mount --bind {run} {run} && mount -o remount,ro,bind {run} && "
              f"{sys.executable} -c \"$0\" {run} {tests}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"refused: cannot use the feature cache {run.resolve() / 'features.sqlite'}" in proc.stdout
    assert "--no-cache" in proc.stdout and "no-cache: 1" in proc.stdout
    assert not (run / "features.sqlite").exists()


def test_garbage_weights_files(tmp_path):
    import torch

    from diffprobe.embed import get_embedder

    (tmp_path / "bytes.pth").write_bytes(b"\x00 garbage")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({1: torch.zeros(1)}, tmp_path / "intkeys.pth")
    torch.save({"state_dict": 5}, tmp_path / "nested.pth")
    from diffprobe.embed.convnets import ResNet50Trunk

    torch.save({k: torch.zeros(1) for k in ResNet50Trunk().state_dict()}, tmp_path / "shapes.pth")
    for name in ("bytes", "empty", "list", "tensor", "intkeys", "nested", "shapes"):
        for embedder in ("swav", "inception"):
            path = tmp_path / f"{name}.pth"
            with pytest.raises((InputError, ModelNotFoundError), match=str(path)):
                get_embedder(embedder, weights=path, device="cpu")
    with pytest.raises(InputError, match="cannot load .*bytes.pth as a weights-only torch checkpoint"):
        get_embedder("swav", weights=tmp_path / "bytes.pth", device="cpu")
    with pytest.raises(InputError, match="shapes.pth does not hold SwAV ResNet-50 weights .*size mismatch"):
        get_embedder("swav", weights=tmp_path / "shapes.pth", device="cpu")
