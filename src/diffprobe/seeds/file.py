"""``reliable_seeds.json``: the mined ranking, its tests, and everything needed to reuse a seed; next to it
``reliable_seeds.safetensors`` holds the top seeds' initial latents (a seed integer only gives the same noise with
the same generator device, dtype and latent shape; the tensors give it anywhere).

Top-level fields: ``format``, ``version``, ``model`` (identity: id, family, revision or weights hash), ``family``,
``sampler`` (steps, scheduler, height, width, dtype, generator_device), ``scheduler_class``, ``latent_shape``
(channels, height, width), ``guidance``, ``judge`` (identity), ``run``, ``prompt_source``, ``seeds`` (mined),
``top_n``, ``categories`` (per category: accuracy, per-seed tallies with Wilson intervals, ``ranking``, ``top``,
``chi2``), ``not_mined``, ``skipped``, ``latents`` (file name, sha256, seeds), ``timing``, ``created``, ``versions``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, writing

FORMAT = "diffprobe-reliable-seeds"
VERSION = 1
FILE_NAME = "reliable_seeds.json"
LATENTS_NAME = "reliable_seeds.safetensors"
# The resolved settings a seed integer's noise depends on (besides the model itself): checked before reuse.
NOISE_SETTINGS = ("height", "width", "dtype", "generator_device")


@dataclass
class ReliableSeeds:
    path: Path
    data: dict[str, Any]

    @property
    def categories(self) -> dict[str, dict[str, Any]]:
        return self.data["categories"]

    def top(self, category: str) -> list[int]:
        if category not in self.categories:
            raise InputError(f"{self.path} has no reliable seeds for category '{category}' (it has: "
                             f"{', '.join(self.categories)}); mine with prompts of that category")
        return [int(s) for s in self.categories[category]["top"]]

    @property
    def latents_path(self) -> Path:
        return self.path.parent / self.data["latents"]["file"]

    def requires(self) -> dict[str, Any]:
        """Resolved generation settings (dotted names, as ``generate.check_seed_source`` reads them) that a
        run must share to reuse the seed integers."""
        sampler = self.data["sampler"]
        return {"model": self.data["model"], **{f"sampler.{k}": sampler[k] for k in NOISE_SETTINGS}}


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    """Written whole to a temporary name, then renamed: a reader never sees half a file."""
    text = json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    with writing(path) as target:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)


def read_reliable(path: str | Path) -> ReliableSeeds:
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"reliable seeds file {path} does not exist; make it with 'diffprobe seeds mine'") from None
    except OSError as err:
        raise InputError(f"cannot read reliable seeds file {path}: {err.strerror}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path} is not a reliable seeds file (not JSON: {err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path} is not a reliable seeds file (no 'format: {FORMAT}'); make one with "
                         "'diffprobe seeds mine'")
    if data.get("version") != VERSION:
        raise InputError(f"{path} has version {data.get('version')!r}; this diffprobe reads version {VERSION}")
    missing = [k for k in ("model", "sampler", "categories", "latents", "latent_shape") if k not in data]
    cats = data.get("categories")
    if missing or not isinstance(cats, dict) or not cats or any(
            not isinstance(c, dict) or not isinstance(c.get("top"), list) or not c["top"] for c in cats.values()):
        raise InputError(f"{path} is incomplete (missing {', '.join(missing) or 'top seeds per category'}); mine "
                         "it again")
    return ReliableSeeds(path, data)
