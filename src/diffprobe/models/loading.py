"""Find, identify and load a checkpoint: hub id, local folder, or a built-in name (``shapes``)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelNotFoundError
from .adapters import ADAPTERS, DiffusersAdapter
from .base import Recommended
from .libraries import quiet_libraries
from .lora import apply_loras
from .registry import available_models, registered_folder

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
# Components each family's adapter uses; they must be listed in model_index.json.
REQUIRED_COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"),
    "pixart": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
}
# Components listed in model_index.json that the loader replaces with None (so their folders may be absent).
NOT_LOADED = {"sd": ("safety_checker",)}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_FULL_HASH_LIMIT = 256 * 2**20  # hash whole weight files below this total size; fingerprint larger ones


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``None``/``"auto"`` picks CUDA, then MPS, then the CPU; a named device must exist here.

    The one place diffprobe chooses a device (models, embedders, retrieval all call it).
    """
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps, or leave it unset "
                         "for the best available") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {device!r}: this machine has no usable CUDA device (torch "
                             f"{torch.__version__}); use cpu, or leave the device unset for the best available")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    elif dev.type == "mps":
        if not _mps_available():
            raise InputError(f"device {device!r}: MPS (Apple silicon) is not available on this machine; use cpu, "
                             "or leave the device unset for the best available")
    elif dev.type != "cpu":
        raise InputError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def local_folder(name_or_path: str) -> Path | None:
    """``name_or_path`` as an existing local path (``~`` expanded), or None when nothing is there."""
    try:
        path = Path(name_or_path).expanduser()
    except RuntimeError:  # "~user/..." for a user this machine does not know
        raise ModelNotFoundError(f"model {name_or_path!r} not found: cannot expand the home folder in it "
                                 "(no such user); give the folder's full path") from None
    try:
        return path if path.exists() else None
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte, no permission
        raise ModelNotFoundError(f"model {name_or_path!r} not found: cannot look at that path ({err})") from None


def resolve_model(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """Return the local checkpoint folder and what identifies its weights (hub revision or content hash)."""
    builtin = registered_folder(name_or_path)
    if builtin is not None:
        return resolve_model(str(builtin()))
    path = local_folder(name_or_path)
    if path is not None:
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{path} is not a diffusers checkpoint folder (no model_index.json); "
                f"pass a folder saved with save_pretrained, a hub id, or a built-in model ({_builtin_names()})"
            )
        return path, {"weights_sha256": weights_fingerprint(path)}
    if not _HUB_ID.match(name_or_path):
        raise ModelNotFoundError(
            f"model {name_or_path!r} not found: it is neither a local folder nor a hub id like "
            f"'stable-diffusion-v1-5/stable-diffusion-v1-5'; built-in models: {_builtin_names()}"
        )
    from diffusers.utils import logging as diffusers_logging

    with quiet_libraries(name_or_path):
        from diffusers import DiffusionPipeline
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


def _builtin_names() -> str:
    return ", ".join(repr(name) for name in available_models()) or "none"


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


def read_model_index(folder: Path) -> dict[str, Any]:
    """The folder's ``model_index.json`` (ModelNotFoundError when it is not a JSON object)."""
    index = _read_json_object(folder / "model_index.json", folder)
    if not isinstance(index.get("_class_name"), str):
        raise ModelNotFoundError(f"{folder}/model_index.json has no pipeline class (\"_class_name\"); "
                                 "save the checkpoint again with save_pretrained, or download it again")
    return index


def _read_json_object(file: Path, folder: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ModelNotFoundError(f"the checkpoint in {folder} is broken: {file.relative_to(folder)} cannot be "
                                 f"read as JSON ({err}); download it again or save it again with "
                                 "save_pretrained") from None
    if not isinstance(value, dict):
        raise ModelNotFoundError(f"the checkpoint in {folder} is broken: {file.relative_to(folder)} holds a JSON "
                                 f"{type(value).__name__}, not an object; download it again or save it again "
                                 "with save_pretrained")
    return value


def family_of(pipeline_class: str) -> str | None:
    """The family a diffusers pipeline class belongs to, or None when it is none of ours."""
    if "PixArt" in pipeline_class:
        return "pixart"
    if "XL" in pipeline_class:
        return "sdxl"
    if "StableDiffusion" in pipeline_class:
        return "sd"
    return None


def detect_family(folder: Path) -> str:
    cls = read_model_index(folder)["_class_name"]
    family = family_of(cls)
    if family is None:
        raise InputError(f"cannot tell the model family of {folder} from its pipeline class {cls!r}; "
                         "pass --family sd|sdxl|pixart")
    return family


def check_folder(folder: Path, family: str) -> None:
    """Find what would make loading fail (or load garbage) and name it: missing components, unreadable configs,
    missing tokenizer files, weight files whose safetensors header is broken (e.g. a truncated download)."""
    index = read_model_index(folder)
    listed = {name for name, entry in index.items() if not name.startswith("_") and _is_component(entry)}
    missing = [name for name in REQUIRED_COMPONENTS[family] if name not in listed]
    if missing:
        raise ModelNotFoundError(f"the checkpoint in {folder} has no {', '.join(missing)} in its model_index.json, "
                                 f"which a {family} model needs")
    skipped = NOT_LOADED.get(family, ())
    absent = sorted(name for name in listed - set(skipped) if not (folder / name).is_dir())
    if absent:
        raise ModelNotFoundError(f"the checkpoint in {folder} is incomplete: component folder(s) {', '.join(absent)} "
                                 "listed in model_index.json are missing; download it again or copy the whole folder")
    for name in sorted(listed - set(skipped)):
        _check_component(folder, name, index[name][1])


def _is_component(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)


def _check_component(folder: Path, name: str, class_name: str) -> None:
    part = folder / name
    if "Scheduler" in class_name:
        _read_json_object(part / "scheduler_config.json", folder)
        return
    if "Tokenizer" in class_name:
        if (part / "tokenizer_config.json").exists():
            _read_json_object(part / "tokenizer_config.json", folder)
        import transformers

        known = getattr(transformers, class_name, None)
        files = getattr(known, "vocab_files_names", {"tokenizer_file": "tokenizer.json"})
        slow = [f for key, f in files.items() if key != "tokenizer_file"]
        if not (part / "tokenizer.json").is_file() and not (slow and all((part / f).is_file() for f in slow)):
            need = " or ".join(["tokenizer.json", *([" + ".join(slow)] if slow else [])])
            raise ModelNotFoundError(f"the checkpoint in {folder} is incomplete: {name}/ has no vocabulary files "
                                     f"({need}) for its {class_name}; download it again or copy the whole folder")
        return
    if not (part / "config.json").is_file():
        if (part / "preprocessor_config.json").is_file():  # image processors: config only, no weights
            return
        raise ModelNotFoundError(f"the checkpoint in {folder} is incomplete: {name}/config.json is missing")
    _read_json_object(part / "config.json", folder)
    weights = [p for p in part.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    if not weights:
        raise ModelNotFoundError(f"the checkpoint in {folder} is incomplete: {name}/ holds no weights "
                                 "(*.safetensors or *.bin); download it again or copy the whole folder")
    from safetensors import SafetensorError, safe_open

    for file in sorted(p for p in weights if p.suffix == ".safetensors"):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelNotFoundError(f"the checkpoint in {folder} is broken: {file.relative_to(folder)} is not a "
                                     f"complete safetensors file ({err}); download it again") from None


def read_recommended(folder: Path) -> Recommended:
    """The checkpoint's recommended sampling settings (``diffprobe.json``; {} when there is none)."""
    file = folder / RECOMMENDED_FILE
    if not file.is_file():
        return {}
    raw = _read_json_object(file, folder)
    recommended: Recommended = {}
    steps, scale = raw.get("steps"), raw.get("guidance_scale")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ModelNotFoundError(f"{file}: \"steps\" must be a whole number of at least 1 (got {steps!r})")
        recommended["steps"] = steps
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ModelNotFoundError(f"{file}: \"guidance_scale\" must be a finite number (got {scale!r})")
        recommended["guidance_scale"] = float(scale)
    return recommended


def load_model(
    name_or_path: str = "shapes",
    family: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    scheduler: str | None = None,
    lora: Sequence[Any] = (),
) -> DiffusersAdapter:
    """Load a checkpoint once and wrap it in its family's adapter.

    ``name_or_path``: a built-in model (``"shapes"``), a local diffusers folder or a hub id. ``family`` overrides
    detection from the folder's pipeline class (for a pipeline class diffprobe does not know). Every mistake
    (broken folder, unknown option, missing device) raises a :class:`~diffprobe.errors.DiffprobeError` before
    any weights are read. ``lora``: LoRA adapters (``LoraSpec``: source and scale) applied on top; they enter
    the adapter's identity, so they key its images.
    """
    if family is not None and family not in ADAPTERS:
        raise InputError(f"unknown family {family!r}; choose one of: {', '.join(ADAPTERS)}")
    if scheduler not in (None, "default") and scheduler not in SCHEDULERS:
        raise InputError(f"unknown scheduler {scheduler!r}; choose one of: default, {', '.join(SCHEDULERS)}")
    dev = choose_device(device)
    torch_dtype = choose_dtype(dev, dtype)
    folder, weights = resolve_model(name_or_path)
    pipeline_class = read_model_index(folder)["_class_name"]
    detected = family_of(pipeline_class)
    if family is None:
        family = detect_family(folder)
    elif detected is not None and detected != family:
        raise InputError(f"--family {family} does not match {folder}: its pipeline class {pipeline_class} is of "
                         f"family {detected}; pass --family {detected} or leave --family unset")
    with quiet_libraries(str(folder)):  # looking up tokenizer classes imports parts of transformers
        check_folder(folder, family)
    recommended = read_recommended(folder)
    pipe = _load_pipeline(folder, family, dev, torch_dtype)
    if scheduler not in (None, "default"):
        import diffusers

        cls_name, overrides = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    # A local folder is named by its absolute path, so "./m" and "/abs/m" give the same job keys.
    local = None if registered_folder(name_or_path) else local_folder(name_or_path)
    model_id = str(local.resolve()) if local is not None else name_or_path
    adapter = ADAPTERS[family](pipe, model_id, family, weights)
    adapter.loras = apply_loras(pipe, lora)
    adapter.scheduler_name = scheduler or "default"
    adapter.recommended = recommended
    return adapter


def _load_pipeline(folder: Path, family: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The diffusers pipeline of ``folder`` on ``device``; any failure of the libraries names the folder."""
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    with quiet_libraries(str(folder)):
        import diffusers

        pipe_cls = getattr(diffusers, PIPELINE_CLASSES[family])
        try:
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older ones know only that name
                warnings.simplefilter("ignore", FutureWarning)
                pipe = pipe_cls.from_pretrained(folder, torch_dtype=dtype, **extra).to(device)
        except torch.OutOfMemoryError:
            raise InputError(f"not enough memory on {device} to load {folder} in {str(dtype).removeprefix('torch.')}"
                             "; free the device, use --dtype fp16, or another device") from None
        except Exception as err:  # the libraries raise OSError, ValueError, TypeError, KeyError ... for bad folders
            message = (str(err).strip().splitlines() or [""])[0][:300]
            raise ModelNotFoundError(f"cannot load the checkpoint in {folder} ({family} family): "
                                     f"{type(err).__name__}: {message}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
