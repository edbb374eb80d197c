"""The run directory: one SQLite database (WAL) as the source of truth, PNG files named by their content hash.

Layout::

    RUN_DIR/run.sqlite                 meta (spec, resolved config), prompts, samples
    RUN_DIR/images/<sha[:2]>/<sha>.png content-addressed images
    RUN_DIR/run.lock                   held by the one writer (the generate driver)

Crash safety: an image is written to a temp file in its final folder, fsynced and renamed to its hash name,
and only then is its row inserted (one transaction per batch). So a row always has its file; a killed writer
can leave temp files or files without rows, which the next opener cleans up when no writer holds the lock.
Other features keep their own tables or SQLite files next to this one (``RunStore.connect``, ``RunStore.root``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import InputError, RunMismatchError
from .spec import RunSpec, flatten

try:  # POSIX advisory locks; elsewhere a single writer is the user's responsibility
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

DB_NAME = "run.sqlite"
IMAGES = "images"
LOCK_NAME = "run.lock"
TMP_SUFFIX = ".tmp"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (prompt TEXT PRIMARY KEY, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    key TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    image_sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    guidance TEXT NOT NULL,     -- JSON: guider.config()
    provenance TEXT NOT NULL,   -- JSON: model identity, sampler settings, versions, device, ...
    records TEXT NOT NULL,      -- JSON: the guider's per-image record
    truncated INTEGER NOT NULL, -- 1 if the prompt was longer than the text encoder's limit
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_prompt_seed ON samples (prompt, seed);
"""


@dataclass
class Sample:
    key: str
    prompt: str
    seed: int
    image_path: Path  # absolute
    image_sha256: str
    guidance: dict[str, Any]
    provenance: dict[str, Any]
    records: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False
    width: int = 0
    height: int = 0
    created: float = 0.0
    prompt_meta: dict[str, Any] = field(default_factory=dict)

    def image(self) -> Image.Image:
        with Image.open(self.image_path) as im:
            return im.convert("RGB")


@dataclass
class NewSample:
    """What the driver hands to ``RunStore.add``."""

    key: str
    prompt: str
    seed: int
    image: Image.Image
    guidance: dict[str, Any]
    provenance: dict[str, Any]
    records: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False


@dataclass
class RepairReport:
    temp_files: int = 0
    orphan_images: int = 0
    missing_rows: list[str] = field(default_factory=list)  # keys dropped because their file was gone

    def __bool__(self) -> bool:
        return bool(self.temp_files or self.orphan_images or self.missing_rows)

    def __str__(self) -> str:
        parts = []
        if self.temp_files:
            parts.append(f"removed {self.temp_files} unfinished temp file(s)")
        if self.orphan_images:
            parts.append(f"removed {self.orphan_images} image(s) without a row")
        if self.missing_rows:
            parts.append(f"dropped {len(self.missing_rows)} row(s) whose image file was missing")
        return "; ".join(parts) or "nothing to repair"


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / DB_NAME).is_file()


def open_run(path: str | Path, *, write: bool = False) -> RunStore:
    """Open an existing run directory. ``write=True`` takes the writer lock (one writer at a time)."""
    if not is_run_dir(path):
        raise InputError(f"{path} is not a diffprobe run directory (no {DB_NAME}); create one with "
                         f"'diffprobe generate --out {path}'")
    return RunStore(path, write=write)


def create_run(path: str | Path, spec: RunSpec, *, new: bool = False) -> RunStore:
    """Create a run directory for ``spec`` and open it for writing. An existing run is refused unless
    ``new`` is set, in which case it is moved aside to ``<path>.old-<timestamp>`` (nothing is deleted)."""
    path = Path(path)
    check_new_run_dir(path, new=new)
    aside = None
    if path.exists() and any(path.iterdir()):
        aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside = aside.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
        path.rename(aside)
    path.mkdir(parents=True, exist_ok=True)
    store = RunStore(path, write=True)
    store.moved_aside = aside.resolve() if aside is not None else None
    store.set_meta("spec", spec.model_dump(mode="json"))
    return store


def check_new_run_dir(path: str | Path, *, new: bool = False) -> None:
    """A new run needs an empty or missing directory, unless ``new`` allows moving the old one aside."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file; --out needs a directory")
    if path.exists() and any(path.iterdir()) and not new:
        raise RunMismatchError(f"{path} exists and is not empty; choose another --out, or pass --new to move "
                               "it aside and start a fresh run there")


class RunStore:
    def __init__(self, path: str | Path, *, write: bool = False):
        self.root = Path(path).resolve()
        self.images_dir = self.root / IMAGES
        self.writable = write
        self.moved_aside: Path | None = None  # set by create_run(new=True) when an old run was moved away
        self._lock_file: io.BufferedWriter | None = None
        self.repair_report = RepairReport()
        if write:
            self.root.mkdir(parents=True, exist_ok=True)
        # Only an opener that holds the lock may write or clean up: a live writer's fresh files have no rows yet,
        # and a reader on read-only storage cannot take the lock, so it reads the run as it is.
        locked = self._acquire_lock(blocking_error=write)
        try:
            self._conn = self.connect()
            if locked:
                with self._conn:
                    self._conn.executescript(_SCHEMA)
                    self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                       (str(SCHEMA_VERSION),))
                self.repair_report = self._repair()
        except BaseException:
            self._release_lock()
            raise
        if locked and not write:
            self._release_lock()

    # -- connection and locking ---------------------------------------------------------------------------

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    def connect(self) -> sqlite3.Connection:
        """A new connection to ``run.sqlite`` in WAL mode (other features may add their own tables)."""
        # check_same_thread=False: the driver hands writes to one writer thread; never two threads at once.
        conn = sqlite3.connect(self.db_path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against process crashes in WAL mode; a power cut may lose the last rows, whose
        # files then count as orphans and are regenerated.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _acquire_lock(self, blocking_error: bool) -> bool:
        if fcntl is None:
            return True
        try:
            f = open(self.root / LOCK_NAME, "ab")  # noqa: SIM115 - held for the store's lifetime
        except OSError:
            if blocking_error:
                raise InputError(f"cannot write to {self.root}; a run needs a writable directory") from None
            return False  # read-only storage: read as is, without repair
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            if blocking_error:
                raise InputError(f"another process is writing to {self.root}; wait for it to finish") from None
            return False
        self._lock_file = f
        return True

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def close(self) -> None:
        self._conn.close()
        self._release_lock()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta and spec --------------------------------------------------------------------------------------

    def get_meta(self, name: str) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, name: str, value: Any) -> None:
        self._require_write()
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, json.dumps(value)))

    @property
    def spec(self) -> RunSpec | None:
        data = self.get_meta("spec")
        return None if data is None else RunSpec.model_validate(data)

    def check_spec(self, spec: RunSpec, *, extend: bool = False) -> None:
        """Refuse a spec whose generation settings differ from the stored one, or whose prompts/seeds
        differ unless ``extend`` (then the stored spec becomes the union)."""
        stored = self.spec
        if stored is None:
            self.set_meta("spec", spec.model_dump(mode="json"))
            return
        if diffs := spec.mismatch(stored):
            raise RunMismatchError(f"{self.root} was made with different settings ({'; '.join(diffs)}); use "
                                   "another --out, or --new to move the old run aside")
        new_prompts = [p for p in spec.prompts if p not in set(stored.prompts)]
        new_seeds = [s for s in spec.seeds if s not in set(stored.seeds)]
        if not (new_prompts or new_seeds):
            return
        if not extend:
            raise RunMismatchError(f"{self.root} holds a run with other prompts/seeds ({len(new_prompts)} new "
                                   f"prompt(s), {len(new_seeds)} new seed(s)); pass --extend to add them to it, "
                                   "--new to start over, or use another --out")
        union = stored.model_copy(update={"prompts": stored.prompts + new_prompts,
                                          "seeds": stored.seeds + new_seeds})
        self.set_meta("spec", union.model_dump(mode="json"))

    def check_config(self, config: dict[str, Any]) -> None:
        """The resolved generation config (model identity, dtype, ...) must not change within a run."""
        stored = self.get_meta("config")
        if stored is None:
            self.set_meta("config", config)
            return
        old, new = flatten(stored), flatten(json.loads(json.dumps(config)))
        if diffs := [f"{k}: {old.get(k)!r} (run) != {new.get(k)!r} (now)" for k in sorted(old.keys() | new.keys())
                     if old.get(k) != new.get(k)]:
            raise RunMismatchError(f"the model or its settings changed since {self.root} was made "
                                   f"({'; '.join(diffs)}); use another --out, or --new to move the old run aside")

    # -- prompts --------------------------------------------------------------------------------------------

    def add_prompts(self, prompts: Iterable[tuple[str, dict[str, Any]]]) -> None:
        self._require_write()
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO prompts VALUES (?, ?)",
                                   [(text, json.dumps(meta, default=str)) for text, meta in prompts])

    def prompt_meta(self) -> dict[str, dict[str, Any]]:
        return {t: json.loads(m) for t, m in self._conn.execute("SELECT prompt, meta FROM prompts")}

    # -- samples --------------------------------------------------------------------------------------------

    def image_path(self, sha256: str) -> Path:
        return self.images_dir / sha256[:2] / f"{sha256}.png"

    def keys(self) -> set[str]:
        return {k for (k,) in self._conn.execute("SELECT key FROM samples")}

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def __contains__(self, key: object) -> bool:
        return self._conn.execute("SELECT 1 FROM samples WHERE key = ?", (key,)).fetchone() is not None

    def samples(self, prompt: str | None = None) -> list[Sample]:
        """All samples (or one prompt's), ordered by prompt then seed."""
        query = ("SELECT key, prompt, seed, image_sha256, width, height, guidance, provenance, records, truncated, "
                 "created FROM samples")
        args: tuple[Any, ...] = ()
        if prompt is not None:
            query, args = query + " WHERE prompt = ?", (prompt,)
        metas = self.prompt_meta()
        out = []
        for key, p, seed, sha, w, h, guidance, prov, rec, trunc, created in self._conn.execute(
            query + " ORDER BY prompt, seed", args
        ):
            out.append(Sample(key=key, prompt=p, seed=seed, image_path=self.image_path(sha), image_sha256=sha,
                              guidance=json.loads(guidance), provenance=json.loads(prov), records=json.loads(rec),
                              truncated=bool(trunc), width=w, height=h, created=created,
                              prompt_meta=metas.get(p, {})))
        return out

    def add(self, items: list[NewSample]) -> None:
        """Store images and their rows: files first (atomic, fsynced), then all rows in one transaction."""
        self._require_write()
        rows = []
        for item in items:
            sha = self._write_image(item.image)
            w, h = item.image.size
            rows.append((item.key, item.prompt, int(item.seed), sha, w, h,
                         json.dumps(item.guidance, sort_keys=True, default=str),
                         json.dumps(item.provenance, sort_keys=True, default=str),
                         json.dumps(item.records, sort_keys=True, default=_json_default),
                         int(item.truncated), time.time()))
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)

    def _write_image(self, image: Image.Image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # no metadata: the hash depends on pixels only
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        final = self.image_path(sha)
        if final.exists():
            return sha
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{sha}.{os.getpid()}{TMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return sha

    def _require_write(self) -> None:
        if not self.writable:
            raise RuntimeError("this RunStore was opened read-only; open it with write=True")

    # -- consistency ----------------------------------------------------------------------------------------

    def _repair(self) -> RepairReport:
        report = RepairReport()
        if self.images_dir.is_dir():
            for tmp in self.images_dir.glob(f"*/*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                report.temp_files += 1
        rows = self._conn.execute("SELECT key, image_sha256 FROM samples").fetchall()
        referenced = {sha for _, sha in rows}
        report.missing_rows = [key for key, sha in rows if not self.image_path(sha).is_file()]
        if report.missing_rows:
            with self._conn:
                self._conn.executemany("DELETE FROM samples WHERE key = ?", [(k,) for k in report.missing_rows])
        if self.images_dir.is_dir():
            for png in self.images_dir.glob("*/*.png"):
                if png.stem not in referenced:
                    png.unlink(missing_ok=True)
                    report.orphan_images += 1
        return report

    def verify(self) -> list[str]:
        """Keys whose image file is missing or whose bytes do not match their hash (reads every image)."""
        bad = []
        for key, sha in self._conn.execute("SELECT key, image_sha256 FROM samples"):
            path = self.image_path(sha)
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
                bad.append(key)
        return bad

    # -- export ---------------------------------------------------------------------------------------------

    def export_rows(self) -> Iterator[dict[str, Any]]:
        """One dict per sample: top-level fields plus nested ``guidance``, ``provenance``, ``records``."""
        for s in self.samples():
            yield {"key": s.key, "prompt": s.prompt, "seed": s.seed, "image_path": str(s.image_path),
                   "image_sha256": s.image_sha256, "width": s.width, "height": s.height, "truncated": s.truncated,
                   "created": s.created, "prompt_meta": s.prompt_meta, "guidance": s.guidance,
                   "provenance": s.provenance, "records": s.records}

    def export_jsonl(self, path: str | Path) -> int:
        """Write one JSON object per sample (nested as in ``export_rows``); returns the row count."""
        n = 0
        with _atomic_write(Path(path)) as f:
            for row in self.export_rows():
                f.write(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n")
                n += 1
        return n

    def export_parquet(self, path: str | Path) -> int:
        """Write a Parquet table with nested dicts flattened to dotted columns (``provenance.model.id``);
        lists and values whose type varies between rows are stored as JSON text."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [flatten(r) for r in self.export_rows()]
        columns = sorted({k for r in rows for k in r}, key=_column_order)
        data = {c: _column([r.get(c) for r in rows]) for c in columns}
        table = pa.table(data) if rows else pa.table({c: pa.array([], pa.string()) for c in ["key"]})
        with _atomic_write(Path(path), binary=True) as f:
            pq.write_table(table, f)
        return len(rows)


_FIRST = ["key", "prompt", "seed", "image_path", "image_sha256", "width", "height", "truncated", "created"]


def _column_order(name: str) -> tuple[int, str]:
    return (_FIRST.index(name), "") if name in _FIRST else (len(_FIRST), name)


def _column(values: list[Any]) -> list[Any]:
    """Keep a column typed when all non-null values share one scalar type; otherwise store JSON text."""
    kinds = {type(v) for v in values if v is not None}
    if kinds == {int, float}:
        return [None if v is None else float(v) for v in values]
    if len(kinds) <= 1 and kinds <= {str, int, float, bool}:
        return values
    return [None if v is None else json.dumps(v, default=_json_default, sort_keys=True) for v in values]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and tensors in guider records
        return obj.tolist()
    return str(obj)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_write(path: Path, binary: bool = False) -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
