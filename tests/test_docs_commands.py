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

FMNIST = ("needs the dataset-fashion-mnist Debian package and about 10 CPU-minutes (tests/test_fd.py runs the study "
          "on small folders and on features with a planted truth)")
HUB = "a hub model: a multi-GB download, and a GPU to run in reasonable time"
VLM_SERVER = "a vision-language model server (vLLM or Ollama) with its weights and a GPU"
VLM_JUDGE = ("needs that server and a run of a hub model (tests/test_vlm_judge.py runs the same flags against a "
             "loopback OpenAI-compatible server)")
DETECTOR = ("a hub detector and runs of a hub model (tests/test_detector_judge.py runs the same command with a tiny "
            "local detector)")
SD21 = HUB + ", the user's copy of Comp90 and a VLM server (tests/test_seeds.py mines with the same code)"
SEEDS_EXPERIMENT = ("the whole reliable-seeds experiment: about 40 processes and fine-tunes, CPU-hours at the "
                    "full size and minutes even at the smoke size (its commands are each run by the seeds section)")
PARTIAL_EXPERIMENT = ("the partial-captions experiment: two continuations of the shipped model and about 40 "
                      "audit arms, CPU-hours at the full size and minutes even at the smoke size (tests/"
                      "test_partial_captions.py tests the option, the trainer's resume and the decision rule)")
DIADM_EXPERIMENT = ("the DiADM experiment: three trainings and thousands of sampled images, about 45 CPU-minutes at "
                    "the full size and minutes at the smoke size (tests/test_diadm.py trains, samples and resumes "
                    "tiny models; docs/diadm.md's toy commands run here)")
SKIPPED = {
    "OMP_NUM_THREADS=2 python examples/partial_captions.py --out results/partial_captions --fractions 0.5 --steps 340 "
    "--ema 0.99 --checkpoint-every 50 --sampler-steps 10 --quality-prompts 40 --quality-seeds 3 --guided-prompts 50 "
    "--guided-seeds 2": PARTIAL_EXPERIMENT,
    "python examples/partial_captions.py --out /tmp/partial-smoke --steps 2 --batch 4 --checkpoint-every 1 "
    "--workers 0 --fractions 0.3 0.7 --select-quality-prompts 2 --select-guided-prompts 2 --select-seeds 1 "
    "--quality-prompts 2 --quality-seeds 2 --guided-prompts 2 --guided-seeds 1 --sampler-steps 2 --sample-batch 8":
    PARTIAL_EXPERIMENT,
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
    "vllm serve Qwen/Qwen2-VL-7B-Instruct --port 8000": VLM_SERVER,
    "ollama pull llama3.2-vision": VLM_SERVER,
    "ollama serve": VLM_SERVER,
    "diffprobe judge runs/sd21 --judge vlm --judge-url http://127.0.0.1:8000/v1 --judge-model "
    "Qwen/Qwen2-VL-7B-Instruct": VLM_JUDGE,
    "diffprobe judge runs/sd21 --judge vlm --judge-url http://127.0.0.1:11434/v1 --judge-model llama3.2-vision":
    VLM_JUDGE,
    "diffprobe judge runs/sd21 --judge vlm --judge-url http://127.0.0.1:8000/v1 --judge-model "
    "Qwen/Qwen2-VL-7B-Instruct --template 'count=How many {plural} do you see? Reply with a number.'": VLM_JUDGE,
    "diffprobe generate --model stabilityai/stable-diffusion-2-1 --prompts "
    "comp90-numerical-eval:Reliable-Random-Seeds/prompt_dataset --seeds 0 --out runs/comp90-eval": HUB + "; and the "
    "user's copy of Comp90 (tests/test_prompts.py loads the suites from small files)",
    "diffprobe judge --agreement runs/judged --judge vlm --judge-url http://127.0.0.1:8000/v1 --judge-model qwen2-vl "
    "--against shapes": "needs a VLM server (tests/test_agreement.py compares judges end to end)",
    "diffprobe judge runs/sd15-counts --judge detector --detector google/owlv2-base-patch16-ensemble": DETECTOR,
    "diffprobe judge runs/sd15-spatial --judge detector --detector IDEA-Research/grounding-dino-tiny --margin 0.1":
    DETECTOR,
    "diffprobe judge runs/sd15-cc500 --judge detector --detector google/owlv2-base-patch16-ensemble --clip "
    "clip-vit-l14": DETECTOR,
    "diffprobe score fd runs/sd15 --ref coco_val_images --inception inception-2015-12-05.pt --resize clean":
        "needs the FID Inception file, a download (tests/test_fd.py runs the TorchScript path on a tiny network)",
    "python examples/fashion_mnist_folders.py --train-size 3000 --test-size 1000 --out /tmp/fd-fmnist-study": FMNIST,
    "diffprobe score extractors --train /tmp/fd-fmnist-study/train --test /tmp/fd-fmnist-study/test --embedders "
    "efficientnet-lite0@64,efficientnet-lite1@64,efficientnet-lite2@64,pixels,random-projection --out "
    "/tmp/fd-fmnist-study/extractors.json": FMNIST,
    "python examples/extractors_fashion_mnist.py --folders /tmp/fd-fmnist-study --result "
    "/tmp/fd-fmnist-study/extractors.json": FMNIST,
    "python examples/fashion_mnist_folders.py --train-size 0 --test-size 1000 --seed 1 --out /tmp/fd-fmnist-fd/all":
        FMNIST,
    "python examples/fashion_mnist_folders.py --train-size 0 --test-size 1000 --seed 1 --classes 0,1,2,3,4 --out "
    "/tmp/fd-fmnist-fd/half": FMNIST,
    "diffprobe score fd /tmp/fd-fmnist-study/test --ref /tmp/fd-fmnist-study/train --embedder efficientnet-lite0@64 "
    "--save-stats /tmp/fd-fmnist-fd/train-efficientnet-lite0@64.npz --out "
    "/tmp/fd-fmnist-fd/heldout-efficientnet-lite0@64.json": FMNIST,
    "diffprobe score fd /tmp/fd-fmnist-fd/half/test --ref /tmp/fd-fmnist-fd/train-efficientnet-lite0@64.npz "
    "--embedder efficientnet-lite0@64 --out /tmp/fd-fmnist-fd/half-efficientnet-lite0@64.json": FMNIST,
    "python examples/seeds_shapes.py --out results/real --mine-prompts 20 --candidates 10 --data-prompts 30 "
    "--select-prompts 8 --lrs 1e-4 1e-3 --full-lrs 1e-4 --ft-steps 100 --ft-batch 16 --eval-prompts 15 --images 2 "
    "--single-prompts 8 --single-images 3": SEEDS_EXPERIMENT,
    "python examples/seeds_shapes.py --out results/smoke --mine-prompts 5 --candidates 3 --top 2 --data-prompts 5 "
    "--select-prompts 2 --lrs 1e-4 1e-3 --full-lrs 1e-4 --ft-steps 4 --ft-batch 4 --checkpoint-every 2 "
    "--eval-prompts 2 --single-prompts 2 --single-images 2 --sampler-steps 5 --n-boot 200": SEEDS_EXPERIMENT,
    "diffprobe seeds mine --model stabilityai/stable-diffusion-2-1 --prompts "
    "comp90-numerical-mining:Reliable-Random-Seeds/prompt_dataset --seeds 0-99 --dtype fp16 --generator-device cuda "
    "--judge vlm --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2-VL-7B-Instruct --out runs/sd21-mine":
    SD21,
    "diffprobe seeds show runs/sd21-mine/reliable_seeds.json": "reads the seeds file the SD 2.1 mining above writes",
    "OMP_NUM_THREADS=1 python examples/diadm_fashion_mnist.py --out results/diadm": DIADM_EXPERIMENT,
    "OMP_NUM_THREADS=1 python examples/diadm_cost.py --cache-dir /tmp/diadm-cost": "times training and sampling "
    "at the experiment's model size: minutes on a CPU",
    "OMP_NUM_THREADS=1 python examples/diadm_fashion_mnist.py --out /tmp/diadm-smoke --train-size 200 --test-size 100 "
    "--steps 30 --batch 16 --warmup 5 --checkpoint-every 10 --sampler-steps 5 --kid-subsets 100": DIADM_EXPERIMENT,
    "diffprobe generate --model stabilityai/stable-diffusion-2-1 --prompts "
    "comp90-numerical-eval:Reliable-Random-Seeds/prompt_dataset --seeds reliable:runs/sd21-mine/reliable_seeds.json "
    "--dtype fp16 --generator-device cuda --out runs/sd21-eval-reliable": SD21,
    "diffprobe seeds dataset --model stabilityai/stable-diffusion-2-1 --seeds-file runs/sd21-mine/reliable_seeds.json "
    "--prompts comp90-numerical-train:Reliable-Random-Seeds/prompt_dataset --rectify relabel --judge vlm --judge-url "
    "http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2-VL-7B-Instruct --dtype fp16 --out data/sd21-seeds": SD21,
    "diffprobe seeds finetune data/sd21-seeds --model stabilityai/stable-diffusion-2-1 --workers 4 "
    "--out models/sd21-qk": HUB + ", and the SD 2.1 data set made above",
    "accelerate launch --num_processes 2 -m diffprobe.cli seeds finetune data/sd21-seeds --model "
    "stabilityai/stable-diffusion-2-1 --grad-accum 4 --workers 4 --out models/sd21-qk": "two GPUs and " + HUB,
    "diffprobe generate --model models/sd21-qk --prompts comp90-numerical-eval:Reliable-Random-Seeds/prompt_dataset "
    "--seeds 0 --out runs/sd21-qk": "the SD 2.1 model fine-tuned above, and the user's copy of Comp90",
}
SHELL = ("printf",)  # plain shell commands the docs use to make their inputs; run by bash

# The substitutions, applied to `diffprobe generate` (seeds, steps, suites) and to every command (--out):
SEEDS = "0-1"  # the fewest seeds SCS can score (2 images per prompt)
STEPS = "2"  # --steps N -> 2, and --steps 2 added where the command leaves the model's default
SUITE_PROMPTS = 2  # --prompts <built-in suite> -> a prompt file of the suite's first 2 distinct prompts
# `seeds finetune --steps N` -> 2 as well (optimisation steps)


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


def _question_excerpt(name: str, folder: Path) -> str:
    """The first prompt of each question category of a suite (count 2, count 3, ..., relation left_of, ...), with
    its metadata: what the seeds commands need to mine every category that a later excerpt may ask for."""
    import json

    from diffprobe.prompts import load_prompts

    first: dict[str, dict] = {}
    for p in load_prompts(name):
        q = p.meta.get("question") or {}
        first.setdefault(f"{q.get('kind')} {q.get('count')} {q.get('relation')}", {"prompt": p.text, **p.meta})
    path = folder / f"{name}-each-category.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in first.values()))
    return str(path)


SAMPLING = (["diffprobe", "generate"], ["diffprobe", "seeds", "mine"], ["diffprobe", "seeds", "dataset"])


def _capped(words: list[str], folder: Path) -> list[str]:
    """``words`` with the substitutions above applied (the seeds commands that sample count as generate; a
    ``reliable:FILE`` seed list is kept)."""
    generate = any(words[:len(command)] == command for command in SAMPLING)
    # prompts with their questions where the command reads them (seeds commands, reliable:FILE seeds)
    seeds_command = words[:2] == ["diffprobe", "seeds"] or any(w.startswith("reliable:") for w in words)
    finetune = words[:3] == ["diffprobe", "seeds", "finetune"]
    out, i = [], 0
    while i < len(words):
        word, value = words[i], words[i + 1] if i + 1 < len(words) else None
        if word == "--out":
            value = str(folder / value)
        elif generate and word == "--seeds" and not str(value).startswith("reliable:"):
            value = SEEDS
        elif (generate or finetune) and word == "--steps":
            value = STEPS
        elif generate and word == "--prompts" and not (folder / value).exists():
            value = _question_excerpt(value, folder) if seeds_command else _suite_excerpt(value, folder)
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
