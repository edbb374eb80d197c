"""LoRA adapters at generation: resolved to local files, identified (hub revision or sha256 of the files), and
loaded into the pipeline through diffusers' LoRA loading (peft), each with its scale."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelNotFoundError
from .libraries import quiet_libraries

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def files_sha256(path: Path) -> str:
    """sha256 over the weight and config files of a LoRA folder (names and bytes), or of one file."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix == ".json"))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path.parent if path.is_file() else path)).encode())
        with p.open("rb") as f:
            for chunk in iter(lambda f=f: f.read(2**20), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve_lora(source: str) -> tuple[Path, dict[str, Any]]:
    """The local folder or file of a LoRA source and its identity (source, and revision or sha256)."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise ModelNotFoundError(f"LoRA folder {path} holds no weights (*.safetensors or *.bin); give the "
                                     "folder `seeds finetune --lora` wrote, a LoRA weights file, or a hub id")
        return path, {"source": str(path.resolve()), "sha256": files_sha256(path)}
    if not _HUB_ID.match(source):
        raise ModelNotFoundError(f"LoRA {source!r} not found: it is neither a local folder or file nor a hub id "
                                 "like 'owner/name'")
    from huggingface_hub import snapshot_download

    try:
        try:
            local = Path(snapshot_download(source, local_files_only=True))
        except Exception:
            local = Path(snapshot_download(source))
    except Exception as err:
        raise ModelNotFoundError(f"cannot get the LoRA {source!r} ({type(err).__name__}): download it where the hub "
                                 f"is reachable (`hf download {source}`), or pass a local folder") from None
    match = re.search(r"snapshots/([0-9a-f]{40})", str(local))
    return local, {"source": source, "revision": match.group(1) if match else None}


def apply_loras(pipe: Any, loras: Sequence[Any]) -> list[dict[str, Any]]:
    """Load each LoRA (``LoraSpec``: source, scale) into ``pipe`` and activate them with their scales; returns
    their identities (for the job key and provenance)."""
    if not loras:
        return []
    if not hasattr(pipe, "load_lora_weights"):
        raise InputError(f"--lora: diffusers has no LoRA loading for {type(pipe).__name__}; LoRA works with the sd "
                         "and sdxl families")
    identities, names = [], []
    for i, lora in enumerate(loras):
        path, identity = resolve_lora(lora.source)
        name = f"lora{i}"
        kwargs = {"weight_name": path.name} if path.is_file() else {}
        try:
            with quiet_libraries(lora.source):
                pipe.load_lora_weights(str(path.parent if path.is_file() else path), adapter_name=name, **kwargs)
        except Exception as err:  # wrong architecture, not a LoRA file, several weight files ...
            text = (str(err).strip().splitlines() or [""])[0][:300]
            raise ModelNotFoundError(f"cannot load the LoRA {lora.source!r} into this model "
                                     f"({type(err).__name__}: {text}); it must be a LoRA for this base model "
                                     "(give the weights file itself when a folder holds several)") from None
        names.append(name)
        identities.append({**identity, "scale": float(lora.scale)})
    pipe.set_adapters(names, adapter_weights=[float(lora.scale) for lora in loras])
    return identities
