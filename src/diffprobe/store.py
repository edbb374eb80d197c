"""The run directory: one SQLite database (WAL) as the source of truth, PNG files named by their content hash.

Layout::

    RUN_DIR/run.sqlite                 meta (spec, resolved config), prompts, samples
    RUN_DIR/images/<sha[:2]>/<sha>.png content-addressed images
    RUN_DIR/run.lock                   held by the one writer (the generate driver)

Crash safety: an image is written to a temp file in its final folder, fsynced and renamed to its hash name,
and only then is its row inserted (one transaction per batch). So a row always has its file; a killed writer
can leave temp files or files without rows.

Readers (``open_run(path)``: score, export, ...) never change a run: they open the database read-only, take no
lock and create nothing, so a run on read-only storage reads as it is. ``RunStore.check`` reports what is
missing or extra. Only a writer (``open_run(path, write=True)``, holding the lock) cleans up, with
``RunStore.repair``: it removes temp files and images without a row, and reports rows whose image is missing;
it drops those rows (so they are generated again) only when asked to.
Other features keep their own tables or SQLite files next to this one (``RunStore.connect``, ``RunStore.root``);
a ``verdicts`` table with a ``key`` column joins into the export.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image
from pydantic import ValidationError

from . import locks
from .errors import InputError, RunMismatchError, StorageError
from .spec import RunSpec, canonical_json, flatten

DB_NAME = "run.sqlite"
IMAGES = "images"
LOCK_NAME = "run.lock"
TMP_SUFFIX = ".tmp"
SCHEMA_VERSION = 1
VERDICTS_TABLE = "verdicts"  # made by judges; one or more rows per sample key

_SCHEMA = f"""
BEGIN;
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
INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
COMMIT;
"""
_COLUMNS = {
    "meta": {"name", "value"},
    "prompts": {"prompt", "meta"},
    "samples": {"key", "prompt", "seed", "image_sha256", "width", "height", "guidance", "provenance", "records",
                "truncated", "created"},
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Made by the judging writer on first use. One verdict per (image, judge identity, question); ``key`` is the sample
# key (export joins on it); ``correct`` is 1, 0, or NULL for an answer that did not parse.
_VERDICTS_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {VERDICTS_TABLE} (
    image_sha256 TEXT NOT NULL,
    judge TEXT NOT NULL,        -- canonical JSON of the judge's identity (model, template, parser, decoding)
    question TEXT NOT NULL,     -- canonical JSON of the question
    key TEXT NOT NULL,
    correct INTEGER,
    answer TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw TEXT,                   -- the raw response (VLM judges)
    created REAL NOT NULL,
    PRIMARY KEY (image_sha256, judge, question)
);
CREATE INDEX IF NOT EXISTS {VERDICTS_TABLE}_key ON {VERDICTS_TABLE} (key);
"""


def canonical_identity(value: Mapping[str, Any] | str) -> str:
    """The canonical JSON text of a judge identity or question (sorted keys, no spaces): the verdicts' key."""
    return canonical_json(json.loads(value) if isinstance(value, str) else value)


@dataclass
class VerdictRow:
    """One stored verdict: ``correct`` is None when the judge's answer did not parse."""

    key: str
    image_sha256: str
    judge: dict[str, Any]
    question: dict[str, Any]
    correct: bool | None
    answer: str = ""
    reason: str = ""
    raw: str | None = None
    created: float = 0.0


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
class RunCheck:
    """What a reader found, changing nothing: rows whose image is missing, files that belong to no row."""

    root: Path
    missing: list[str] = field(default_factory=list)  # sample keys whose image file is gone
    extra: list[Path] = field(default_factory=list)  # images without a row and unfinished temp files

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra)

    def __str__(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} image file(s) missing")
        if self.extra:
            parts.append(f"{len(self.extra)} extra file(s)")
        return ", ".join(parts) or "complete"

    def note(self) -> str:
        """One line for the user, with the command that cleans up."""
        return (f"{self.root}: {self}; re-run the generate command that made it with --repair to clean up "
                "(rows whose image is missing are then generated again)")


@dataclass
class RepairReport:
    """What a writer's ``RunStore.repair`` did."""

    temp_files: int = 0  # removed
    orphan_images: int = 0  # removed (images without a row)
    missing_rows: list[str] = field(default_factory=list)  # keys whose image file is missing
    dropped: bool = False  # whether those rows were deleted (so they are generated again)

    def __bool__(self) -> bool:
        return bool(self.temp_files or self.orphan_images or self.missing_rows)

    def __str__(self) -> str:
        parts = []
        if self.temp_files:
            parts.append(f"removed {self.temp_files} unfinished temp file(s)")
        if self.orphan_images:
            parts.append(f"removed {self.orphan_images} image(s) without a row")
        if self.missing_rows and self.dropped:
            parts.append(f"dropped {len(self.missing_rows)} row(s) whose image file was missing; they are "
                         "generated again")
        elif self.missing_rows:
            parts.append(f"kept {len(self.missing_rows)} row(s) whose image file is missing (pass --repair to "
                         "drop them so they are generated again)")
        return "; ".join(parts) or "nothing to repair"


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / DB_NAME).is_file()


def open_run(path: str | Path, *, write: bool = False) -> RunStore:
    """Open an existing run directory: read-only (changes nothing), or ``write=True`` with the writer lock
    (one writer at a time; it should call ``repair`` once)."""
    if not is_run_dir(path):
        raise InputError(f"{path} is not a diffprobe run directory (no {DB_NAME}); create one with "
                         f"'diffprobe generate --out {path}'")
    return RunStore(path, write=write)


def create_run(path: str | Path, spec: RunSpec, *, new: bool = False) -> RunStore:
    """Create a run directory for ``spec`` and open it for writing. An existing run is refused unless
    ``new`` is set, in which case it is moved aside to ``<path>.old-<timestamp>`` (nothing is deleted); a run
    that another process is writing is never moved."""
    path = Path(path)
    check_new_run_dir(path, new=new)
    aside = None
    if path.exists() and any(path.iterdir()):
        # Hold the old run's writer lock across the move, so a live writer is refused, not moved away.
        lock = _take_lock(path.resolve()) if is_run_dir(path) else None
        try:
            aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            n = 1
            while aside.exists():
                aside = aside.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
                n += 1
            path.rename(aside)
        except OSError as err:
            raise StorageError(f"cannot move {path} aside ({_reason(err)})") from None
        finally:
            if lock is not None:
                lock.close()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"cannot create the run directory {path} ({_reason(err)})") from None
    store = RunStore(path, write=True)
    store.moved_aside = aside.resolve() if aside is not None else None
    store.set_meta("spec", spec.model_dump(mode="json"))
    return store


def check_new_run_dir(path: str | Path, *, new: bool = False) -> None:
    """A new run needs an empty or missing directory, unless ``new`` allows moving the old one aside; a run that
    another process is writing is refused either way (wait for it; --new would not help)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file; --out needs a directory")
    if path.exists() and any(path.iterdir()):
        if locks.held(path / LOCK_NAME):
            raise InputError(f"another process is writing to {path.resolve()}; wait for it to finish")
        if not new:
            raise RunMismatchError(f"{path} exists and is not empty; choose another --out, or pass --new to move "
                                   "it aside and start a fresh run there")


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot change the database at ``path``, also on read-only storage.

    Raises ``sqlite3.DatabaseError`` for a file that is not an SQLite database, ``OSError`` for an unreadable one."""
    uri = Path(path).resolve().as_uri()
    with open(path, "rb"):  # unreadable files fail here with the reason, not as SQLite's "unable to open"
        pass
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    except BaseException:
        conn.close()
        raise
    # A WAL database on read-only storage whose -shm file is absent (its last writer closed cleanly, so the
    # database file holds every row): SQLite cannot create the -shm there, so read the file as an immutable one.
    conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _take_lock(root: Path) -> BinaryIO | None:
    """The writer lock of ``root`` (None where flock is unavailable); a second writer is refused."""
    try:
        return locks.take(root / LOCK_NAME, f"another process is writing to {root}; wait for it to finish")
    except OSError as err:
        raise StorageError(f"cannot write to {root} ({_reason(err)}); a run needs a writable directory") from None


class RunStore:
    def __init__(self, path: str | Path, *, write: bool = False):
        self.root = Path(path).resolve()
        self.images_dir = self.root / IMAGES
        self.writable = write
        self.moved_aside: Path | None = None  # set by create_run(new=True) when an old run was moved away
        self._lock_file: BinaryIO | None = None
        if write:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(f"cannot create the run directory {self.root} ({_reason(err)})") from None
            self._lock_file = _take_lock(self.root)
        try:
            self._conn = self.connect()
            try:
                self._check_schema()
            except BaseException:
                self._conn.close()
                raise
        except BaseException:
            self._release_lock()
            raise

    # -- connection and locking ---------------------------------------------------------------------------

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    def connect(self) -> sqlite3.Connection:
        """A new connection to ``run.sqlite``: WAL mode for a writer (other features may add their own tables),
        read-only for a reader."""
        if not self.writable:
            return self._connect_read_only()
        # check_same_thread=False: the driver hands writes to one writer thread; never two threads at once.
        conn = sqlite3.connect(self.db_path, timeout=30, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against process crashes in WAL mode; a power cut may lose the last rows, whose
            # files then count as orphans and are regenerated.
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as err:
            conn.close()
            raise self._broken(str(err)) from None
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        try:
            return connect_read_only(self.db_path)
        except sqlite3.DatabaseError as err:
            raise self._broken(str(err)) from None
        except OSError as err:
            raise InputError(f"cannot read {self.db_path} ({_reason(err)})") from None

    def _broken(self, reason: str) -> InputError:
        return InputError(f"{self.db_path} is not a diffprobe run database ({reason})")

    def _check_schema(self) -> None:
        """Refuse a database that is not a run's; a writer lays out a new (empty) one."""
        try:
            tables = {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables and self.writable:
                with self._writing():
                    self._conn.executescript(_SCHEMA)  # one transaction: a killed writer leaves all or nothing
                return
            for table, columns in _COLUMNS.items():
                if table not in tables:
                    raise self._broken(f"no '{table}' table")
                have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
                if lacking := sorted(columns - have):
                    raise self._broken(f"table '{table}' lacks column(s) {', '.join(lacking)}")
        except sqlite3.DatabaseError as err:
            raise self._broken(str(err)) from None
        version = self.get_meta("schema_version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                    or not 1 <= version <= SCHEMA_VERSION):
            raise self._broken(f"schema version {version!r}; this diffprobe reads version {SCHEMA_VERSION}")
        self.spec  # noqa: B018 - a bad spec row is refused now, not in the middle of a command

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Disk full, read-only storage or I/O errors while writing the database: one clear error."""
        try:
            yield
        except sqlite3.OperationalError as err:
            raise StorageError(f"cannot write to {self.db_path} ({err})") from err

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
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
            return None if row is None else json.loads(row[0])
        except (sqlite3.DatabaseError, TypeError, ValueError) as err:  # ValueError: bad JSON
            raise self._broken(f"bad meta row '{name}': {err}") from None

    def set_meta(self, name: str, value: Any) -> None:
        self._require_write()
        with self._writing(), self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, json.dumps(value)))

    @property
    def spec(self) -> RunSpec | None:
        data = self.get_meta("spec")
        try:
            return None if data is None else RunSpec.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "spec"
            raise self._broken(f"bad spec row: {where}: {first['msg']}") from None

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
        per_prompt = spec.prompt_seeds is not None or stored.prompt_seeds is not None
        if per_prompt:  # each prompt its own seeds: compare the (prompt, seed) jobs themselves
            new_pairs = [pair for pair in spec.pairs() if pair not in set(stored.pairs())]
            if not new_pairs:
                return
        elif not (new_prompts or new_seeds):
            return
        if not extend:
            raise RunMismatchError(f"{self.root} holds a run with other prompts/seeds ({len(new_prompts)} new "
                                   f"prompt(s), {len(new_seeds)} new seed(s)); pass --extend to add them to it, "
                                   "--new to start over, or use another --out")
        update: dict[str, Any] = {"prompts": stored.prompts + new_prompts, "seeds": stored.seeds + new_seeds}
        if per_prompt:
            table: dict[str, list[int]] = {}
            for p, s in stored.pairs() + new_pairs:
                table.setdefault(p, []).append(s)
            update["prompt_seeds"] = table
        union = stored.model_copy(update=update)
        self.set_meta("spec", union.model_dump(mode="json"))

    def check_config(self, config: dict[str, Any]) -> None:
        """The resolved generation config (model identity, dtype, ...) must not change within a run."""
        stored = self.get_meta("config")
        if stored is None:
            self.set_meta("config", config)
            return
        if not isinstance(stored, dict):
            raise self._broken(f"bad meta row 'config': not an object ({type(stored).__name__})")
        old, new = flatten(stored), flatten(json.loads(json.dumps(config)))
        if diffs := [f"{k}: {old.get(k)!r} (run) != {new.get(k)!r} (now)" for k in sorted(old.keys() | new.keys())
                     if old.get(k) != new.get(k)]:
            raise RunMismatchError(f"the model or its settings changed since {self.root} was made "
                                   f"({'; '.join(diffs)}); use another --out, or --new to move the old run aside")

    # -- prompts --------------------------------------------------------------------------------------------

    def add_prompts(self, prompts: Iterable[tuple[str, dict[str, Any]]]) -> None:
        self._require_write()
        with self._writing(), self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO prompts VALUES (?, ?)",
                                   [(text, json.dumps(meta, default=str)) for text, meta in prompts])

    def prompt_meta(self) -> dict[str, dict[str, Any]]:
        try:
            metas = {t: json.loads(m) for t, m in self._conn.execute("SELECT prompt, meta FROM prompts")}
        except (sqlite3.DatabaseError, TypeError, ValueError) as err:
            raise self._broken(f"bad prompts row: {err}") from None
        if bad := next((t for t, m in metas.items() if not isinstance(m, dict)), None):
            raise self._broken(f"prompts row {bad!r}: meta is not an object")
        return metas

    # -- samples --------------------------------------------------------------------------------------------

    def image_path(self, sha256: str) -> Path:
        return self.images_dir / sha256[:2] / f"{sha256}.png"

    def _rows(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(query, args).fetchall()
        except sqlite3.DatabaseError as err:
            raise self._broken(str(err)) from None

    def _checked_sha(self, key: Any, sha: Any) -> str:
        """An image hash from a row; anything else could point a reader at a file outside the run."""
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise self._broken(f"sample {key!r} has image_sha256 {sha!r}, not 64 lowercase hex characters")
        return sha

    def keys(self) -> set[str]:
        return {k for (k,) in self._rows("SELECT key FROM samples")}

    def __len__(self) -> int:
        return self._rows("SELECT COUNT(*) FROM samples")[0][0]

    def __contains__(self, key: object) -> bool:
        return bool(self._rows("SELECT 1 FROM samples WHERE key = ?", (key,)))

    def samples(self, prompt: str | None = None) -> list[Sample]:
        """All samples (or one prompt's), ordered by prompt then seed."""
        query = ("SELECT key, prompt, seed, image_sha256, width, height, guidance, provenance, records, truncated, "
                 "created FROM samples")
        args: tuple[Any, ...] = ()
        if prompt is not None:
            query, args = query + " WHERE prompt = ?", (prompt,)
        metas = self.prompt_meta()
        out = []
        for key, p, seed, sha, w, h, guidance, prov, rec, trunc, created in self._rows(
            query + " ORDER BY prompt, seed", args
        ):
            sha = self._checked_sha(key, sha)
            if not isinstance(seed, int) or not isinstance(p, str):
                raise self._broken(f"sample {key!r} has prompt {p!r} and seed {seed!r}")
            try:
                guidance, prov, rec = json.loads(guidance), json.loads(prov), json.loads(rec)
            except (TypeError, ValueError) as err:
                raise self._broken(f"sample {key!r}: a JSON column does not parse ({err})") from None
            out.append(Sample(key=key, prompt=p, seed=seed, image_path=self.image_path(sha), image_sha256=sha,
                              guidance=guidance, provenance=prov, records=rec,
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

    def check(self) -> RunCheck:
        """Rows whose image file is missing and files without a row; changes nothing (readers use this)."""
        rows = [(key, self._checked_sha(key, sha)) for key, sha in self._rows("SELECT key, image_sha256 FROM samples")]
        referenced = {sha for _, sha in rows}
        missing = [key for key, sha in rows if not self.image_path(sha).is_file()]
        extra: list[Path] = []
        if self.images_dir.is_dir():
            extra += sorted(self.images_dir.glob(f"*/*{TMP_SUFFIX}"))
            extra += sorted(png for png in self.images_dir.glob("*/*.png") if png.stem not in referenced)
        return RunCheck(self.root, missing, extra)

    def repair(self, *, drop_missing: bool = False) -> RepairReport:
        """For the writer, once after opening: remove temp files and images without a row (a killed writer's
        leftovers), and report rows whose image file is missing; ``drop_missing`` deletes those rows, so the
        writer makes them again."""
        self._require_write()
        found = self.check()
        report = RepairReport(missing_rows=found.missing, dropped=drop_missing and bool(found.missing))
        for path in found.extra:
            path.unlink(missing_ok=True)
            if path.name.endswith(TMP_SUFFIX):
                report.temp_files += 1
            else:
                report.orphan_images += 1
        if report.dropped:
            with self._writing(), self._conn:
                self._conn.executemany("DELETE FROM samples WHERE key = ?", [(k,) for k in found.missing])
        return report

    def verify(self) -> list[str]:
        """Keys whose image file is missing or whose bytes do not match their hash (reads every image)."""
        bad = []
        for key, sha in self._rows("SELECT key, image_sha256 FROM samples"):
            path = self.image_path(self._checked_sha(key, sha))
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
                bad.append(key)
        return bad

    # -- verdicts -------------------------------------------------------------------------------------------

    def _has_table(self, name: str) -> bool:
        return bool(self._rows("SELECT 1 FROM sqlite_master WHERE type='table' AND name = ?", (name,)))

    def _ensure_verdicts(self) -> None:
        """The writer makes the verdicts table on first use (readers never create it)."""
        self._require_write()
        with self._writing(), self._conn:
            self._conn.executescript(_VERDICTS_SCHEMA)

    def add_verdicts(self, rows: Iterable[VerdictRow]) -> int:
        """Store verdicts in one transaction (a killed judge keeps every batch committed before); a verdict
        already stored for the same (image, judge, question) is replaced. Returns the row count."""
        self._require_write()
        items = [(r.image_sha256, canonical_identity(r.judge), canonical_identity(r.question), r.key,
                  None if r.correct is None else int(bool(r.correct)), r.answer, r.reason, r.raw, time.time())
                 for r in rows]
        if not items:
            return 0
        self._ensure_verdicts()
        with self._writing(), self._conn:
            self._conn.executemany(f"INSERT OR REPLACE INTO {VERDICTS_TABLE} (image_sha256, judge, question, key, "
                                   "correct, answer, reason, raw, created) VALUES (?,?,?,?,?,?,?,?,?)", items)
        return len(items)

    def judged(self, judge: Mapping[str, Any]) -> set[tuple[str, str]]:
        """(image sha256, canonical question JSON) pairs that ``judge`` (its identity) has a stored verdict for."""
        if not self._has_table(VERDICTS_TABLE):
            return set()
        return {(sha, q) for sha, q in self._rows(
            f"SELECT image_sha256, question FROM {VERDICTS_TABLE} WHERE judge = ?", (canonical_identity(judge),))}

    def judge_verdicts(self, judge: Mapping[str, Any]) -> list[VerdictRow]:
        """Every verdict stored for ``judge`` (its identity), ordered by sample key."""
        if not self._has_table(VERDICTS_TABLE):
            return []
        out = []
        for sha, jid, q, key, correct, answer, reason, raw, created in self._rows(
            f"SELECT image_sha256, judge, question, key, correct, answer, reason, raw, created FROM {VERDICTS_TABLE} "
            "WHERE judge = ? ORDER BY key, question", (canonical_identity(judge),)
        ):
            try:
                judge_obj, question = json.loads(jid), json.loads(q)
            except (TypeError, ValueError) as err:
                raise self._broken(f"verdict of sample {key!r}: a JSON column does not parse ({err})") from None
            out.append(VerdictRow(key=key, image_sha256=sha, judge=judge_obj, question=question,
                                  correct=None if correct is None else bool(correct), answer=answer or "",
                                  reason=reason or "", raw=raw, created=created))
        return out

    # -- export ---------------------------------------------------------------------------------------------

    def verdicts(self) -> dict[str, list[dict[str, Any]]]:
        """Rows of the ``verdicts`` table by sample key (every column but ``key``); empty when there is none."""
        if not self._has_table(VERDICTS_TABLE):
            return {}
        try:
            cursor = self._conn.execute(f"SELECT * FROM {VERDICTS_TABLE}")
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        except sqlite3.DatabaseError as err:
            raise self._broken(f"table '{VERDICTS_TABLE}': {err}") from None
        if "key" not in names:
            raise self._broken(f"table '{VERDICTS_TABLE}' has no 'key' column")
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            record = dict(zip(names, row, strict=True))
            out.setdefault(record.pop("key"), []).append(record)
        return out

    def export_rows(self, extra: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
        """One dict per sample: top-level fields plus nested ``guidance``, ``provenance``, ``records``,
        ``image_missing``, the sample's ``verdicts`` when the run has a verdicts table, and ``extra[key]``
        (per-image results joined by the caller)."""
        verdicts = self.verdicts()
        for s in self.samples():
            row = {"key": s.key, "prompt": s.prompt, "seed": s.seed, "image_path": str(s.image_path),
                   "image_sha256": s.image_sha256, "image_missing": not s.image_path.is_file(), "width": s.width,
                   "height": s.height, "truncated": s.truncated, "created": s.created, "prompt_meta": s.prompt_meta,
                   "guidance": s.guidance, "provenance": s.provenance, "records": s.records}
            if verdicts:
                row["verdicts"] = verdicts.get(s.key, [])
            if extra:
                row.update(extra.get(s.key, {}))
            yield row

    def export_jsonl(self, path: str | Path, extra: Mapping[str, Mapping[str, Any]] | None = None) -> int:
        """Write one JSON object per sample (nested as in ``export_rows``); returns the row count."""
        n = 0
        with _atomic_write(Path(path)) as f:
            for row in self.export_rows(extra):
                f.write(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n")
                n += 1
        return n

    def export_parquet(self, path: str | Path, extra: Mapping[str, Mapping[str, Any]] | None = None) -> int:
        """Write a Parquet table with nested dicts flattened to dotted columns (``provenance.model.id``);
        lists and values whose type varies between rows are stored as JSON text."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [flatten(r) for r in self.export_rows(extra)]
        columns = sorted({k for r in rows for k in r}, key=_column_order)
        data = {c: _column([r.get(c) for r in rows]) for c in columns}
        table = pa.table(data) if rows else pa.table({c: pa.array([], pa.string()) for c in ["key"]})
        with _atomic_write(Path(path), binary=True) as f:
            pq.write_table(table, f)
        return len(rows)


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


_FIRST = ["key", "prompt", "seed", "image_path", "image_sha256", "image_missing", "width", "height", "truncated",
          "created"]


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
