"""Feature cache: one SQLite table keyed by (sha256 of the image file's bytes, embedder id).

File names never enter the key, so renamed or copied images hit the cache and edited images miss it.
For a run directory the cache lives in ``RUN/features.sqlite``; otherwise in ``$DIFFPROBE_CACHE``
(default ``~/.cache/diffprobe``)/``features.sqlite``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from .base import Embedder, file_sha256

CACHE_FILE = "features.sqlite"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFPROBE_CACHE", Path.home() / ".cache" / "diffprobe")).expanduser()


class FeatureCache:
    """Persistent map (image sha256, embedder id) -> float32 vector. ``computed`` counts cache misses."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS features (sha256 TEXT NOT NULL, embedder TEXT NOT NULL, dim INTEGER NOT NULL,"
            " vector BLOB NOT NULL, PRIMARY KEY (sha256, embedder))"
        )
        self._db.commit()
        self.computed = 0

    @classmethod
    def for_location(cls, run_dir: Path | None = None, cache_dir: Path | None = None) -> FeatureCache:
        if run_dir is not None:
            return cls(Path(run_dir) / CACHE_FILE)
        return cls(Path(cache_dir or default_cache_dir()) / CACHE_FILE)

    def get(self, shas: Sequence[str], embedder_id: str) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(shas))
        for start in range(0, len(unique), 900):  # SQLite caps bound parameters
            chunk = unique[start : start + 900]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT sha256, dim, vector FROM features WHERE embedder = ? AND sha256 IN ({marks})",
                [embedder_id, *chunk],
            )
            for sha, dim, blob in rows:
                found[sha] = np.frombuffer(blob, dtype=np.float32, count=dim)
        return found

    def put(self, shas: Sequence[str], embedder_id: str, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._db.executemany(
            "INSERT OR REPLACE INTO features (sha256, embedder, dim, vector) VALUES (?, ?, ?, ?)",
            [(sha, embedder_id, vectors.shape[1], vectors[i].tobytes()) for i, sha in enumerate(shas)],
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for truncated or non-image files
        raise InputError(f"cannot read image {path}: {err}. Remove it or pass --skip-bad to skip it") from err


def embed_files(
    embedder: Embedder,
    paths: Sequence[Path],
    cache: FeatureCache | None = None,
    shas: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    chunk: int = 256,
) -> np.ndarray:
    """Features for image files, float32 [len(paths), D]; cached ones are read, the rest embedded in batches.

    ``shas`` may be given when the caller knows them (a run store records each image's sha256). Identical
    files are embedded once. Memory beyond the output array is one chunk of images or cache rows.
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
    for start in range(0, len(todo), chunk):  # decode a chunk, embed it, store it
        part = todo[start : start + chunk]
        vectors = embedder.embed([load_image(paths[rows[sha][0]]) for sha in part])
        for sha, vec in zip(part, vectors, strict=True):
            out[rows[sha]] = vec
        if cache is not None:
            cache.put(part, embedder.id, vectors)
            cache.computed += len(part)
        if progress is not None:
            progress(len(part))
    return out
