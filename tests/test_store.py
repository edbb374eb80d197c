import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffprobe.errors import InputError, RunMismatchError
from diffprobe.spec import GuidanceSpec, RunSpec, SamplerSpec
from diffprobe.store import NewSample, create_run, is_run_dir, open_run


def image(value: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, np.uint8))


def png_sha(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def item(key: str, seed: int, value: int, prompt: str = "a cat") -> NewSample:
    return NewSample(key=key, prompt=prompt, seed=seed, image=image(value), guidance={"name": "cfg", "scale": 7.5},
                     provenance={"model": {"model": "m", "family": "sd"}, "sampler": {"steps": 4}, "tags": [1, 2]},
                     records={"concepts": ["a cat"]}, truncated=seed == 1)


@pytest.fixture
def spec():
    return RunSpec(prompts=["a cat", "a dog"], seeds=[0, 1, 2], sampler=SamplerSpec(steps=4))


def test_roundtrip_and_layout(tmp_path, spec):
    run = tmp_path / "run"
    with create_run(run, spec) as store:
        store.add_prompts([("a cat", {"nouns": ["cat"]})])
        store.add([item("k0", 0, 10), item("k1", 1, 20)])
    assert is_run_dir(run) and not is_run_dir(tmp_path)
    with open_run(run) as store:
        assert store.spec == spec
        assert store.keys() == {"k0", "k1"} and len(store) == 2 and "k0" in store and "zz" not in store
        s0, s1 = store.samples()
        assert (s0.key, s0.prompt, s0.seed, s0.truncated, s1.truncated) == ("k0", "a cat", 0, False, True)
        assert s0.image_sha256 == png_sha(image(10))
        assert s0.image_path == (run / "images" / s0.image_sha256[:2] / f"{s0.image_sha256}.png").resolve()
        assert s0.image_path.is_absolute()
        assert hashlib.sha256(s0.image_path.read_bytes()).hexdigest() == s0.image_sha256
        assert np.array_equal(np.asarray(s0.image()), np.asarray(image(10)))
        assert s0.provenance["tags"] == [1, 2] and s0.records == {"concepts": ["a cat"]}
        assert s0.prompt_meta == {"nouns": ["cat"]} and (s0.width, s0.height) == (8, 8)
        assert store.verify() == []
        conn = store.connect()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


def test_identical_images_share_one_file(tmp_path, spec):
    with create_run(tmp_path / "run", spec) as store:
        store.add([item("k0", 0, 10), item("k1", 1, 10)])
        a, b = store.samples()
        assert a.image_path == b.image_path
    assert len(list((tmp_path / "run" / "images").glob("*/*.png"))) == 1


def test_readers_report_and_writers_repair(tmp_path, spec):
    run = tmp_path / "run"
    with create_run(run, spec) as store:
        store.add([item("k0", 0, 10), item("k1", 1, 20), item("k2", 2, 30)])
        gone = store.samples()[1]
    # what a killed writer or a user can leave behind
    gone.image_path.unlink()
    tmp = run / "images" / "ab" / ".abcd.123.tmp"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_bytes(b"half a png")
    orphan = run / "images" / "cd" / ("cd" + "0" * 62 + ".png")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"png without row")
    with open_run(run) as reader:  # a reader reports and changes nothing
        check = reader.check()
        assert check.missing == ["k1"] and sorted(check.extra) == sorted([tmp.resolve(), orphan.resolve()])
        assert str(check) == "1 image file(s) missing, 2 extra file(s)" and "--repair" in check.note()
        assert reader.keys() == {"k0", "k1", "k2"}
    assert tmp.exists() and orphan.exists()
    with open_run(run, write=True) as writer:  # the writer removes leftovers and keeps the row, saying so
        report = writer.repair()
        assert (report.temp_files, report.orphan_images, report.missing_rows, report.dropped) == (1, 1, ["k1"], False)
        assert "kept 1 row(s) whose image file is missing" in str(report)
        assert writer.keys() == {"k0", "k1", "k2"}
        dropped = writer.repair(drop_missing=True)
        assert dropped.dropped and "dropped 1 row(s)" in str(dropped) and writer.keys() == {"k0", "k2"}
        assert not writer.repair()
    assert not tmp.exists() and not orphan.exists()


def test_one_writer_and_readers_do_not_clean_up_under_it(tmp_path, spec):
    run = tmp_path / "run"
    writer = create_run(run, spec)
    writer.add([item("k0", 0, 10)])
    # a file the writer has just renamed into place but not inserted yet
    pending = run / "images" / "ef" / ("ef" + "1" * 62 + ".png")
    pending.parent.mkdir(exist_ok=True)
    pending.write_bytes(b"fresh")
    with pytest.raises(InputError, match="another process is writing"):
        open_run(run, write=True)
    with open_run(run) as reader:
        assert reader.keys() == {"k0"} and reader.check().extra == [pending.resolve()]
        with pytest.raises(RuntimeError, match="read-only"):
            reader.add([item("k1", 1, 20)])
        with pytest.raises(RuntimeError, match="read-only"):
            reader.repair()
    assert pending.exists()
    writer.close()
    with open_run(run, write=True) as store:
        assert store.repair().orphan_images == 1
    assert not pending.exists()


def test_open_refuses_non_runs(tmp_path, spec):
    with pytest.raises(InputError, match="not a diffprobe run directory"):
        open_run(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(RunMismatchError, match="exists and is not empty"):
        create_run(tmp_path / "x", spec)


def test_new_moves_the_old_run_aside(tmp_path, spec):
    run = tmp_path / "run"
    with create_run(run, spec) as store:
        store.add([item("k0", 0, 10)])
    with create_run(run, spec, new=True) as store:
        assert len(store) == 0
        moved = store.moved_aside
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and moved == aside[0].resolve()
    with open_run(aside[0]) as old:
        assert old.keys() == {"k0"}


def test_check_spec(tmp_path, spec):
    with create_run(tmp_path / "run", spec) as store:
        store.check_spec(spec)  # same spec: fine
        other = spec.model_copy(update={"guidance": GuidanceSpec(params={"scale": 3.0})})
        with pytest.raises(RunMismatchError, match=r"guidance.params.scale: 7.5 \(run\) != 3.0 \(now\).*--new"):
            store.check_spec(other)
        more = spec.model_copy(update={"seeds": [0, 1, 2, 3, 4], "prompts": ["a bird", "a cat"]})
        with pytest.raises(RunMismatchError, match=r"1 new prompt\(s\), 2 new seed\(s\).*--extend"):
            store.check_spec(more)
        store.check_spec(more, extend=True)
        assert store.spec.seeds == [0, 1, 2, 3, 4] and store.spec.prompts == ["a cat", "a dog", "a bird"]
        fewer = spec.model_copy(update={"seeds": [0]})
        store.check_spec(fewer)  # a subset of the run is fine


def test_check_config(tmp_path, spec):
    config = {"model": {"model": "m", "weights_sha256": "aa"}, "sampler": {"dtype": "float32"}}
    with create_run(tmp_path / "run", spec) as store:
        store.check_config(config)
        store.check_config(json.loads(json.dumps(config)))
        with pytest.raises(RunMismatchError, match=r"model.weights_sha256: 'aa' \(run\) != 'bb' \(now\)"):
            store.check_config({**config, "model": {"model": "m", "weights_sha256": "bb"}})


def test_export_jsonl_and_parquet(tmp_path, spec):
    run = tmp_path / "run"
    with create_run(run, spec) as store:
        store.add([item("k0", 0, 10), item("k1", 1, 20, prompt="a dog")])
        assert store.export_jsonl(tmp_path / "s.jsonl") == 2
        assert store.export_parquet(tmp_path / "s.parquet") == 2
        samples = store.samples()
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["k0", "k1"]
    assert rows[0]["provenance"]["model"] == {"model": "m", "family": "sd"}
    assert rows[1]["image_path"] == str(samples[1].image_path) and rows[1]["truncated"] is True
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names[:4] == ["key", "prompt", "seed", "image_path"]
    cols = table.to_pydict()
    assert cols["provenance.model.model"] == ["m", "m"]
    assert cols["provenance.sampler.steps"] == [4, 4]
    assert cols["guidance.scale"] == [7.5, 7.5]
    assert cols["provenance.tags"] == ["[1, 2]", "[1, 2]"]  # lists become JSON text
    assert cols["seed"] == [0, 1] and cols["truncated"] == [False, True]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_files_are_complete_before_rows(tmp_path, spec, monkeypatch):
    """If writing a file fails, no row for it exists and nothing half-written stays behind."""
    run = tmp_path / "run"
    store = create_run(run, spec)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.add([item("k0", 0, 10), item("k1", 1, 20)])
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(store) == 0
    store.close()
    with open_run(run, write=True) as reopened:
        assert len(reopened) == 0
        report = reopened.repair()
        assert report.temp_files == 1 and report.orphan_images == 1
    assert list((run / "images").glob("*/*")) == []
