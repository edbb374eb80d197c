"""Hints in messages name a command that works in the user's situation (offline or online)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffprobe.cli import app

CLIP_ID = "openai/clip-vit-base-patch32"


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """Two prompts with two images each, and prompt texts."""
    monkeypatch.setenv("DIFFPROBE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for p in range(2):
        d = tmp_path / "imgs" / f"prompt{p}"
        d.mkdir(parents=True)
        (d / "prompt.txt").write_text(f"a red circle number {p}")
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path / "imgs"


@pytest.fixture
def no_clip_weights(monkeypatch):
    """CLIP weights are nowhere: every load fails as transformers fails without cache or network."""
    import transformers

    calls = []

    def unavailable(source, *args, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {source}")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", unavailable)
    return calls


def _offline(monkeypatch, offline: bool):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _invoke(*args):
    return CliRunner().invoke(app, [*args, "--device", "cpu"])


@pytest.mark.parametrize("offline", [True, False])
def test_score_clip_without_weights_suggests_only_what_score_clip_can_do(folder, tmp_path, monkeypatch,
                                                                         no_clip_weights, offline):
    _offline(monkeypatch, offline)
    res = _invoke("score", "clip", str(folder), "--out", str(tmp_path / "clip.json"))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    message = " ".join(res.output.split())
    assert "efficientnet" not in message and "--embedder" not in message  # score clip has neither
    assert f"`hf download {CLIP_ID}`" in message
    assert "give a local folder saved with CLIPModel.save_pretrained" in message and "in its place" in message
    if offline:
        assert "HF_HUB_OFFLINE is set" in message and "where the hub is reachable" in message
        assert no_clip_weights == [True]  # offline, the cache is the only place looked at
    else:
        assert "HF_HUB_OFFLINE" not in message and "check the id and that huggingface.co is reachable" in message
        assert no_clip_weights == [False]


@pytest.mark.parametrize("offline", [True, False])
def test_score_scs_with_clip_embedder_offers_the_offline_embedder(folder, tmp_path, monkeypatch, no_clip_weights,
                                                                  offline):
    _offline(monkeypatch, offline)
    res = _invoke("score", "scs", str(folder), "--embedder", "clip-vit-b32", "--out", str(tmp_path / "s.json"))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    message = " ".join(res.output.split())
    assert f"`hf download {CLIP_ID}`" in message
    assert "or score with --embedder efficientnet-lite0, which needs no download" in message
    assert ("HF_HUB_OFFLINE is set" in message) == offline


@pytest.mark.parametrize("offline", [True, False])
def test_score_scs_fallback_note_fits_the_situation(folder, tmp_path, monkeypatch, no_clip_weights, offline):
    _offline(monkeypatch, offline)
    out = tmp_path / "s.json"
    res = _invoke("score", "scs", str(folder), "--no-sensitivity", "--out", str(out))
    assert res.exit_code == 0, res.output
    note = json.loads(out.read_text())["embedder"]["note"]
    assert note.startswith("CLIP ViT-B/32 weights are not in the local Hugging Face cache; used efficientnet-lite0")
    assert no_clip_weights == [True]  # auto never waits on the network
    if offline:
        assert "pass --embedder clip-vit-b32 to download CLIP" not in note  # it cannot download offline
        assert f"HF_HUB_OFFLINE is set: to score with CLIP, download {CLIP_ID} where the hub is reachable " \
               f"(`hf download {CLIP_ID}`) so it is in the Hugging Face cache, or pass --embedder PATH" in note
    else:
        assert note.endswith("(pass --embedder clip-vit-b32 to download CLIP)")


def test_hub_offline_reads_the_variable_as_huggingface_hub_does(monkeypatch):
    from diffprobe.embed.clip import hub_offline

    for value, expected in [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False), ("", False),
                            ("false", False), ("no", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is expected, value
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub_offline() is False
