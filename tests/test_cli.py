"""The generate/export commands end to end, and the one-line errors (exit code 2) users will hit."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from diffprobe.cli import main
from diffprobe.store import open_run

SIZE = ["--height", "16", "--width", "16", "--steps", "2"]


def cli(args, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setenv("COLUMNS", "400")  # long messages must stay one line even in narrow terminals
    monkeypatch.setattr(sys, "argv", ["diffprobe", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_user_error(result, *fragments):
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    # one line, last, no traceback (notes printed earlier may precede it)
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error") for line in lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[-1], err


def test_generate_export_and_rerun(tiny_sd_path, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red cube", "count": 1}\n{"prompt": "a red cube"}\n')
    args = ["generate", "--model", tiny_sd_path, "--prompts", prompts, "--seeds", "3,5", *SIZE, "--out", run, "-q"]
    code, out, err = cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert out.strip() == str(run)
    assert "1 repeated prompt(s)" in err and "2 generated" in err and "images/s" in err
    code, out, err = cli(args, capsys, monkeypatch)
    assert code == 0 and "0 generated, 2 already there" in err
    with open_run(run) as store:
        samples = store.samples()
        assert [(s.prompt, s.seed) for s in samples] == [("a red cube", 3), ("a red cube", 5)]
        assert samples[0].prompt_meta == {"count": 1} and samples[0].guidance["scale"] == 7.5
        assert store.spec.prompt_source == str(prompts)

    code, out, _ = cli(["export", run, "--format", "parquet"], capsys, monkeypatch)
    assert code == 0 and "2 samples" in out
    table = pq.read_table(run / "samples.parquet").to_pydict()
    assert table["seed"] == [3, 5] and table["provenance.sampler.height"] == [16, 16]
    code, _, _ = cli(["export", run, "--out", tmp_path / "x.jsonl"], capsys, monkeypatch)
    rows = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert [r["image_sha256"] for r in rows] == [s.image_sha256 for s in samples]
    assert_user_error(cli(["export", run, "--format", "csv"], capsys, monkeypatch), "unknown export format 'csv'")
    assert_user_error(cli(["export", tmp_path], capsys, monkeypatch), "not a diffprobe run directory")

    # a different spec for the same directory is refused, and --new starts afresh
    other = [*args[:-1], "--scale", "3", "-q"]
    assert_user_error(cli(other, capsys, monkeypatch), "guidance.scale: 7.5 (run) != 3.0 (now)", "--new")
    code, _, err = cli([*other, "--new"], capsys, monkeypatch)
    assert code == 0, err
    assert f"moved the previous contents of {run} to {run}.old-" in err
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]) == 1
    with open_run(run) as store:
        assert {s.guidance["scale"] for s in store.samples()} == {3.0}


def test_long_prompt_is_warned_and_recorded(tiny_sd_path, tmp_path, capsys, monkeypatch):
    long = "a cat " * 30  # the tiny tokenizer spells out words: far over 77 tokens
    code, _, err = cli(["generate", "--model", tiny_sd_path, "-p", long, *SIZE, "--out", tmp_path / "r", "-q"],
                       capsys, monkeypatch)
    assert code == 0, err
    assert "truncated" in err and "77 tokens" in err
    with open_run(tmp_path / "r") as store:
        assert [s.truncated for s in store.samples()] == [True]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "no-such-model", "-p", "x"], ["model 'no-such-model' not found", "local folder"]),
        (["-p", "x", "--seeds", "9-2"], ["bad seed range '9-2'"]),
        (["-p", "x", "--seeds", "0-3,3"], ["seed 3 is listed twice"]),
        (["-p", "x", "--seeds", "zero"], ["unknown seed list 'zero'"]),
        ([], ["no prompts"]),
        (["--prompts", "missing.txt"], ["missing.txt does not exist"]),
        (["-p", "x", "--guidance", "magic"], ["unknown guidance 'magic'"]),
        (["-p", "x", "--guidance-param", "novalue"], ["bad --guidance-param 'novalue'"]),
        (["-p", "x", "--steps", "0"], ["bad value 0 for --steps", "greater than or equal to 1"]),
        (["-p", "x", "--batch-size", "0"], ["--batch-size must be at least 1"]),
        (["-p", "x", "--max-model-batch", "0"], ["--max-model-batch must be at least 1"]),
        (["-p", "x", "--generator-device", "tpu"], ["bad value 'tpu' for --generator-device"]),
        (["-p", "x", "--concepts", "suite"], ["needs prompts with reference noun phrases"]),
    ],
)
def test_user_errors_before_loading(args, fragments, tmp_path, capsys, monkeypatch):
    assert_user_error(cli(["generate", *args, "--out", tmp_path / "r"], capsys, monkeypatch), *fragments)


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.txt", "\n\n", "holds no prompts"),
        ("bad.csv", "text\nhello\n", "no 'prompt' column"),
        ("bad.jsonl", '{"prompt": "a"}\nnot json\n', "bad.jsonl line 2: invalid JSON"),
    ],
)
def test_bad_prompt_files(name, content, fragment, tmp_path, capsys, monkeypatch):
    f = tmp_path / name
    f.write_text(content)
    assert_user_error(cli(["generate", "--prompts", f, "--out", tmp_path / "r"], capsys, monkeypatch), fragment)


def test_size_not_divisible(tiny_sd, tiny_sd_path, tmp_path, capsys, monkeypatch):
    result = cli(["generate", "--model", tiny_sd_path, "-p", "x", "--height", "12", "--width", "16",
                  "--out", tmp_path / "r"], capsys, monkeypatch)
    multiple = tiny_sd.vae_scale_factor * tiny_sd.denoiser_factor
    assert_user_error(result, f"multiples of {multiple} for this model (got 12x16)")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_generator_without_cuda(tmp_path, capsys, monkeypatch):
    result = cli(["generate", "-p", "x", "--generator-device", "cuda", "--out", tmp_path / "r"], capsys, monkeypatch)
    assert_user_error(result, "--generator-device cuda needs a CUDA device")


def test_spec_file(tiny_sd_path, tmp_path, capsys, monkeypatch):
    f = tmp_path / "run.yaml"
    f.write_text(f"model: {tiny_sd_path}\nprompts: [a red cube]\nseeds: 4-5\n"
                 "sampler: {steps: 2, height: 16, width: 16}\nguidance: {name: cfg, scale: 3}\n")
    code, _, err = cli(["generate", "--spec", f, "--out", tmp_path / "r", "-q"], capsys, monkeypatch)
    assert code == 0, err
    with open_run(tmp_path / "r") as store:
        assert [(s.seed, s.guidance["scale"], s.width) for s in store.samples()] == [(4, 3.0, 16), (5, 3.0, 16)]
    assert_user_error(cli(["generate", "--spec", f, "--seeds", "1", "--scale", "2", "--out", tmp_path / "r"],
                          capsys, monkeypatch), "--spec cannot be combined with --seeds, --scale")


def test_not_a_checkpoint_folder(tmp_path, capsys, monkeypatch):
    assert_user_error(cli(["generate", "--model", tmp_path, "-p", "x", "--out", tmp_path / "r"], capsys, monkeypatch),
                      "not a diffusers checkpoint folder")


def test_hub_model_missing_offline(tmp_path):
    """A hub id that is not cached, with HF_HUB_OFFLINE=1: one line that says how to get the weights."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "diffprobe.cli", "generate", "--model", "someone/some-model",
                           "-p", "x", "--out", str(tmp_path / "r")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "someone/some-model" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0] and "local folder" in lines[0]


@pytest.mark.parametrize("seeds", ["[/]", "1[red]"])
def test_error_messages_print_user_text_as_typed(seeds, tmp_path, capsys, monkeypatch):
    """Rich markup in user text crashed the error printer ('[/]') or vanished ('[red]')."""
    assert_user_error(cli(["generate", "-p", "x", "--seeds", seeds, "--out", tmp_path / "r"], capsys, monkeypatch),
                      f"bad seed {seeds!r}")


def test_run_names_with_markup_are_printed_as_typed(tmp_path, capsys, monkeypatch):
    run = tmp_path / "mk[/]ok[red]"
    code, out, err = cli(["generate", "-p", "a red circle", "--steps", "1", "--out", run, "-q"], capsys, monkeypatch)
    assert code == 0, err
    assert f"1 images in {run}" in err and out.strip() == str(run)
    code, out, err = cli(["export", run], capsys, monkeypatch)
    assert code == 0 and f"1 samples -> {run / 'samples.jsonl'}" in out


@pytest.mark.parametrize("flag, value, fragment", [
    ("--scale", "nan", "guidance parameter 'scale' must be a finite number (got nan)"),
    ("--scale", "inf", "must be a finite number (got inf)"),
    ("--scale", "1e400", "must be a finite number (got inf)"),
    ("--guidance-param", "scale=NaN", "must be a finite number (got nan)"),
    ("--guidance-param", "scale=" + "9" * 5000, "bad --guidance-param 'scale'"),
    ("--height", "1000000000", "bad value 1000000000 for --height"),
    ("--width", "4", "bad value 4 for --width"),
    ("--steps", "-1", "bad value -1 for --steps"),
])
def test_numeric_options_are_validated_before_any_work(flag, value, fragment, tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    assert_user_error(cli(["generate", "-p", "x", flag, value, "--out", run], capsys, monkeypatch), fragment)
    assert not run.exists()


def test_undecodable_argument_bytes(tmp_path, capsys, monkeypatch):
    bad = os.fsdecode(b"caf\xe9")  # what Python makes of a non-UTF-8 argv byte: a surrogate escape
    assert_user_error(cli(["generate", "-p", bad, "--out", tmp_path / "r"], capsys, monkeypatch),
                      "argument 'caf\\udce9' is not valid UTF-8 text")


@pytest.fixture
def finished_run(tmp_path_factory):
    from typer.testing import CliRunner

    from diffprobe.cli import app

    run = tmp_path_factory.mktemp("finished") / "run"
    res = CliRunner().invoke(app, ["generate", "-p", "a red circle", "--steps", "1", "--out", str(run), "-q"])
    assert res.exit_code == 0, res.output
    return run


@pytest.mark.parametrize("where", ["under_file", "proc", "existing_dir"])
def test_unwritable_out_paths(where, finished_run, tmp_path, capsys, monkeypatch):
    import numpy as np

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    out = {"under_file": tmp_path / "afile" / "o.jsonl", "proc": "/proc/diffprobe-test/o.jsonl",
           "existing_dir": tmp_path / "adir"}[where]
    reason = {"under_file": "is not a directory", "proc": "No such file or directory",
              "existing_dir": "it is a directory"}[where]
    np.save(tmp_path / "f.npy", np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps({"metric": "scs", "per_prompt": [{"prompt": f"p{i}", "scs": i} for i in range(6)]}))
    for args in (["export", finished_run], ["score", "irs", tmp_path / "f.npy", "--train", tmp_path / "f.npy"],
                 ["compare", scores, scores, "--n-boot", "100"]):
        assert_user_error(cli([*args, "--out", out], capsys, monkeypatch), f"cannot write {out} (", reason)
    if where != "existing_dir":  # an existing folder is where a run may go
        assert_user_error(cli(["generate", "-p", "x", "--out", out], capsys, monkeypatch), f"cannot write {out} (")


def test_cli_lists_the_commands_that_exist():
    from diffprobe.cli import COMMANDS, app

    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == {"generate", "export", "doctor", "score", "compare", "judge", "seeds", "audit", "report", "train",
                     "sample"}
    assert all(callable(module.register) for module in COMMANDS)


def test_score_commands_share_their_options():
    from typer.testing import CliRunner

    from diffprobe.cli import app

    helps = {m: CliRunner().invoke(app, ["score", m, "--help"], env={"COLUMNS": "300"}).output
             for m in ("scs", "irs", "clip")}
    for shared in ("--device", "--batch-size", "--strict", "--guidance", "--no-cache", "--cache-dir", "--out"):
        assert all(shared in h for h in helps.values()), shared
    assert all("Do not read or write the feature cache." in h for h in helps.values())


def test_an_interrupted_command_says_what_is_kept_and_exits_130():
    """Every long command wraps its work in ``resumable``: Ctrl-C prints where the finished part is and how to go on,
    with exit code 130 and no traceback; other errors pass through unchanged."""
    from io import StringIO

    from rich.console import Console

    from diffprobe.console import resumable

    out = StringIO()
    console = Console(file=out, width=200)
    with pytest.raises(SystemExit) as stopped, resumable(console, "finished images are kept in runs/[red]x"):
        raise KeyboardInterrupt
    assert stopped.value.code == 130
    assert out.getvalue().strip() == ("interrupted: finished images are kept in runs/[red]x; run the same command "
                                      "to resume")
    with pytest.raises(ValueError, match="boom"), resumable(console, "nothing"):
        raise ValueError("boom")
    with resumable(console, "nothing"):
        pass
    assert out.getvalue().count("interrupted") == 1
