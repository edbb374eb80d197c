"""DiADM training data: a folder of images (class = first subfolder, or ``label`` in ``metadata.jsonl``), or a
built-in data set written out once as such a folder (``fashion-mnist:train:2000``).

Images are read once into one tensor (these are small data sets); batches are a pure function of their position
(each epoch's order comes from a generator seeded by the run seed and the epoch), so a resumed run reads exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..embed import default_cache_dir
from ..errors import InputError
from ..finetune.data import METADATA, data_folder, load_pixels, read_image_folder

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_CLASSES = ("t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot")
DATASETS = ("fashion-mnist",)
SUBSET_SEED = 0  # the seeded subset of a built-in split (fashion-mnist:train:2000)


@dataclass
class TrainingImages:
    """The images of a training folder, in a fixed order, with their class where the folder gives one."""

    root: Path
    paths: list[Path]
    shas: list[str]
    labels: list[int] | None  # index into ``classes`` per image; None when the folder has no classes
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def relative(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.paths]

    def fingerprint(self) -> str:
        """sha256 over the images' relative paths, bytes and classes: what a resume check calls "the data"."""
        h = hashlib.sha256()
        for rel, sha in zip(self.relative(), self.shas, strict=True):
            h.update(f"{rel}\0{sha}\n".encode())
        h.update(repr((self.labels, self.classes)).encode())
        return h.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped) as a uint8 array."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def parse_dataset(name: str) -> tuple[str, str, int | None] | None:
    """``fashion-mnist[:train|test][:N]`` -> (data set, split, size or None for all); None for anything else."""
    parts = name.split(":")
    if parts[0] not in DATASETS:
        return None
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    if split not in FASHION_FILES or len(parts) > 3:
        raise InputError(f"'{name}': write fashion-mnist[:train|test][:N], e.g. fashion-mnist:train:2000")
    size = None
    if len(parts) == 3:
        if not (parts[2].isascii() and parts[2].isdigit() and int(parts[2]) >= 1):
            raise InputError(f"'{name}': the size after the split must be a whole number of images (>= 1)")
        size = int(parts[2])
    return parts[0], split, size


def dataset_folder(name: str, cache_dir: Path | None = None) -> Path:
    """The folder a built-in data set name stands for, written on first use (one subfolder per class, PNG files
    named by split and index) under ``cache_dir/datasets`` (default ``$DIFFPROBE_CACHE``)."""
    parsed = parse_dataset(name)
    assert parsed is not None, name
    _, split, size = parsed
    images_file, labels_file = (FASHION_MNIST / f for f in FASHION_FILES[split])
    if not images_file.is_file() or not labels_file.is_file():
        raise InputError(f"Fashion-MNIST is not in {FASHION_MNIST}; install the Debian package with "
                         "'apt-get install dataset-fashion-mnist', or give --images a folder of images")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if size is not None and size > len(images):
        raise InputError(f"'{name}': the {split} split has {len(images)} images, fewer than {size}")
    chosen = np.arange(len(images)) if size is None else np.sort(
        np.random.default_rng(SUBSET_SEED).permutation(len(images))[:size])
    tag = f"fashion-mnist-{split}-{'all' if size is None else size}-s{SUBSET_SEED}"
    folder = Path(cache_dir or default_cache_dir()).expanduser() / "datasets" / tag
    if folder.is_dir():
        return folder
    partial = folder.with_name(f".{tag}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    for c in FASHION_CLASSES:
        (partial / f"{FASHION_CLASSES.index(c)}-{c}").mkdir(parents=True)
    for i in chosen:
        label = int(labels[i])
        Image.fromarray(images[i]).save(partial / f"{label}-{FASHION_CLASSES[label]}" / f"{split}-{i:05d}.png")
    partial.rename(folder)
    return folder


def resolve_images(source: str | Path, cache_dir: Path | None = None) -> Path:
    """A folder of images, or the folder a built-in data set name is written to."""
    if isinstance(source, str) and parse_dataset(source) is not None and not Path(source).exists():
        return dataset_folder(source, cache_dir)
    return Path(source).expanduser()


def read_training_images(source: str | Path, cache_dir: Path | None = None) -> TrainingImages:
    """Every image of ``source``, sorted by path; classes from ``metadata.jsonl`` (a ``label`` key, else its text)
    when the folder has one, else from the first subfolder below the root (images at the root have no class)."""
    from ..embed.base import file_sha256
    from ..metrics.images import load_image_set

    root = resolve_images(source, cache_dir)
    if not root.exists():
        raise InputError(f"--images {source}: no such folder (give a folder of images, or a data set: "
                         f"{', '.join(DATASETS)}[:train|test][:N])")
    if not root.is_dir():
        raise InputError(f"--images {source} is a file; give a folder of images")
    if (data_folder(root) / METADATA).is_file():
        examples = read_image_folder(root)
        root = data_folder(root)
        paths = [ex.path for ex in examples]
        names: list[str | None] = [str(ex.record.get("label", ex.text)) for ex in examples]
    else:
        try:
            found = load_image_set(root, strict=True, flat=True,
                                   strict_fix="fix or remove them: a training set is used whole")
        except InputError as err:
            if str(err).startswith("no readable images"):
                raise InputError(f"--images {source}: the folder holds no images (png, jpg, ...); put the training "
                                 "images in it (one subfolder per class for --cond class)") from None
            raise
        paths = sorted(item.path for item in found.items)
        names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths]
    classes = sorted({n for n in names if n is not None})
    labels = None if not classes or any(n is None for n in names) else [classes.index(n) for n in names]
    return TrainingImages(root, paths, [file_sha256(p) for p in paths], labels, classes)


def read_pixels(paths: list[Path], resolution: int, channels: int) -> torch.Tensor:
    """Images as float32 [N, channels, r, r] in [-1, 1] (shorter side resized to r, centre crop; one channel:
    the mean of R, G and B)."""
    pixels = torch.stack([load_pixels(p, resolution, center_crop=True, flip=False) for p in paths])
    return pixels.mean(1, keepdim=True) if channels == 1 else pixels


class Batches:
    """Micro-batch ``b`` holds items ``b*size .. b*size+size-1`` of the endless stream of shuffled epochs of the
    in-memory ``pixels`` and ``conditions`` (None for the unconditional model)."""

    def __init__(self, pixels: torch.Tensor, conditions: torch.Tensor | None, size: int, seed: int):
        self.pixels, self.conditions, self.size, self.seed = pixels, conditions, size, seed
        self.epoch: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self.epoch is None or self.epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch = (epoch, torch.randperm(len(self.pixels), generator=gen))
        return self.epoch[1]

    def batch(self, number: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = len(self.pixels)
        rows = torch.tensor([int(self.order(item // n)[item % n])
                             for item in range(number * self.size, (number + 1) * self.size)])
        return self.pixels[rows], None if self.conditions is None else self.conditions[rows]

    def __call__(self, position: int, rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        while True:
            yield self.batch(position * world + rank)
            position += 1
