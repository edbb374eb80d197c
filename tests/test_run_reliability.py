"""Read commands never change a run; broken run databases are refused clearly; one writer at a time, --new too;
per-image results join into the export."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_cli import assert_user_error, cli
from test_embed import MeanColor
from test_store import item

from diffprobe.commands.export import export_run
from diffprobe.errors import InputError
from diffprobe.metrics.images import load_image_set, run_samples
from diffprobe.metrics.scs import score_scs
from diffprobe.spec import RunSpec, SamplerSpec
from diffprobe.store import check_new_run_dir, create_run, open_run


@pytest.fixture
def spec():
    return RunSpec(prompts=["a cat", "a dog"], seeds=[0, 1, 2], sampler=SamplerSpec(steps=4))


def make_run(path: Path, spec: RunSpec) -> Path:
    with create_run(path, spec) as store:
        store.add([item("k0", 0, 10), item("k1", 1, 20), item("k2", 2, 30),
                   item("d0", 0, 40, prompt="a dog"), item("d1", 1, 50, prompt="a dog")])
    return path


def rows(run: Path) -> int:
    conn = sqlite3.connect(run / "run.sqlite")
    try:
        return conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    finally:
        conn.close()


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def test_export_of_a_copied_database_keeps_every_row(tmp_path, spec, capsys, monkeypatch):
    run = make_run(tmp_path / "run", spec)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(run / "run.sqlite", copy / "run.sqlite")
    code, out, err = cli(["export", copy, "--out", tmp_path / "s.jsonl"], capsys, monkeypatch)
    assert code == 0, err
    assert "5 samples" in out
    assert "5 image file(s) missing" in err and "--repair" in err
    exported = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(exported) == 5 and all(r["image_missing"] for r in exported)
    assert rows(copy) == 5  # the database is untouched
    assert files(copy) == {"run.sqlite"}  # no lock file, no images folder
    # the same with score: the run is read, not repaired
    with pytest.raises(InputError, match="no readable images"):
        score_scs(copy, MeanColor(), cache=False, sensitivity=False)
    assert rows(copy) == 5


def test_score_and_export_leave_missing_and_extra_files_alone(tmp_path, spec, capsys, monkeypatch):
    run = make_run(tmp_path / "run", spec)
    with open_run(run) as store:
        gone = next(s for s in store.samples() if s.key == "k1")
    gone.image_path.unlink()
    orphan = run / "images" / "cd" / ("cd" + "0" * 62 + ".png")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"png without row")
    temp = run / "images" / "ab" / ".abcd.123.tmp"
    temp.parent.mkdir(exist_ok=True)
    temp.write_bytes(b"half a png")
    before = files(run)

    result = score_scs(run, MeanColor(), cache=False, sensitivity=False)
    assert result["input"]["n_images"] == 4 and result["input"]["skipped"]["count"] == 1
    assert "1 image file(s) missing, 2 extra file(s)" in result["input"]["notes"][0]
    assert rows(run) == 5 and files(run) == before

    code, out, err = cli(["export", run, "--out", tmp_path / "s.jsonl"], capsys, monkeypatch)
    assert code == 0 and "5 samples" in out, err
    assert "1 image file(s) missing, 2 extra file(s)" in err
    exported = {r["key"]: r for r in map(json.loads, (tmp_path / "s.jsonl").read_text().splitlines())}
    assert exported["k1"]["image_missing"] is True and exported["k0"]["image_missing"] is False
    assert rows(run) == 5 and files(run) == before and orphan.exists() and temp.exists()


def test_run_on_read_only_storage_reads_as_it_is(tmp_path, spec):
    """A bind mount made read-only in a private mount namespace: SQLite cannot create the -shm file there."""
    run = make_run(tmp_path / "run", spec)
    score_scs(run, MeanColor(), sensitivity=False)  # a feature cache in the run, also WAL
    out = tmp_path / "out"
    out.mkdir()
    before = files(run)
    script = (f"mount --bind {run} {run} && mount -o remount,ro,bind {run} && "
              f"{sys.executable} -m diffprobe.cli export {run} --out {out / 's.jsonl'}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "5 samples" in proc.stdout
    exported = [json.loads(line) for line in (out / "s.jsonl").read_text().splitlines()]
    assert len(exported) == 5 and all(r["features"] == [MeanColor().id] for r in exported)
    assert files(run) == before


def test_run_samples_closes_the_store(tmp_path, spec):
    run = make_run(tmp_path / "run", spec)
    assert [s.key for s in run_samples(run)] == ["k0", "k1", "k2", "d0", "d1"]
    fd_dir = Path("/proc/self/fd")
    open_files = {str(p.resolve()) for p in fd_dir.iterdir() if p.exists()}
    assert str((run / "run.sqlite").resolve()) not in open_files
    assert run_samples(tmp_path) is None


@pytest.mark.parametrize("damage, reason", [
    ("garbage", "file is not a database"),
    ("other-schema", "no 'meta' table"),
    ("missing-table", "no 'samples' table"),
    ("missing-column", "table 'samples' lacks column(s) records"),
    ("bad-spec", "bad spec row: seeds"),
    ("bad-json-spec", "bad meta row 'spec'"),
    ("bad-sha", "image_sha256 '../../../../etc/passwd'"),
    ("bad-version", "schema version 7"),
])
def test_broken_run_databases_are_refused_clearly(tmp_path, spec, capsys, monkeypatch, damage, reason):
    run = make_run(tmp_path / "run", spec)
    db = run / "run.sqlite"
    if damage == "garbage":
        db.write_bytes(b"this is not sqlite" * 100)
    else:
        conn = sqlite3.connect(db)
        with conn:
            if damage == "other-schema":
                for table in ("meta", "prompts", "samples"):
                    conn.execute(f"DROP TABLE {table}")
                conn.execute("CREATE TABLE notes (text TEXT)")
            elif damage == "missing-table":
                conn.execute("DROP TABLE samples")
            elif damage == "missing-column":
                conn.execute("ALTER TABLE samples DROP COLUMN records")
            elif damage == "bad-spec":
                conn.execute("UPDATE meta SET value = ? WHERE name = 'spec'",
                             (json.dumps({"prompts": ["a cat"], "seeds": "many"}),))
            elif damage == "bad-json-spec":
                conn.execute("UPDATE meta SET value = '{nope' WHERE name = 'spec'")
            elif damage == "bad-sha":
                conn.execute("UPDATE samples SET image_sha256 = '../../../../etc/passwd' WHERE key = 'k0'")
            elif damage == "bad-version":
                conn.execute("UPDATE meta SET value = '7' WHERE name = 'schema_version'")
        conn.close()
    expected = f"{db.resolve()} is not a diffprobe run database"
    assert_user_error(cli(["export", run, "--out", tmp_path / "s.jsonl"], capsys, monkeypatch), expected, reason)
    for write in (False, True):
        with pytest.raises(InputError, match="is not a diffprobe run database") as err:
            with open_run(run, write=write) as store:
                store.samples()
        assert reason in str(err.value)
    with pytest.raises(InputError, match="is not a diffprobe run database"):
        load_image_set(run)


def test_new_refuses_a_run_that_another_process_writes(tmp_path, spec):
    run = make_run(tmp_path / "run", spec)
    writer = open_run(run, write=True)  # a second open file description: flock conflicts within one process too
    try:
        for new in (False, True):
            with pytest.raises(InputError, match="another process is writing to .*; wait for it to finish") as err:
                check_new_run_dir(run, new=new)
            assert "--new" not in str(err.value)
        with pytest.raises(InputError, match="another process is writing"):
            create_run(run, spec, new=True)
        writer.add([item("k3", 3, 60)])  # the writer carries on in place
    finally:
        writer.close()
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert rows(run) == 6
    with create_run(run, spec, new=True) as fresh:  # once the writer is gone, --new moves the run aside
        assert len(fresh) == 0 and fresh.moved_aside is not None
    assert rows(fresh.moved_aside) == 6


def test_new_refuses_a_generate_running_in_another_process(tmp_path, spec):
    run = make_run(tmp_path / "run", spec)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from diffprobe.store import open_run; "
         "s = open_run(sys.argv[1], write=True); print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match="another process is writing"):
            create_run(run, spec, new=True)
    finally:
        holder.kill()
        holder.wait()
    assert run.is_dir() and rows(run) == 5


def test_export_joins_per_image_scores_cached_features_and_verdicts(tmp_path, spec, capsys, monkeypatch):
    run = make_run(tmp_path / "run", spec)
    score_scs(run, MeanColor(), sensitivity=False)  # fills the run's feature cache
    (run / "scores").mkdir()
    (run / "scores" / "clip.json").write_text(json.dumps({"metric": "clip_score", "per_image": [
        {"key": "k0", "seed": 0, "score": 31.5}, {"key": "d1", "seed": 1, "score": 28.0}]}))
    (run / "scores" / "scs.json").write_text(json.dumps({"metric": "scs", "per_prompt": []}))  # no per-image values
    (run / "scores" / "broken.json").write_text("{not json")
    path, n, notes = export_run(run, "jsonl", tmp_path / "s.jsonl")
    assert n == 5 and len(notes) == 1 and "broken.json" in notes[0]
    exported = {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert exported["k0"]["scores"] == {"clip": 31.5} and exported["k1"]["scores"] == {"clip": None}
    assert exported["k0"]["features"] == [MeanColor().id]
    assert "verdicts" not in exported["k0"]

    with open_run(run, write=True) as store:  # a judge's table, keyed by sample key
        conn = store.connect()
        with conn:
            conn.execute("CREATE TABLE verdicts (key TEXT, judge TEXT, correct INTEGER, reason TEXT)")
            conn.execute("INSERT INTO verdicts VALUES ('k0', 'shapes', 1, 'one red cube')")
        conn.close()
    path, n, _ = export_run(run, "parquet", tmp_path / "s.parquet")
    table = pq.read_table(path).to_pydict()
    assert table["key"] == ["k0", "k1", "k2", "d0", "d1"] and n == 5
    by_key = {k: i for i, k in enumerate(table["key"])}
    assert table["scores.clip"][by_key["k0"]] == 31.5 and table["scores.clip"][by_key["k2"]] is None
    assert json.loads(table["verdicts"][by_key["k0"]]) == [{"judge": "shapes", "correct": 1, "reason": "one red cube"}]
    assert json.loads(table["verdicts"][by_key["k1"]]) == []
    assert table["image_missing"] == [False] * 5


def test_export_to_an_unwritable_place(tmp_path, spec, capsys, monkeypatch):
    run = make_run(tmp_path / "run", spec)
    (tmp_path / "file").write_text("x")
    assert_user_error(cli(["export", run, "--out", tmp_path / "file" / "s.jsonl"], capsys, monkeypatch),
                      f"cannot write {tmp_path / 'file' / 's.jsonl'}")


def test_image_features_must_be_finite(tmp_path, spec):
    run = make_run(tmp_path / "run", spec)

    class Broken(MeanColor):
        def _forward(self, pixels):
            return super()._forward(pixels) * float("nan")

    with pytest.raises(InputError, match="NaN or infinite"):
        score_scs(run, Broken(), cache=False, sensitivity=False)
    assert rows(run) == 5


def test_score_clip_keeps_per_image_scores_and_export_joins_them(tmp_path, spec, capsys, monkeypatch):
    from test_clipscore import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "tiny-clip")
    run = make_run(tmp_path / "run", spec)
    code, _, err = cli(["score", "clip", run, "--model", clip, "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads((run / "scores" / "clip.json").read_text())
    per_image = {row["key"]: row for row in result["per_image"]}
    assert set(per_image) == {"k0", "k1", "k2", "d0", "d1"}
    assert per_image["d1"]["seed"] == 1 and per_image["d1"]["prompt_id"] == "a dog"
    assert per_image["k0"]["file"].startswith("images/")
    for row in result["per_prompt"]:  # the per-prompt value is the mean of its images' scores
        mine = [r["score"] for r in result["per_image"] if r["prompt_id"] == row["prompt_id"]]
        assert row["clip_score"] == pytest.approx(sum(mine) / len(mine))

    code, _, err = cli(["export", run, "--out", tmp_path / "s.jsonl"], capsys, monkeypatch)
    assert code == 0, err
    exported = {r["key"]: r for r in map(json.loads, (tmp_path / "s.jsonl").read_text().splitlines())}
    assert {k: r["scores"]["clip"] for k, r in exported.items()} == pytest.approx(
        {k: row["score"] for k, row in per_image.items()})
    assert all(len(r["features"]) == 1 for r in exported.values())  # the CLIP features score clip cached
