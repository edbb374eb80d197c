"""Finding images for the metrics: manifests, subfolders, flat sets, runs with several guidance variants."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffprobe.errors import InputError
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
