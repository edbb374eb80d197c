"""Finding the images a metric scores: a run directory, or a folder grouped by manifest, by subfolder, or flat.

Folders: ``manifest.jsonl`` / ``manifest.csv`` (columns ``file`` and ``prompt``, optional ``prompt_id``
and ``seed``) wins; otherwise each subfolder holding images is one prompt (its name is the prompt id,
a ``prompt.txt`` inside may give the text); otherwise the folder is one flat set of images.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..embed import Embedder, FeatureCache, embed_files
from ..embed.cache import CACHE_FILE
from ..errors import InputError
from ..store import Sample, is_run_dir, open_run

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Files that live beside images on purpose and are never counted as skipped.
KNOWN_FILES = {"manifest.jsonl", "manifest.csv", "prompt.txt", CACHE_FILE, "run.sqlite", "run.yaml", "run.json"}


@dataclass
class ImageItem:
    path: Path
    group: str | None = None  # prompt id; None for flat sets
    prompt: str | None = None  # prompt text, when known
    seed: int | None = None
    sha256: str | None = None
    key: str | None = None  # the sample key, for images of a run
    sampler: dict | None = None  # the run's sampler settings (steps, scheduler, size, ...), for runs only


@dataclass
class ImageSet:
    root: Path
    source: str  # "run", "manifest", "subfolders" or "flat"
    items: list[ImageItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> count
    run_dir: Path | None = None
    notes: list[str] = field(default_factory=list)  # e.g. a run's missing or extra files

    def groups(self) -> dict[str, list[int]]:
        """Prompt id -> indices into ``items``, in first-seen order."""
        out: dict[str, list[int]] = {}
        for i, item in enumerate(self.items):
            if item.group is None:
                raise InputError(
                    f"{self.root} is a flat folder; this metric needs images grouped per prompt "
                    "(a manifest.jsonl/.csv with file and prompt columns, or one subfolder per prompt)"
                )
            out.setdefault(item.group, []).append(i)
        return out

    def prompt_texts(self) -> dict[str, str | None]:
        return {item.group: item.prompt for item in self.items if item.group is not None}

    def generation(self) -> dict:
        """What made the images, as far as they record it: the distinct seeds and sampler settings."""
        seeds = sorted({it.seed for it in self.items if it.seed is not None})
        samplers = {json.dumps(it.sampler, sort_keys=True) for it in self.items if it.sampler is not None}
        return {"seeds": seeds or None, "sampler": [json.loads(s) for s in sorted(samplers)] or None}

    def summary(self) -> dict:
        out = {
            "path": str(self.root),
            "source": self.source,
            "n_images": len(self.items),
            "skipped": {"count": len(self.skipped), "examples": [f"{p}: {r}" for p, r in self.skipped[:5]]},
            "image_sizes": self.sizes,
        }
        if self.notes:
            out["notes"] = self.notes
        return out

    def features(
        self,
        embedder: Embedder,
        cache: FeatureCache | None | bool = True,
        progress: Callable[[int], None] | None = None,
        backend: Any = None,
    ) -> np.ndarray:
        """Features of all items (cached in the run directory, or in the user cache for folders); ``backend``
        (``diffprobe.distributed``) decides where the missing ones are computed."""
        opened = FeatureCache.for_location(run_dir=self.run_dir) if cache is True else None
        shas = [it.sha256 for it in self.items]
        try:
            feats = embed_files(
                embedder,
                [it.path for it in self.items],
                cache=opened or cache or None,
                shas=shas if all(shas) else None,
                progress=progress,
                backend=backend,
            )
        finally:
            if opened is not None:  # a cache this call opened is closed again; a caller's stays open
                opened.close()
        check_features(feats, f"features of {self.root} ({embedder.name})")
        return feats


def check_features(feats: np.ndarray, what: str, chunk: int = 65536) -> None:
    """Refuse feature arrays that are not real numbers, or that hold NaN or infinity (metrics would silently
    turn them into plausible-looking scores). Reads a memory-mapped array chunk by chunk."""
    if feats.dtype.kind not in "fiu":
        raise InputError(f"{what} must be a numeric (float or integer) array, got dtype {feats.dtype}")
    for start in range(0, len(feats), chunk):
        finite = np.isfinite(feats[start : start + chunk])
        if not finite.all():
            row = start + int(np.argwhere(~finite)[0][0])
            raise InputError(f"{what}: NaN or infinite values (first in row {row}); features must be finite")


def _check_image(path: Path) -> tuple[str | None, str | None]:
    """(None, 'WxH') when the file opens as an image, else (reason, None); decodes the header only."""
    try:
        with Image.open(path) as im:
            size = f"{im.size[0]}x{im.size[1]}"
            im.verify()  # checks structure (PNG chunks, CRCs) without a full decode
        return None, size
    except Exception as err:  # PIL raises many types for broken files
        return f"unreadable image ({type(err).__name__}: {err})", None


def run_samples(path: str | Path) -> list[Sample] | None:
    """The samples of the run directory at ``path``, or None when ``path`` is not a run. The run is opened
    read-only and closed again; nothing in it changes."""
    if not is_run_dir(path):
        return None
    with open_run(path) as run:
        return run.samples()


def _from_run(path: Path, samples, guidance: str | None) -> list[ImageItem]:
    variants = {json.dumps(s.guidance, sort_keys=True) for s in samples}
    if guidance is not None:
        samples = [s for s in samples if s.guidance.get("name") == guidance]
        if not samples:
            raise InputError(f"no samples with guidance '{guidance}' in {path}")
    elif len(variants) > 1:
        names = sorted({str(s.guidance.get("name")) for s in samples})
        raise InputError(
            f"{path} holds {len(variants)} guidance variants ({', '.join(names)}); pick one with --guidance NAME"
        )
    return [
        ImageItem(Path(s.image_path), group=s.prompt, prompt=s.prompt, seed=s.seed, sha256=s.image_sha256, key=s.key,
                  sampler=s.provenance.get("sampler"))
        for s in samples
    ]


def _read_manifest(root: Path, manifest: Path) -> list[ImageItem]:
    if manifest.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"{manifest}:{n}: not valid JSON ({err})") from err
    else:
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
    return [_manifest_item(root, manifest, n, row) for n, row in enumerate(rows, 1)]


def _manifest_item(root: Path, manifest: Path, n: int, row: object) -> ImageItem:
    """One manifest row: ``file`` (a path inside the folder) and ``prompt`` (text), optional ``prompt_id``
    (text or integer) and ``seed`` (integer)."""
    where = f"{manifest}: row {n}"
    if not isinstance(row, dict):
        raise InputError(f"{where} is not an object with 'file' and 'prompt' fields (got {type(row).__name__})")
    if "file" not in row or "prompt" not in row:
        raise InputError(f"{where} lacks the 'file' and 'prompt' columns")
    file, prompt, prompt_id, seed = row["file"], row["prompt"], row.get("prompt_id"), row.get("seed")
    if not isinstance(file, str) or not file.strip():
        raise InputError(f"{where}: 'file' must be a path (text), got {file!r}")
    relative = os.path.normpath(file)
    if os.path.isabs(relative) or relative == ".." or relative.startswith(".." + os.sep):
        raise InputError(f"{where}: 'file' {file!r} points outside {root}; manifest files must be inside its folder")
    if not isinstance(prompt, str):
        raise InputError(f"{where}: 'prompt' must be text, got {prompt!r}")
    if prompt_id is not None and (isinstance(prompt_id, bool) or not isinstance(prompt_id, str | int)):
        raise InputError(f"{where}: 'prompt_id' must be text or an integer, got {prompt_id!r}")
    if isinstance(seed, str):  # csv cells are text; an empty cell means no seed
        text = seed.strip()
        if not text:
            seed = None
        elif text.isascii() and text.lstrip("-").isdigit():
            seed = int(text)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"{where}: 'seed' must be an integer, got {row['seed']!r}")
    group = str(prompt_id if prompt_id not in (None, "") else prompt)
    return ImageItem(root / relative, group=group, prompt=prompt, seed=seed)


def _classify(files: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    images, other = [], []
    for f in files:
        if f.name in KNOWN_FILES or f.name.startswith(".") or f.name.endswith(("-wal", "-shm")):
            continue
        (images if f.suffix.lower() in IMAGE_EXTS else other).append(f)
    return images, [(str(f), "not an image file") for f in other]


def load_image_set(
    path: str | Path,
    *,
    strict: bool = False,
    guidance: str | None = None,
    flat: bool = False,
    strict_fix: str = "drop --strict to skip them",
) -> ImageSet:
    """Find and check the images under ``path``.

    Unreadable and non-image files are skipped and counted (``strict=True``: raise instead, ending the message
    with ``strict_fix``, the caller's way out). ``flat=True`` ignores any grouping and takes every image below
    ``path`` (used for IRS train/test/query sets).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"{root} does not exist")
    if not root.is_dir():
        raise InputError(f"{root} is not a directory; give a run directory or a folder of images")

    run_dir = None
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    if guidance is not None and not is_run_dir(root):
        raise InputError(f"--guidance applies to run directories; {root} is a folder of images (no run.sqlite)")
    if is_run_dir(root):
        with open_run(root) as run:  # read-only: a reader reports what is missing or extra, and changes nothing
            samples, check = run.samples(), run.check()
        if check:
            notes.append(check.note())
        items, source, run_dir = _from_run(root, samples, guidance), "run", root
    elif not flat and ((root / "manifest.jsonl").is_file() or (root / "manifest.csv").is_file()):
        manifest = root / "manifest.jsonl" if (root / "manifest.jsonl").is_file() else root / "manifest.csv"
        items, source = _read_manifest(root, manifest), "manifest"
    else:
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        top_images, top_other = _classify(sorted(f for f in root.iterdir() if f.is_file()))
        if not flat and subdirs and not top_images:
            items, source = [], "subfolders"
            for d in subdirs:
                images, other = _classify(sorted(f for f in d.iterdir() if f.is_file()))
                skipped += other
                text = (d / "prompt.txt").read_text().strip() if (d / "prompt.txt").is_file() else None
                items += [ImageItem(f, group=d.name, prompt=text) for f in images]
        else:
            files = sorted(f for f in root.rglob("*") if f.is_file()) if flat else [*top_images]
            images, other = _classify(files) if flat else (top_images, top_other)
            skipped += other
            items, source = [ImageItem(f) for f in images], "flat"

    kept, sizes = [], {}
    for item in items:
        if not item.path.is_file():
            reason, size = "file missing", None
        else:
            reason, size = _check_image(item.path)
        if reason:
            skipped.append((str(item.path), reason))
        else:
            kept.append(item)
            sizes[size] = sizes.get(size, 0) + 1
    if skipped and strict:
        p, r = skipped[0]
        raise InputError(f"{len(skipped)} bad file(s) under {root}, e.g. {p}: {r} ({strict_fix})")
    if not kept:
        raise InputError(f"no readable images under {root}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return ImageSet(root=root, source=source, items=kept, skipped=skipped, sizes=sizes, run_dir=run_dir, notes=notes)


def load_features(
    source: str | Path,
    embedder: Embedder | None,
    *,
    strict: bool = False,
    cache: FeatureCache | None | bool = True,
    progress: Callable[[int], None] | None = None,
    guidance: str | None = None,
    backend: Any = None,
) -> tuple[np.ndarray, dict]:
    """Features of every image under ``source`` (flat, recursive; of a run: only the ``guidance`` variant), or a
    precomputed ``.npy`` array [count, dim] (memory-mapped, so very large reference sets need not fit in RAM).
    ``backend`` (``diffprobe.distributed``) decides where features missing from the cache are computed."""
    path = Path(source).expanduser()
    if path.suffix == ".npy":
        if not path.is_file():
            raise InputError(f"{path} does not exist")
        if guidance is not None:
            raise InputError(f"--guidance applies to run directories; {path} is a feature file")
        try:
            feats = np.load(path, mmap_mode="r")  # never unpickles: object arrays cannot be memory-mapped
        except (ValueError, OSError, EOFError) as err:
            raise InputError(f"{path} is not a numeric .npy feature array ({err})") from None
        if not isinstance(feats, np.ndarray):  # an .npz archive
            raise InputError(f"{path} is not a single .npy array (save it with numpy.save)")
        if feats.ndim != 2 or len(feats) == 0:
            raise InputError(f"{path} must hold a non-empty 2-D feature array, got shape {feats.shape}")
        check_features(feats, str(path))
        return feats, {"path": str(path), "source": "npy", "n_images": int(len(feats)), "dim": int(feats.shape[1])}
    if embedder is None:
        raise InputError(f"{path} is an image folder; an embedder is needed")
    images = load_image_set(path, strict=strict, flat=True, guidance=guidance)
    return images.features(embedder, cache=cache, progress=progress, backend=backend), images.summary()
