"""CLIP score, R-precision and the CLIP embedder, with a tiny random CLIP saved to disk and loaded by path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffprobe.errors import InputError, ModelNotFoundError
from diffprobe.metrics.clipscore import clip_scores, r_precision, score_clip


def _byte_chars() -> list[str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2/CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return list(chars.values())


def build_tiny_clip(path, max_positions: int = 77):
    """A random CLIP (projection dim 16) with a character-level tokenizer, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_positions,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    import torch

    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_score_formula_by_hand():
    img = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    txt = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, -3.0]])
    # cosines: 1, 1/sqrt(2), -1 -> clamped at 0
    np.testing.assert_allclose(clip_scores(img, txt), [100.0, 100 / np.sqrt(2), 0.0])


def test_r_precision_by_hand():
    texts = np.array([[1.0, 0.0], [0.0, 1.0]])
    images = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    # nearest texts: 0, 1, 0; true owners 0, 1, 1 -> 2 of 3 right
    assert r_precision(images, texts, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_clip_embedder_loads_by_path(tiny_clip):
    from diffprobe.embed import get_embedder

    emb = get_embedder(str(tiny_clip), device="cpu")
    assert emb.dim == 16 and emb.max_tokens == 77
    assert emb.preprocess.resize == 32 and emb.preprocess.crop == 32
    images = [Image.new("RGB", (40, 50), (200, 10, 10)), Image.new("RGB", (64, 32), (10, 200, 10))]
    feats = emb.embed(images)
    assert feats.shape == (2, 16) and np.isfinite(feats).all()
    # batching must not change features
    emb.batch_size = 1
    np.testing.assert_allclose(emb.embed(images), feats, rtol=1e-5, atol=1e-6)
    # direct model call on the same pixels gives the same projected embedding
    import torch

    with torch.no_grad():
        ref = emb.model.get_image_features(pixel_values=emb.preprocess(images))
    ref = getattr(ref, "pooler_output", ref)
    np.testing.assert_allclose(feats, ref.numpy(), rtol=1e-5, atol=1e-6)
    counts = emb.count_tokens(["ab c", "x " * 100])
    assert counts == [2 + 3, 2 + 100]  # one token per character (spaces split words), plus start/end


def test_missing_clip_gives_clear_error(tmp_path, monkeypatch):
    from diffprobe.embed import get_embedder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not available"):
        get_embedder("clip-vit-b32")
    emb = get_embedder("auto", device="cpu")
    assert emb.name == "efficientnet-lite0" and "used efficientnet-lite0" in emb.note


def test_score_clip_folder_reports_truncation(tiny_clip, tmp_path):
    long_prompt = " ".join(["word"] * 30)  # 150 characters -> over 77 tokens for this tokenizer
    prompts = {"p0": "a red square", "p1": "a green square", "p2": long_prompt}
    colors = {"p0": (220, 20, 20), "p1": (20, 220, 20), "p2": (20, 20, 220)}
    for pid, text in prompts.items():
        d = tmp_path / "imgs" / pid
        d.mkdir(parents=True)
        (d / "prompt.txt").write_text(text)
        for i in range(3):
            Image.new("RGB", (48, 48), tuple(c + 10 * i for c in colors[pid])).save(d / f"{i}.png")
    result = score_clip(tmp_path / "imgs", str(tiny_clip), device="cpu", cache=False)
    assert [t["prompt_id"] for t in result["truncated_prompts"]] == ["p2"]
    assert any("truncated" in w for w in result["warnings"])
    assert result["r_precision_candidates"] == 3 and 0.0 <= result["r_precision"] <= 1.0
    scores = [row["clip_score"] for row in result["per_prompt"]]
    assert all(0.0 <= s <= 100.0 for s in scores)
    assert result["summary"]["mean"] == pytest.approx(np.mean(scores))
    # the per-prompt value is the mean of the per-image formula
    from diffprobe.embed import get_embedder
    from diffprobe.metrics.images import load_image_set

    emb = get_embedder(str(tiny_clip), device="cpu")
    imgs = load_image_set(tmp_path / "imgs")
    feats = imgs.features(emb, cache=False)
    text = emb.embed_text([prompts["p0"]])
    idx = imgs.groups()["p0"]
    assert scores[0] == pytest.approx(float(clip_scores(feats[idx], np.repeat(text, len(idx), 0)).mean()), rel=1e-5)


def test_score_clip_needs_prompt_texts(tiny_clip, tmp_path):
    d = tmp_path / "imgs" / "p0"
    d.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(d / f"{i}.png")
    with pytest.raises(InputError, match="prompt texts"):
        score_clip(tmp_path / "imgs", str(tiny_clip), device="cpu", cache=False)
