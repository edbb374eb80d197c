"""Starting noise kept in a file: a safetensors file with one tensor per seed, named by the seed (``"37"``), each of
shape (channels, latent height, latent width) as :func:`diffprobe.sampling.initial_latents` drew it.

A seed integer gives the same noise only with the same generator device, dtype and latent shape; the tensors
themselves give it anywhere, so a run can start from them instead of from its seeds (``RunSpec.sampler.
initial_latents``; the file's sha256 enters every job key).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..models.base import ModelAdapter

_SEED_NAME = re.compile(r"^[0-9]+$")


@dataclass
class InitialLatents:
    path: str
    sha256: str
    tensors: dict[int, torch.Tensor]  # seed -> (C, h, w)

    def check(self, adapter: ModelAdapter, height: int, width: int, seeds: Sequence[int]) -> None:
        """Every seed has a tensor, of the latent shape this model samples at height x width."""
        f = adapter.vae_scale_factor
        want = (adapter.latent_channels, height // f, width // f)
        if missing := [s for s in seeds if s not in self.tensors]:
            raise InputError(f"the initial latents file {self.path} holds no latents for seed(s) "
                             f"{', '.join(map(str, missing[:5]))}; it has {len(self.tensors)} seed(s)")
        shape = tuple(next(iter(self.tensors.values())).shape)
        if shape != want:
            raise InputError(f"the initial latents in {self.path} have shape {list(shape)}, but this model samples "
                             f"{height}x{width} images from latents of shape {list(want)}; generate at the size the "
                             "latents were drawn for")

    def stack(self, seeds: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.tensors[int(s)] for s in seeds])


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_initial_latents(path: str | Path) -> InitialLatents:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"initial latents file {path} does not exist")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{path} is not a safetensors file of initial latents ({err})") from None
    bad = [name for name in raw if not _SEED_NAME.match(name)]
    if bad or not raw:
        raise InputError(f"{path} must hold one tensor per seed, named by the seed ('37'); found "
                         f"{', '.join(map(repr, bad[:3])) or 'no tensors'}")
    shapes = {tuple(t.shape) for t in raw.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise InputError(f"the tensors in {path} must all have one shape (channels, height, width); found "
                         f"{sorted(shapes)}")
    return InitialLatents(str(path.resolve()), file_sha256(path), {int(k): v for k, v in raw.items()})


def write_initial_latents(path: str | Path, tensors: Mapping[int, torch.Tensor],
                          metadata: Mapping[str, str] | None = None) -> None:
    """Write ``{seed: (C, h, w) tensor}`` (written whole to a temporary name, then renamed). The same tensors give
    the same bytes when ``metadata`` has at most one entry (safetensors orders a larger map arbitrarily)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({str(s): t.detach().cpu().contiguous() for s, t in tensors.items()}, str(tmp),
                  metadata=dict(metadata or {}))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
