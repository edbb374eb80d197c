"""The writer repairs a run and says what it did; --repair regenerates rows whose image is missing; a full disk
keeps every finished image and tells how to resume."""

from __future__ import annotations

import errno
from io import StringIO

from rich.console import Console
from test_cli import SIZE, assert_user_error, cli
from test_generate import make_spec

from diffprobe.generate import generate
from diffprobe.store import RunStore, open_run


def test_missing_image_is_kept_and_reported_until_repair(tiny_sd, tiny_sd_path, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    spec = make_spec(tiny_sd_path, prompts=("a red cube",), seeds=(0, 1))
    assert generate(spec, run, adapter=tiny_sd, progress=False).generated == 2
    with open_run(run) as store:
        gone = store.samples()[1]
    gone.image_path.unlink()
    orphan = run / "images" / "cd" / ("cd" + "0" * 62 + ".png")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"png without row")

    out = StringIO()
    again = generate(spec, run, adapter=tiny_sd, console=Console(file=out, width=400), progress=False)
    assert (again.generated, again.skipped) == (0, 2)
    assert again.repair.missing_rows == [gone.key] and not again.repair.dropped
    assert "removed 1 image(s) without a row" in out.getvalue()
    assert "kept 1 row(s) whose image file is missing (pass --repair" in out.getvalue()
    assert not orphan.exists()
    with open_run(run) as store:
        assert len(store) == 2 and store.check().missing == [gone.key]

    args = ["generate", "--model", tiny_sd_path, "--device", "cpu", "-p", "a red cube", "--seeds", "0,1", *SIZE,
            "--scale", "5", "--out", run, "-q", "--repair"]
    code, _, err = cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "dropped 1 row(s) whose image file was missing" in err and "1 generated at" in err
    assert "1 already there; 2 images" in err
    with open_run(run) as store:
        assert len(store) == 2 and store.verify() == [] and not store.check()
        assert {s.key: s.image_sha256 for s in store.samples()}[gone.key] == gone.image_sha256


def test_disk_full_keeps_finished_images_and_says_how_to_resume(tiny_sd_path, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_write = RunStore._write_image
    calls = []

    def full_after_two(self, image):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, image)

    monkeypatch.setattr(RunStore, "_write_image", full_after_two)
    args = ["generate", "--model", tiny_sd_path, "--device", "cpu", "-p", "a red cube", "--seeds", "0-3", *SIZE,
            "--batch-size", "1", "--out", run, "-q"]
    assert_user_error(cli(args, capsys, monkeypatch), f"cannot write to {run.resolve()} (No space left on device)",
                      "2 image(s) are kept there", "run the same command to resume")
    with open_run(run) as store:
        assert len(store) == 2 and store.verify() == []

    monkeypatch.setattr(RunStore, "_write_image", real_write)
    code, _, err = cli(args, capsys, monkeypatch)
    assert code == 0 and "2 generated at" in err and "2 already there; 4 images" in err, err
