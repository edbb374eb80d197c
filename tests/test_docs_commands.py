"""Every command in README.md and docs/*.md runs as written.

The shell commands of the fenced ```bash blocks run in document order in one temporary folder per document (later
commands read what earlier ones wrote); ``diffprobe`` commands go through the CLI in process. To keep the suite
fast, a fixed list of substitutions caps seeds and steps and moves ``--out`` into the temporary folder; each
command prints what ran. Commands that need a hub model, a GPU, the network or a fresh virtual environment are
listed in SKIPPED with the reason; any other command must run, so a new command in the docs is either run here or
listed. The ```python blocks run unchanged.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

HUB = "a hub model: a multi-GB download, and a GPU to run in reasonable time"
SKIPPED = {
    "make demo": "creates .venv and installs with pip (network); tests/test_audit.py runs a smaller audit",
    "diffprobe audit examples/audit-shapes.yaml --out runs/demo-audit": "the demo audit takes minutes; "
    "tests/test_audit.py runs a tiny one",
    "diffprobe report runs/demo-audit": "needs the demo audit; tests/test_report.py and test_report_browser.py "
    "make reports",
    "make test": "runs this test suite",
    "python3 -m venv .venv && . .venv/bin/activate": "creates a virtual environment",
    "pip install torch==2.13.0": "downloads from PyPI",
    "pip install -e '.[all,dev]'": "downloads from PyPI",
    "diffprobe generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts scs100 --seeds scs100:20 "
    "--steps 50 --scheduler dpmpp-2m --guidance scfg --scale 7.5 --out runs/sd15-scfg": HUB,
    "diffprobe score clip runs/base": "needs CLIP weights from the hub (tests/test_clipscore.py scores with a tiny "
    "local CLIP)",
    "diffprobe generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts cc500 --guidance concept": HUB,
    "diffprobe generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts cc500 --guidance concept "
    "--concepts suite": HUB,
    "diffprobe generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts prompts.txt --guidance concept "
    "--concepts 'a red book; a gold clock'": HUB,
    "diffprobe generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts prompts.txt --guidance concept "
    "--guidance-param mode=head": HUB,
}
SHELL = ("printf",)  # plain shell commands the docs use to make their inputs; run by bash

# The substitutions, applied to `diffprobe generate` (seeds, steps, suites) and to every command (--out):
SEEDS = "0-1"  # the fewest seeds SCS can score (2 images per prompt)
STEPS = "2"  # --steps N -> 2, and --steps 2 added where the command leaves the model's default
SUITE_PROMPTS = 2  # --prompts <built-in suite> -> a prompt file of the suite's first 2 distinct prompts


def _user_data(folder: Path) -> None:
    """The folders README's IRS example names as the user's own data: rendered shapes-world scenes (the shapes
    model's training distribution) stand in for training images and held-out real images."""
    from diffprobe.worlds import shapes

    for name, start in (("train_images", 0), ("test_images", 1000)):
        (folder / name).mkdir()
        for i in range(start, start + 8):
            scene, _ = shapes.training_example(i)
            shapes.render(scene).save(folder / name / f"{i}.png")


def bash_commands(doc: Path) -> list[tuple[str, str]]:
    """(command, line) for the ```bash blocks of ``doc``: ``line`` as written (continuations joined), ``command``
    its words re-quoted, without the comment (what SKIPPED names)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", doc.read_text(), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if words := shlex.split(line, comments=True):
                commands.append((shlex.join(words).replace("'&&'", "&&"), line))
    return commands


def python_blocks(doc: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", doc.read_text(), flags=re.S | re.M)


def _suite_excerpt(name: str, folder: Path) -> str:
    from diffprobe.prompts import load_prompts, unique

    kept, _ = unique(load_prompts(name))
    path = folder / f"{name}-first-{SUITE_PROMPTS}.txt"
    path.write_text("".join(f"{p.text}\n" for p in kept[:SUITE_PROMPTS]))
    return str(path)


def _capped(words: list[str], folder: Path) -> list[str]:
    """``words`` with the substitutions above applied."""
    generate = words[:2] == ["diffprobe", "generate"]
    out, i = [], 0
    while i < len(words):
        word, value = words[i], words[i + 1] if i + 1 < len(words) else None
        if word == "--out":
            value = str(folder / value)
        elif generate and word == "--seeds":
            value = SEEDS
        elif generate and word == "--steps":
            value = STEPS
        elif generate and word == "--prompts" and not (folder / value).exists():
            value = _suite_excerpt(value, folder)
        else:
            out.append(word)
            i += 1
            continue
        out += [word, value]
        i += 2
    if generate and "--steps" not in words:
        out += ["--steps", STEPS]
    return out


def _documents_with(blocks) -> list[Path]:
    return [doc for doc in DOCS if blocks(doc)]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    _user_data(tmp_path)
    return tmp_path


def _readme_results(folder: Path) -> None:
    """README's Use block leaves the runs, scores and comparison its text describes."""
    import json

    compared = json.loads((folder / "compare.json").read_text())
    assert compared["n_pairs"] == 3  # the three prompts of prompts.txt
    assert any("cannot reach p < 0.05" in w for w in compared["warnings"])
    assert json.loads((folder / "runs" / "base" / "scores" / "irs.json").read_text())["metric"] == "irs"


CHECKS = {"README.md": _readme_results}


@pytest.mark.parametrize("doc", _documents_with(bash_commands), ids=lambda d: d.name)
def test_shell_commands_run_as_written(doc, workdir):
    from diffprobe.cli import app

    ran = 0
    for command, line in bash_commands(doc):
        if command in SKIPPED:
            print(f"skipped by design: {command}\n  because: {SKIPPED[command]}")
            continue
        words = shlex.split(command)
        if words[0] in SHELL:
            print(f"ran: {line}")
            subprocess.run(["bash", "-c", line], cwd=workdir, check=True)
        elif words[0] == "diffprobe":
            argv = _capped(words, workdir)
            print(f"ran: {command}\n  as: {shlex.join(argv)}")
            res = CliRunner().invoke(app, argv[1:])
            assert res.exit_code == 0, f"{command}\n{res.output}\n{res.exception!r}"
        else:
            pytest.fail(f"{doc.name}: {command!r} is neither run by this test nor listed in SKIPPED with a reason")
        ran += 1
    assert ran > 0
    CHECKS.get(doc.name, lambda folder: None)(workdir)


@pytest.mark.parametrize(
    ("doc", "index"),
    [(doc, i) for doc in _documents_with(python_blocks) for i in range(len(python_blocks(doc)))],
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_python_snippets_run_as_written(doc, index, workdir):
    exec(compile(python_blocks(doc)[index], f"{doc.name}[python {index}]", "exec"), {})


def test_every_skipped_command_is_still_in_the_docs():
    documented = {command for doc in DOCS for command, _ in bash_commands(doc)}
    assert set(SKIPPED) <= documented, sorted(set(SKIPPED) - documented)
