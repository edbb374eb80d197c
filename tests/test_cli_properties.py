"""Property-based test over the command line's inputs: whatever a user types or feeds in, the CLI ends with exit code
0 or with a one-line error and exit code 2; never a traceback, and no file outside the example's folders changes.

Each example is one ``diffprobe`` call, driven in-process with typer's ``CliRunner`` against ``diffprobe.cli.app``:
``generate`` (flags or a ``--spec`` file) on the built-in shapes model at tiny settings, or ``export``,
``score irs`` and ``compare`` with hostile ``--out`` paths and input files. An unexpected exception is re-raised, so
hypothesis reports each distinct failure (exception type and the place it was raised) once.

    pytest tests/test_cli_properties.py                # bounded, about two minutes
    pytest tests/test_cli_properties.py -m slow        # many more examples, failures reported unshrunk
    DIFFPROBE_PROPERTY_CENSUS=failures.tsv pytest tests/test_cli_properties.py -m slow   # count failure classes
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import diffprobe.models
from diffprobe.cli import app
from diffprobe.errors import DiffprobeError, exit_on_user_error

REPO = Path(__file__).resolve().parents[1]
# With DIFFPROBE_PROPERTY_CENSUS=FILE each failure is appended to FILE (class, then arguments) instead of failing
# the test, so that one run counts every distinct failure class.
CENSUS = os.environ.get("DIFFPROBE_PROPERTY_CENSUS")


# --- inputs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    """An input file written into the example's folder; the argument is ``prefix`` + its path."""

    suffix: str
    content: bytes
    prefix: str = ""


@dataclass(frozen=True)
class Out:
    """An output path: ``new`` (a fresh path named ``name``), ``under_file`` (below an existing file), ``proc``
    (below /proc), ``existing_dir`` (a folder that holds a file) or ``existing_file``."""

    kind: str
    name: str = "out"


MARKUP = ["[/]", "[red]", "[bold red]x[/]", "[/red]", "[", "]", "\\", "[link=file:///etc]x[/link]", "[b]"]
ODD_CHARS = ["\x00", "\x1c", "\x85", "\u2028", "\r", "\t", "\x7f", "\u200b", "é", "²", "①", "٣", "\udcff", " "]

markup_text = st.lists(
    st.one_of(st.sampled_from(MARKUP), st.sampled_from(ODD_CHARS), st.text(max_size=6)), min_size=1, max_size=5
).map("".join)
user_text = st.one_of(st.text(max_size=20), markup_text, st.sampled_from(["x", "two red circles", "a [red] cube"]))

NUMBERS = ["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "-0", "0", "-1", "1", "2", "7", "8", "16", "1.5", "3.5",
           "²", "①", "٣", "１", "1_0", "0x10", " 2", "2 ", "", "1e3", "9" * 30, "9" * 5000, "-" + "9" * 30,
           "\udcff", "[/]", "16[red]"]
number_text = st.one_of(st.sampled_from(NUMBERS), st.integers(-3, 3).map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(repr))
# Steps, heights and widths that pass validation stay tiny, so an example that generates stays fast.
small_valid = {"--steps": ["1"], "--height": ["8", "16"], "--width": ["8", "16"], "--batch-size": ["1", "2", "9" * 30],
               "--max-model-batch": ["1", "3", "9" * 30], "--scale": ["0", "3.5", "-2", "1e30"]}

SEED_SPECS = ["0", "1", "0-1", "3,1", "²", "①", "٣", "0-٣", "1,²", "-1", "0--1", "1-0", "0,0", "scs100", "scs100:0",
              "scs100:1", "scs100:²", "scs100:" + "9" * 5000, "9" * 5000, "0-" + "9" * 5000, "9" * 30, str(2**63),
              "[/]", "[red]1", "\udcff", "", " ", "1 ,", "0-1,,2", "@", "@missing.txt", "@/proc/self/mem"]
seed_spec = st.one_of(st.sampled_from(SEED_SPECS), markup_text, st.integers(0, 3).map(str))


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# File contents that break naive readers: random bytes, control characters, huge cells, nesting.
HOSTILE_BYTES = [
    b"", b"\x00" * 64, b"\xff\xfe\x00x", b"\xc3\x28", "a\u2028b\x1cc\x85d\n".encode(), b"x\x00y\n", b"\x01\x02\n",
    b"a\r\nb\rc\n", "\ufeffa line\n".encode(), _nested(100_000), b'{"prompt": ' + _nested(100_000) + b"}",
    b"prompt\n" + b"a" * 200_000 + b"\n", b'prompt\n"' + b"a" * 200_000 + b'"\n', b"prompt,prompt\na,b\n",
    b"prompt,x,x\na,1,2\n", b"prompt\n\x00\n", b'{"prompt": "\\u0000"}\n', b'{"prompt": "a\\u2028b"}\n',
    b'[{"prompt": "a", "prompt": "b"}]', b'["a", ["b"], {"prompt": 1}]', b'[{"prompt": "x", "noun_phrases": 5}]',
    b'{"prompt": "x", "noun_phrases": [1, 2]}\n', b"prompt,noun_phrases\nx,5\n", b"1" * 5000, b'{"a": ' + b"1" * 5000
    + b"}", b"[1e400, NaN]", b'"just a string"', b"[/]\n[red]x\n", b"prompt\n[/]\n",
]
file_bytes = st.one_of(st.sampled_from(HOSTILE_BYTES), st.binary(max_size=64),
                       st.lists(user_text, max_size=3).map(lambda lines: "\n".join(lines).encode("utf-8", "replace")))
prompt_file = st.builds(File, st.sampled_from([".txt", ".csv", ".tsv", ".jsonl", ".json", ".yaml", ""]), file_bytes)

model_name = st.one_of(st.just("shapes"), st.just("shapes"), st.sampled_from(
    ["[/]", "mk[/]ok", "[red]x", "no-such-model", "a/b[red]", ".", "/", "/proc", "\udcff", "",
     "shapes[/]"]))

out_path = st.builds(Out, st.sampled_from(["new", "new", "under_file", "proc", "existing_dir", "existing_file"]),
                     st.one_of(st.just("out"), st.sampled_from(["mk[/]ok", "[red]r", "a\u2028b", "é", "x\\[y"])))

scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.integers(2**64, 2**70), st.floats(),
                   user_text, st.sampled_from(["0-1", "scs100:1", "cfg", "shapes", "nan", "ddim", "cpu", "fp32"]))
yaml_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
spec_mapping = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(model_name, st.fixed_dictionaries({"name": model_name}, optional={
            "family": yaml_value, "dtype": st.sampled_from(["fp32", "fp16", "x"]), "device": yaml_value}), yaml_value),
        "prompts": st.one_of(st.lists(user_text, min_size=1, max_size=2), user_text, yaml_value, st.just("[/]")),
        "seeds": st.one_of(seed_spec, st.lists(st.integers(0, 3), max_size=2), yaml_value),
        "sampler": st.one_of(st.fixed_dictionaries({"steps": st.sampled_from([1, 0, -1, "1", 1.5, None, "nan", True])},
                                                   optional={"height": st.sampled_from([8, 16, 7, "16", None, 1e400]),
                                                             "width": st.sampled_from([8, 16, 0, [16]]),
                                                             "scheduler": yaml_value}), yaml_value),
        "guidance": st.one_of(st.fixed_dictionaries({"name": st.sampled_from(["cfg", "scfg", "concept", "[/]", 1])},
                                                    optional={"scale": st.one_of(scalar, st.just(float("nan")))}),
                              yaml_value),
        "extra": yaml_value,
    },
)
spec_file = st.one_of(
    spec_mapping.map(lambda d: File(".yaml", yaml.safe_dump(d, allow_unicode=True).encode("utf-8", "surrogatepass"))),
    st.builds(File, st.just(".yaml"), file_bytes),
)


@st.composite
def generate_args(draw) -> list:
    """``generate`` with flags or a ``--spec`` file; always at one denoising step unless a bad value is drawn."""
    args: list = ["generate", "--quiet"]
    if draw(st.booleans()):
        args += ["--spec", draw(spec_file)]
    else:
        args += ["--model", draw(model_name)]
        # Only suite names that fail: a real suite (cc500: 622 prompts) would make an example take minutes.
        prompts = draw(st.one_of(st.lists(user_text, min_size=1, max_size=2), prompt_file, st.sampled_from(
            ["shapes-[/]", "[red]", "cc500[/]"])))
        if isinstance(prompts, list):
            for p in prompts:
                args += ["--prompt", p]
        else:
            args += ["--prompts", prompts]
        args += ["--seeds", draw(st.one_of(seed_spec, st.builds(File, st.just(".txt"), file_bytes, st.just("@"))))]
        args += ["--steps", draw(st.one_of(st.just("1"), number_text))]
        for flag in ("--height", "--width", "--scale", "--batch-size", "--max-model-batch"):
            if draw(st.booleans()):
                args += [flag, draw(st.one_of(st.sampled_from(small_valid[flag]), number_text))]
        for _ in range(draw(st.integers(0, 2))):
            key = draw(st.sampled_from(["scale", "rescale", "[/]", "", "x"]))
            args += ["--guidance-param", f"{key}={draw(st.one_of(number_text, user_text))}"]
        if draw(st.booleans()):
            args += ["--guidance", draw(st.sampled_from(["cfg", "[/]", "magic"]))]
    if draw(st.booleans()):
        args += ["--out", draw(out_path)]
    return args


@st.composite
def read_args(draw) -> list:
    """``export``, ``score irs`` and ``compare`` of prepared inputs, or of hostile files, into hostile outputs."""
    out = draw(out_path)
    command = draw(st.sampled_from(["export", "score", "compare"]))
    if command == "export":
        fmt = draw(st.sampled_from([[], ["--format", "jsonl"], ["--format", "parquet"], ["--format", "[/]"]]))
        return ["export", RUN, *fmt, "--out", out]
    if command == "score":
        return ["score", "irs", SNTH, "--train", TRAIN, "--device", "cpu", "--out", out]
    # Score JSON of the wrong shape is the compare reader's own matter; here compare's output path is tested.
    return ["compare", SCORES, SCORES, "--n-boot", "100", "--out", out]


# Placeholders for the prepared inputs (made once, see ``prepared``).
RUN, SNTH, TRAIN, SCORES = "<run>", "<snth.npy>", "<train.npy>", "<scores.json>"


# --- running one example ------------------------------------------------------------------------------------


_real_load_model = diffprobe.models.load_model


@functools.cache
def _shapes_model(**kwargs):
    return _real_load_model("shapes", **kwargs)


def _load_model(name, **kwargs):
    """The shapes model loads once per test session (loading dominates a one-step run); any other name loads
    for real, so its errors are the CLI's own."""
    if name == "shapes":
        return _shapes_model(**kwargs)
    return _real_load_model(name, **kwargs)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A finished run, IRS features and a score JSON for the read commands."""
    root = tmp_path_factory.mktemp("prepared")
    runner = CliRunner()
    res = runner.invoke(app, ["generate", "-p", "a red circle", "-p", "a blue square", "--seeds", "0-1", "--steps",
                              "1", "--out", str(root / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    rng = np.random.default_rng(0)
    np.save(root / "train.npy", rng.normal(size=(40, 4)).astype(np.float32))
    np.save(root / "snth.npy", rng.normal(size=(20, 4)).astype(np.float32))
    scores = {"metric": "scs", "embedder": {"id": "e"},
              "per_prompt": [{"prompt": f"p{i}", "scs": 50.0 + i} for i in range(6)]}
    (root / "scores.json").write_text(json.dumps(scores))
    return {RUN: root / "run", SNTH: root / "snth.npy", TRAIN: root / "train.npy", SCORES: root / "scores.json"}


def _materialise(args: list, work: Path, prepared: dict) -> list[str]:
    (work / "afile").write_text("a file\n")
    (work / "adir").mkdir()
    (work / "adir" / "keep.txt").write_text("keep\n")
    out = []
    for i, arg in enumerate(args):
        if isinstance(arg, File):
            path = work / f"in{i}{arg.suffix}"
            path.write_bytes(arg.content)
            arg = arg.prefix + str(path)
        elif isinstance(arg, Out):
            arg = str({"new": work / "out" / arg.name, "under_file": work / "afile" / arg.name,
                       "proc": Path("/proc/diffprobe-test") / arg.name, "existing_dir": work / "adir",
                       "existing_file": work / "afile"}[arg.kind])
        elif arg in prepared:
            arg = str(prepared[arg])
        out.append(arg)
    return out


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``roots`` with its size and modification time (caches and git internals left out)."""
    skip = {".git", ".hypothesis", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "runs"}
    files = {}
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in skip]
            for name in names:
                path = os.path.join(folder, name)
                st_ = os.lstat(path)
                files[path] = (st_.st_size, st_.st_mtime_ns)
    return files


def _printed_by_main(err: DiffprobeError) -> SimpleNamespace:
    """What ``diffprobe.cli.main`` does with a user error that leaves the app: print it and exit 2. Today the app
    prints its own; this keeps the census comparable on code from before (where only ``main`` printed them)."""

    def fail():
        raise err

    code, exception = 0, None
    with CliRunner().isolation() as (_, _, output):
        try:
            exit_on_user_error(fail)
        except SystemExit as exit_:
            code = exit_.code
        except Exception as exc:
            code, exception = 1, exc
        printed = output.getvalue().decode("utf-8", "replace")
    return SimpleNamespace(exit_code=code, exception=exception, output=printed)


def check_cli(args: list, prepared: dict, monkeypatch) -> None:
    with tempfile.TemporaryDirectory(prefix="diffprobe-prop-") as tmp:
        work, outside = Path(tmp) / "work", Path(tmp) / "outside"
        work.mkdir()
        outside.mkdir()
        (outside / "sentinel.txt").write_text("untouched\n")
        argv = _materialise(args, work, prepared)
        before = _snapshot(REPO, outside, *(Path(p).parent for p in prepared.values()))
        with monkeypatch.context() as m:
            m.chdir(work)  # default output paths (runs/..., compare.json) land in the example's folder
            m.setenv("DIFFPROBE_CACHE", str(work / "cache"))
            m.setenv("COLUMNS", "200")
            m.setattr(diffprobe.models, "load_model", _load_model)
            result = CliRunner().invoke(app, argv)
            if isinstance(result.exception, DiffprobeError):
                result = _printed_by_main(result.exception)
        try:
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception  # hypothesis tells failures apart by exception type and where it was raised
            assert result.exit_code in (0, 2), (argv, result.output)
            assert "Traceback" not in result.output, (argv, result.output)
            after = _snapshot(REPO, outside, *(Path(p).parent for p in prepared.values()))
            changed = sorted(p for p in before.keys() | after.keys()
                             if before.get(p) != after.get(p) and not p.startswith(str(prepared[RUN])))
            assert not changed, (argv, changed)
        except Exception as exc:
            if not CENSUS:
                raise
            with open(CENSUS, "a") as f:
                f.write(f"{failure_class(exc)}\t{ascii(argv)[:300]}\n")


def failure_class(exc: BaseException) -> str:
    """Exception type and the place it was raised (file:line of the innermost frame), as hypothesis counts them."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"


cli_args = st.one_of(generate_args(), generate_args(), read_args())
COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                      HealthCheck.data_too_large]}


@settings(max_examples=60, **COMMON)
@given(args=cli_args)
def test_cli_inputs_end_in_exit_0_or_2(args, prepared, monkeypatch):
    check_cli(args, prepared, monkeypatch)


@pytest.mark.slow
# Many examples, each distinct failure reported as found (no time spent shrinking it): a census of failure classes.
@settings(max_examples=400, phases=[Phase.explicit, Phase.reuse, Phase.generate], **COMMON)
@given(args=cli_args)
def test_cli_inputs_end_in_exit_0_or_2_many(args, prepared, monkeypatch):
    check_cli(args, prepared, monkeypatch)
