"""Embedders, preprocessing and the feature cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffprobe.embed import FeatureCache, Preprocess, embed_files, get_embedder
from diffprobe.embed.base import Embedder
from diffprobe.errors import InputError, ModelNotFoundError


class MeanColor(Embedder):
    """A cheap embedder (per-channel mean of the preprocessed image) that counts its forward calls."""

    name = "mean-color"
    dim = 3
    weights = "none"

    def __init__(self, resize: int = 8):
        self.preprocess = Preprocess(resize, resize, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.device = torch.device("cpu")
        self.calls = 0
        self.images_seen = 0

    def _forward(self, pixels):
        self.calls += 1
        self.images_seen += len(pixels)
        return pixels.mean(dim=(2, 3))


def _write_images(folder, n, size=(20, 16)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGB", size, (10 * i, 255 - 10 * i, 3 * i)).save(p)
        paths.append(p)
    return paths


def test_preprocess_resize_crop_normalize():
    pre = Preprocess(4, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = pre([Image.new("RGB", (8, 12), (255, 0, 51)), Image.new("RGB", (30, 10), (0, 255, 0))])
    assert x.shape == (2, 3, 4, 4)
    # uniform colours survive resizing: (c/255 - 0.5) / 0.25
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [(1 - 0.5) / 0.25, -2.0, (0.2 - 0.5) / 0.25], atol=1e-5)
    assert "crop4" in pre.describe() and pre.describe() != Preprocess(4, None, (0.5,) * 3, (0.25,) * 3).describe()


def test_torch_backend_square_resize_matches_interpolate():
    pre = Preprocess(7, None, (0.0,) * 3, (1.0,) * 3, interpolation="bilinear", resize_mode="square", backend="torch")
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (5, 9, 3), dtype=np.uint8)
    x = pre([Image.fromarray(arr)])
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, size=(7, 7), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(x, ref)


def test_cache_second_scoring_computes_nothing(tmp_path):
    paths = _write_images(tmp_path / "a", 5)
    cache = FeatureCache(tmp_path / "cache" / "features.sqlite")
    emb = MeanColor()
    first = embed_files(emb, paths, cache=cache)
    assert cache.computed == 5 and emb.images_seen == 5
    assert emb.calls == 1  # one batch, not one call per image
    cache.computed = 0
    again = embed_files(emb, paths, cache=FeatureCache(cache.path))
    assert emb.images_seen == 5  # nothing new was embedded
    np.testing.assert_array_equal(first, again)
    # the key is the file content, not its name: a renamed copy hits the cache
    copy = tmp_path / "b" / "renamed.png"
    copy.parent.mkdir()
    shutil.copy(paths[2], copy)
    np.testing.assert_array_equal(embed_files(emb, [copy], cache=cache), first[2:3])
    assert emb.images_seen == 5
    # a different preprocessing is a different embedder id: computed afresh
    other = MeanColor(resize=6)
    embed_files(other, paths, cache=cache)
    assert other.images_seen == 5


def test_duplicate_files_are_embedded_once(tmp_path):
    paths = _write_images(tmp_path, 2)
    shutil.copy(paths[0], tmp_path / "dup.png")
    emb = MeanColor()
    feats = embed_files(emb, [*paths, tmp_path / "dup.png"], cache=FeatureCache(tmp_path / "f.sqlite"))
    assert emb.images_seen == 2
    np.testing.assert_array_equal(feats[0], feats[2])


def test_unreadable_image_raises_input_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image"):
        embed_files(MeanColor(), [bad])


@pytest.fixture(scope="module")
def effnet():
    return get_embedder("efficientnet-lite0", device="cpu", batch_size=4)


def test_efficientnet_lite0_loads_strictly_and_embeds(effnet):
    from diffprobe.embed.effnet import EfficientNetLite0, lite0_weights_path

    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(EfficientNetLite0().state_dict())  # every checkpoint key has a place
    assert effnet.dim == 1280 and effnet.id.startswith("efficientnet-lite0|sha256:")
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in [(64, 80), (224, 224), (300, 200), (50, 50), (90, 120)]
    ]
    feats = effnet.embed(images)  # mixed sizes, batch of 4 then 1
    assert feats.shape == (5, 1280) and feats.dtype == np.float32
    assert (feats >= 0).all() and (feats <= 6).all()  # ReLU6 outputs averaged
    one = effnet.embed(images[2:3])
    np.testing.assert_allclose(one[0], feats[2], rtol=1e-4, atol=1e-5)


def test_tf_same_padding_shapes():
    from diffprobe.embed.effnet import SameConv2d

    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, 4, 4)
    y = conv(x)
    # TF SAME for even input, stride 2: pad 0 before, 1 after -> first output sees a full 3x3 window
    assert y.shape == (1, 1, 2, 2)
    assert y[0, 0, 0, 0].item() == 9.0 and y[0, 0, 1, 1].item() == 4.0


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_swav_loads_checkpoint_layout(tmp_path):
    from diffprobe.embed.convnets import ResNet50Trunk

    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in ResNet50Trunk().state_dict().items()}
    state["module.projection_head.0.weight"] = torch.zeros(2048, 2048)
    state["module.prototypes.weight"] = torch.zeros(3000, 128)
    path = _save({"state_dict": state, "epoch": 800}, tmp_path / "swav.pth.tar")
    emb = get_embedder("swav", weights=path, device="cpu")
    feats = emb.embed([Image.new("RGB", (300, 240), (120, 30, 200)), Image.new("RGB", (224, 224), (0, 0, 0))])
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert emb.describe()["preprocessing"]["resize"] == 224


def test_inception_loads_fid_layout(tmp_path):
    from diffprobe.embed.convnets import FIDInception

    net = FIDInception()
    n_params = sum(p.numel() for p in net.parameters())
    # torchvision's inception_v3 has 27,161,264 parameters; minus its AuxLogits head (128*768 + 2*128 + 768*128*25
    # + 2*768 + 768*1000 + 1000 = 3,326,696), plus 8 more classes (1008-way fc: 8 * 2049)
    assert n_params == 27_161_264 - 3_326_696 + 8 * 2049
    path = _save(net.state_dict(), tmp_path / "pt_inception.pth")
    emb = get_embedder("inception", weights=path, device="cpu")
    feats = emb.embed([Image.new("RGB", (64, 48), (1, 2, 3))])
    assert feats.shape == (1, 2048)


def test_weights_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="needs a local weights file"):
        get_embedder("swav")
    with pytest.raises(ModelNotFoundError, match="not found"):
        get_embedder("inception", weights=tmp_path / "nope.pth")
    wrong = _save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ModelNotFoundError, match="does not hold SwAV"):
        get_embedder("swav", weights=wrong)
    with pytest.raises(InputError, match="unknown embedder"):
        get_embedder("resnet-9000")
