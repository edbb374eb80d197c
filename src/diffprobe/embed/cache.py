"""Feature cache: one SQLite table keyed by (sha256 of the image file's bytes, embedder id).

File names never enter the key, so renamed or copied images hit the cache and edited images miss it.
For a run directory the cache lives in ``RUN/features.sqlite``; otherwise in ``$DIFFPROBE_CACHE``
(default ``~/.cache/diffprobe``)/``features.sqlite``.
"""

from __future__ import annotations

import io
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError, WorkerError
from ..store import connect_read_only
from .base import Embedder, file_sha256

CACHE_FILE = "features.sqlite"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFPROBE_CACHE", Path.home() / ".cache" / "diffprobe")).expanduser()


class FeatureCache:
    """Persistent map (image sha256, embedder id) -> float32 vector. ``computed`` counts cache misses.

    ``read_only=True`` opens an existing cache without changing it (``put`` is then refused)."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self.computed = 0
        try:
            if read_only:
                self._db = connect_read_only(self.path)
                self._db.execute("SELECT 1 FROM features LIMIT 1").fetchall()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS features (sha256 TEXT NOT NULL, embedder TEXT NOT NULL, "
                "dim INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (sha256, embedder))"
            )
            self._db.commit()
        except (OSError, sqlite3.Error) as err:  # read-only storage, a file in the way, not a database
            raise self._error(err) from None

    def _error(self, err: Exception) -> InputError:
        reason = getattr(err, "strerror", None) or str(err)
        return InputError(
            f"cannot use the feature cache {self.path} ({reason}); pass --no-cache, or --cache-dir DIR for a "
            "writable folder"
        )

    @classmethod
    def for_location(cls, run_dir: Path | None = None, cache_dir: Path | None = None) -> FeatureCache:
        if run_dir is not None:
            return cls(Path(run_dir) / CACHE_FILE)
        folder = Path(cache_dir or default_cache_dir()).expanduser()
        if folder.exists() and not folder.is_dir():
            raise InputError(f"the feature cache folder {folder} is a file; give --cache-dir a folder")
        return cls(folder / CACHE_FILE)

    def get(self, shas: Sequence[str], embedder_id: str) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(shas))
        try:
            for start in range(0, len(unique), 900):  # SQLite caps bound parameters
                chunk = unique[start : start + 900]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT sha256, dim, vector FROM features WHERE embedder = ? AND sha256 IN ({marks})",
                    [embedder_id, *chunk],
                )
                for sha, dim, blob in rows:
                    found[sha] = np.frombuffer(blob, dtype=np.float32, count=dim)
        except (sqlite3.Error, TypeError, ValueError) as err:  # unreadable storage, a damaged cache row
            raise self._error(err) from None
        return found

    def embedders(self) -> dict[str, list[str]]:
        """Image sha256 -> ids of the embedders whose features are cached for it."""
        out: dict[str, list[str]] = {}
        try:
            for sha, embedder_id in self._db.execute("SELECT sha256, embedder FROM features ORDER BY embedder"):
                out.setdefault(sha, []).append(embedder_id)
        except sqlite3.Error as err:
            raise self._error(err) from None
        return out

    def put(self, shas: Sequence[str], embedder_id: str, vectors: np.ndarray) -> None:
        if self.read_only:
            raise RuntimeError(f"the feature cache {self.path} was opened read-only")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO features (sha256, embedder, dim, vector) VALUES (?, ?, ?, ?)",
                [(sha, embedder_id, vectors.shape[1], vectors[i].tobytes()) for i, sha in enumerate(shas)],
            )
            self._db.commit()
        except sqlite3.Error as err:  # disk full, read-only storage
            raise self._error(err) from None

    def close(self) -> None:
        self._db.close()


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for truncated or non-image files
        raise InputError(f"cannot read image {path}: {err}. Remove it or pass --skip-bad to skip it") from err


@dataclass(frozen=True)
class EmbedderRecipe:
    """What ``get_embedder`` was called with: enough for another process to build the same embedder."""

    name: str
    weights: str | None
    device: Any
    batch_size: int
    resize: str = "clean"  # inception-torchscript's FID resize mode

    def build(self) -> Embedder:
        from . import get_embedder

        return get_embedder(self.name, weights=self.weights, device=self.device, batch_size=self.batch_size,
                            resize=self.resize)


class EmbeddingWorker:
    """Builds the embedder once where it runs, and embeds batches of encoded image files (name, bytes), so the
    workers need no access to the driver's disk."""

    def __init__(self, recipe: EmbedderRecipe):
        self.recipe = recipe
        self.embedder: Embedder | None = None

    @property
    def kind(self) -> str:
        return f"embedding ({self.recipe.name})"

    def __getstate__(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "embedder": None}

    def pool_key(self) -> str:
        return repr(self.recipe)

    def setup(self) -> tuple[str, int]:
        self.embedder = self.recipe.build()
        return self.embedder.id, self.embedder.dim

    def run(self, files: list[tuple[str, bytes]]) -> np.ndarray:
        assert self.embedder is not None, "setup() runs first"
        return self.embedder.embed([decode_image(data, name) for name, data in files])


class FileChunks(Sequence):
    """Chunks of (name, bytes) of image files, read when a chunk is asked for (a pool reads one when it sends it)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        return [(str(p), _read_bytes(p)) for p in self.paths[index]]


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read image {path}: {err}. Remove it or pass --skip-bad to skip it") from err


def decode_image(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"cannot read image {name}: {err}. Remove it or pass --skip-bad to skip it") from err


def embed_files(
    embedder: Embedder,
    paths: Sequence[Path],
    cache: FeatureCache | None = None,
    shas: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    chunk: int = 256,
    backend: Any = None,
) -> np.ndarray:
    """Features for image files, float32 [len(paths), D]; cached ones are read, the rest embedded in batches.

    ``shas`` may be given when the caller knows them (a run store records each image's sha256). Identical
    files are embedded once. Memory beyond the output array is one chunk of images or cache rows (per worker in
    flight, with a distributed ``backend``: there each worker builds the embedder from ``embedder.recipe``, and
    this process still writes the cache).
    """
    paths = [Path(p) for p in paths]
    shas = list(shas) if shas is not None else [file_sha256(p) for p in paths]
    rows: dict[str, list[int]] = {}
    for i, sha in enumerate(shas):
        rows.setdefault(sha, []).append(i)
    out = np.empty((len(paths), embedder.dim), dtype=np.float32)
    unique = list(rows)
    todo = unique
    if cache is not None:
        todo = []
        for start in range(0, len(unique), 4096):
            part = unique[start : start + 4096]
            found = cache.get(part, embedder.id)
            for sha in part:
                if sha not in found:
                    todo.append(sha)
                elif found[sha].shape[0] != embedder.dim:
                    raise InputError(
                        f"cached feature for {paths[rows[sha][0]]} has dimension {found[sha].shape[0]}, "
                        f"expected {embedder.dim}; clear the feature cache {cache.path}"
                    )
                else:
                    out[rows[sha]] = found[sha]
    parts = [todo[start : start + chunk] for start in range(0, len(todo), chunk)]
    for part, vectors in _embedded(embedder, parts, [[paths[rows[sha][0]] for sha in p] for p in parts], backend):
        for sha, vec in zip(part, vectors, strict=True):
            out[rows[sha]] = vec
        if cache is not None:
            cache.put(part, embedder.id, vectors)
            cache.computed += len(part)
        if progress is not None:
            progress(len(part))
    return out


def _embedded(embedder: Embedder, parts: list[list[str]], files: list[list[Path]], backend: Any):
    """(chunk of shas, their vectors), chunk by chunk: in this process, or on ``backend``'s workers as they finish."""
    if backend is None or getattr(backend, "name", "local") == "local" or not parts:
        for part, chunk_files in zip(parts, files, strict=True):  # decode a chunk, embed it
            yield part, embedder.embed([load_image(p) for p in chunk_files])
        return
    recipe = getattr(embedder, "recipe", None)
    if recipe is None:
        raise InputError(f"embedder {embedder.name} was not made by get_embedder, so workers cannot build it; "
                         "pass its name instead")
    pool = backend.start(EmbeddingWorker(recipe))
    try:
        if pool.info != (embedder.id, embedder.dim):
            raise WorkerError(f"the workers built embedder {pool.info[0]} (dim {pool.info[1]}), not {embedder.id}; "
                              "give every node the same embedder weights (or name the embedder exactly)")
        for done in pool.imap_unordered(FileChunks(files), describe=lambda c: f"embedding {c[0][0]}"):
            yield parts[done.index], done.result
    finally:
        pool.close()
