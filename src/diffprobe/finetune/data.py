"""The fine-tuning data: a folder of images with ``metadata.jsonl`` (Hugging Face ``imagefolder`` layout).

Each line of ``metadata.jsonl`` is ``{"file_name": "0001.png", "text": "three apples, on a sunny beach"}``; other
keys are kept for the record. Batches are a pure function of their position (the shuffled order of each epoch and
each image's flip come from generators seeded by the run seed and the epoch), so a resumed run reads exactly what
an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

METADATA = "metadata.jsonl"
TRAIN_DIR = "train"  # a `diffprobe seeds dataset` folder keeps its images here, beside its run and manifest
LAYOUT = ('a folder with the images and metadata.jsonl, one {"file_name": ..., "text": ...} per line '
          "(the Hugging Face imagefolder layout, as `diffprobe seeds dataset` writes it)")


@dataclass(frozen=True)
class Example:
    path: Path
    text: str
    record: dict = field(default_factory=dict, compare=False)  # the whole metadata line (seed, category, ...)


def data_folder(folder: str | Path) -> Path:
    """The folder holding ``metadata.jsonl``: ``folder`` itself, or its ``train/`` (a `diffprobe seeds dataset`)."""
    folder = Path(folder)
    return folder / TRAIN_DIR if (folder / TRAIN_DIR / METADATA).is_file() else folder


def read_image_folder(folder: str | Path) -> list[Example]:
    """Every example of ``folder`` (or of its ``train/``); InputError for a missing folder, metadata, key or image,
    and for no examples."""
    folder = data_folder(folder)
    if not folder.is_dir():
        raise InputError(f"fine-tuning data {folder} is not a folder; give {LAYOUT}")
    meta = folder / METADATA
    if not meta.is_file():
        raise InputError(f"{folder} has no {METADATA}; the fine-tuning data must be {LAYOUT}")
    examples = []
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{meta} is not UTF-8 text (byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{meta} line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"),
                                                                                                     str):
            raise InputError(f'{meta} line {number}: needs "file_name" and "text" strings (got {line[:80]!r})')
        path = folder / row["file_name"]
        if not path.is_file():
            raise InputError(f"{meta} line {number}: image {row['file_name']!r} is not in {folder}")
        examples.append(Example(path, row["text"], row))
    if not examples:
        raise InputError(f"{meta} lists no images; the fine-tuning data must hold at least one (give {LAYOUT})")
    for ex in examples:
        try:
            with Image.open(ex.path) as im:
                im.verify()
        except Exception as err:  # PIL raises many types for broken files
            raise InputError(f"{ex.path} is not a readable image ({type(err).__name__}); remove it from "
                             f"{METADATA} or replace it") from None
    return examples


def fingerprint(folder: Path, examples: list[Example]) -> str:
    """sha256 over metadata.jsonl and every image's bytes: what the card and a resume check name as "the data"."""
    h = hashlib.sha256((data_folder(folder) / METADATA).read_bytes())
    for ex in examples:
        h.update(ex.path.read_bytes())
    return h.hexdigest()


def load_pixels(path: Path, resolution: int, center_crop: bool, flip: bool) -> torch.Tensor:
    """An image as a [3, r, r] tensor in [-1, 1]: shorter side resized to ``resolution`` (bilinear), cropped to a
    square (centre, or top-left without ``center_crop``), optionally mirrored."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                       Image.Resampling.BILINEAR)
        w, h = im.size
        left, top = ((w - resolution) // 2, (h - resolution) // 2) if center_crop else (0, 0)
        im = im.crop((left, top, left + resolution, top + resolution))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class Batches:
    """Batch number ``b`` holds items ``b*size .. b*size+size-1`` of the endless stream of shuffled epochs."""

    def __init__(self, examples: list[Example], size: int, resolution: int, seed: int, center_crop: bool = True,
                 random_flip: bool = True, workers: int = 0):
        self.examples, self.size, self.resolution, self.seed = examples, size, resolution, seed
        self.center_crop, self.random_flip, self.workers = center_crop, random_flip, workers
        self._epoch: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's permutation of the examples and each position's flip."""
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.examples), generator=gen)
            flips = torch.rand(len(self.examples), generator=gen) < 0.5
            self._epoch = (epoch, perm, flips & self.random_flip)
        return self._epoch[1], self._epoch[2]

    def batch(self, number: int) -> tuple[torch.Tensor, list[str]]:
        pixels, texts = [], []
        n = len(self.examples)
        for item in range(number * self.size, (number + 1) * self.size):
            perm, flips = self.order(item // n)
            ex = self.examples[int(perm[item % n])]
            pixels.append(load_pixels(ex.path, self.resolution, self.center_crop, bool(flips[item % n])))
            texts.append(ex.text)
        return torch.stack(pixels), texts

    def __call__(self, position: int, rank: int, world: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """This process's micro-batches from ``position`` on (the training core's data interface); with
        ``workers`` they are decoded ahead in DataLoader worker processes, in the same order."""
        if not self.workers:
            while True:
                yield self.batch(position * world + rank)
                position += 1
        positioned = _Positioned(self, position, rank, world)
        yield from torch.utils.data.DataLoader(positioned, batch_size=None, num_workers=self.workers,
                                               prefetch_factor=2)


class _Positioned(torch.utils.data.Dataset):
    """Item ``i``: the micro-batch a process reads at position ``start + i``."""

    def __init__(self, batches: Batches, start: int, rank: int, world: int):
        self.batches, self.start, self.rank, self.world = batches, start, rank, world

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int):
        return self.batches.batch((self.start + i) * self.world + self.rank)
