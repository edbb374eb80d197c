"""Find, identify and load a checkpoint: hub id, local folder, or a built-in name (``shapes``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelNotFoundError
from .adapters import ADAPTERS, DiffusersAdapter

PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "pixart": "PixArtAlphaPipeline",
}
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Optional file in a checkpoint folder with the sampling settings its makers recommend ("steps", "guidance_scale");
# used when the user sets neither.
RECOMMENDED_FILE = "diffprobe.json"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_FULL_HASH_LIMIT = 256 * 2**20  # hash whole weight files below this total size; fingerprint larger ones


def choose_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """Return the local checkpoint folder and what identifies its weights (hub revision or content hash)."""
    if name_or_path == "shapes":
        from ..worlds import shapes

        return resolve_model(str(shapes.weights_dir()))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{path} is not a diffusers checkpoint folder (no model_index.json); "
                "pass a folder saved with save_pretrained, a hub id, or 'shapes'"
            )
        return path, {"weights_sha256": weights_fingerprint(path)}
    if not _HUB_ID.match(name_or_path):
        raise ModelNotFoundError(
            f"model {name_or_path!r} not found: it is neither a local folder nor a hub id like "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'; use 'shapes' for the built-in model"
        )
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # our one-line error replaces its connection warnings
    try:  # the pipeline's own file selection: component folders only, not root checkpoints or other variants
        try:  # a cached snapshot needs no network round trip
            local = Path(DiffusionPipeline.download(name_or_path, local_files_only=True))
        except Exception:
            local = Path(DiffusionPipeline.download(name_or_path))
    except Exception as err:  # offline, unknown id, gated repo: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        raise ModelNotFoundError(
            f"cannot get weights for {name_or_path!r} ({type(err).__name__}"
            f"{', HF_HUB_OFFLINE is set' if offline else ''}): download it where the hub is reachable "
            f"(`hf download {name_or_path}`) so it is in the Hugging Face cache, or pass a local folder"
        ) from None
    finally:
        diffusers_logging.set_verbosity(level)
    match = re.search(r"snapshots/([0-9a-f]{40})", str(local))
    return local, {"revision": match.group(1) if match else None}


def weights_fingerprint(folder: Path) -> str:
    """sha256 over the checkpoint's config and weight files (large weights: size plus first/last MiB of each)."""
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".safetensors", ".bin")
    )
    total = sum(p.stat().st_size for p in files)
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        size = p.stat().st_size
        with p.open("rb") as f:
            if total <= _FULL_HASH_LIMIT or size <= 2**21:
                for chunk in iter(lambda f=f: f.read(2**20), b""):
                    h.update(chunk)
            else:
                h.update(str(size).encode())
                h.update(f.read(2**20))
                f.seek(size - 2**20)
                h.update(f.read(2**20))
    return h.hexdigest()


def detect_family(folder: Path) -> str:
    cls = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    if "PixArt" in cls:
        return "pixart"
    if "XL" in cls:
        return "sdxl"
    if "StableDiffusion" in cls:
        return "sd"
    raise InputError(f"cannot tell the model family from pipeline class {cls!r}; pass --family sd|sdxl|pixart")


def load_model(
    name_or_path: str = "shapes",
    family: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    scheduler: str | None = None,
) -> DiffusersAdapter:
    """Load a checkpoint once and wrap it in its family's adapter."""
    import diffusers

    folder, weights = resolve_model(name_or_path)
    family = family or detect_family(folder)
    if family not in ADAPTERS:
        raise InputError(f"unknown family {family!r}; choose one of: {', '.join(ADAPTERS)}")
    dev = choose_device(device)
    torch_dtype = choose_dtype(dev, dtype)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    pipe_cls = getattr(diffusers, PIPELINE_CLASSES[family])
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older ones know only that name
        warnings.simplefilter("ignore", FutureWarning)
        pipe = pipe_cls.from_pretrained(folder, torch_dtype=torch_dtype, **extra).to(dev)
    pipe.set_progress_bar_config(disable=True)
    if scheduler not in (None, "default"):
        if scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {scheduler!r}; choose one of: default, {', '.join(SCHEDULERS)}")
        cls_name, overrides = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    # A local folder is named by its absolute path, so "./m" and "/abs/m" give the same job keys.
    local = Path(name_or_path).expanduser()
    model_id = str(local.resolve()) if name_or_path != "shapes" and local.exists() else name_or_path
    adapter = ADAPTERS[family](pipe, model_id, family, weights)
    adapter.scheduler_name = scheduler or "default"
    recommended = folder / RECOMMENDED_FILE
    adapter.recommended = json.loads(recommended.read_text()) if recommended.is_file() else {}
    return adapter
