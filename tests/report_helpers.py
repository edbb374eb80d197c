"""What the report tests share: hostile text, a report built by hand around it, and a tiny audit on the shapes model."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "it's \"quoted\" & 'single' </td></table>",
    "line one\nline two\r\nline three",
    "$x^2$ {{ 7 * 7 }} {% raw %}",
    "long " + "x" * 10_000,
]


def hand_made_report(folder: Path):
    """Two arms whose prompts, labels, verdict reasons and guidance names are hostile text."""
    from diffprobe.report.build import Report
    from diffprobe.report.data import Arm, ImageInfo

    folder.mkdir(parents=True, exist_ok=True)
    arms = []
    for a, label in enumerate(["base <b>line</b>", 'arm "B" <script>alert(2)</script>']):
        images = {}
        for p, prompt in enumerate(HOSTILE):
            for seed in (0, 1):
                path = folder / f"{a}-{p}-{seed}.png"
                Image.new("RGB", (16, 16), (40 * p, 100 * a, 120 * seed)).save(path)
                images[(prompt, seed)] = ImageInfo(
                    key=f"{a}{p}{seed}", prompt=prompt, seed=seed, path=path, sha256=f"{a:02d}{p:02d}{seed:02d}" * 8,
                    correct=bool((p + seed + a) % 2), judged=True, reason=HOSTILE[(p + 1) % len(HOSTILE)][:200])
        scs = {"metric": "scs", "embedder": {"name": "<img src=x onerror=alert(3)>"},
               "per_prompt": [{"prompt_id": str(i), "prompt": t, "n_images": 2, "scs": 60.0 + i + 3 * a}
                              for i, t in enumerate(HOSTILE)]}
        comp = {"judge": {"name": "<script>alert(4)</script>"},
                "categories": {"all": {"accuracy": 0.5, "ci95": [0.3, 0.7], "n": 12, "correct": 6},
                               "<i>count</i>": {"accuracy": 0.25 * (a + 1), "ci95": [0.1, 0.8], "n": 4,
                                                "correct": a + 1}}}
        arms.append(Arm(label=label, run_dir=folder / f"run{a}", model={"model": "<script>alert(5)</script>"},
                        sampler={"steps": 2}, guidance={"name": "cfg<script>", "scale": 3.5}, versions={},
                        prompts=list(HOSTILE), seeds=[0, 1], images=images, scores={"scs": scs, "composition": comp}))
    comparisons = {arms[1].label: {"scs": {"n_pairs": 6, "difference": 3.0, "ci": [2.0, 4.0], "p": 0.03,
                                           "p_holm": 0.03, "test": "Wilcoxon", "extra": "<b>x</b>",
                                           "note": "<script>alert(6)</script>"}}}
    return Report(title="<script>alert(7)</script> audit", kind="audit", source=folder, arms=arms,
                  baseline=arms[0].label, comparisons=comparisons, notes=["note <script>alert(8)</script>"],
                  settings={"name": "<script>alert(9)</script>"})


TINY_AUDIT = """
name: tiny
models: [shapes]
prompts: prompts.jsonl
seeds: 0-1
sampler: {steps: 2}
batch_size: 8
guidance:
  - {name: cfg, scale: 3.5}
  - {name: scfg, scale: [2, 4]}
measures:
  scs: {embedder: efficientnet-lite0}
  composition: {judge: shapes}
"""


HOSTILE_PROMPT = "<script>alert(1)</script> \"><img src=x onerror=alert(1)> it's"


def write_prompts(folder: Path) -> Path:
    """Three shapes-world prompts with their questions (count, binding, relation) and one hostile prompt without."""
    import json

    from diffprobe.prompts import load_prompts

    suite = load_prompts("shapes-eval")
    chosen = [next(p for p in suite if p.meta["category"] == c) for c in ("count", "binding", "relation")]
    lines = [{"prompt": p.text, **p.meta} for p in chosen] + [{"prompt": HOSTILE_PROMPT}]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def write_config(folder: Path, text: str = TINY_AUDIT, name: str = "audit.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_prompts(folder)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _first(split: str, category: str, n: int):
    from diffprobe.prompts import load_prompts
    from diffprobe.seeds.reliable import prompt_category

    return [p for p in load_prompts(f"shapes-{split}") if p.meta["category"] in ("count", "relation")
            and prompt_category(p) == category][:n]


RELIABLE_CATEGORIES = ("count 3", "relation left_of")


def write_jsonl(path: Path, prompts) -> Path:
    import json

    path.write_text("".join(json.dumps({"prompt": p.text, **p.meta}) + "\n" for p in prompts), encoding="utf-8")
    return path


def mine_tiny(folder: Path) -> tuple[Path, Path]:
    """``diffprobe seeds mine`` on 2 train prompts of each category in RELIABLE_CATEGORIES (seeds 0-3, 2 steps,
    top 2); returns the reliable seeds file and a prompt file of 2 eval prompts of the same categories."""
    from typer.testing import CliRunner

    from diffprobe.cli import app

    train = write_jsonl(folder / "train.jsonl", [p for c in RELIABLE_CATEGORIES for p in _first("train", c, 2)])
    evals = write_jsonl(folder / "prompts.jsonl", [p for c in RELIABLE_CATEGORIES for p in _first("eval", c, 1)])
    res = CliRunner().invoke(app, ["seeds", "mine", "--model", "shapes", "--prompts", str(train), "--seeds", "0-3",
                                   "--steps", "2", "--top", "2", "--batch-size", "8", "-q", "--out",
                                   str(folder / "mine")])
    assert res.exit_code == 0, res.output
    return folder / "mine" / "reliable_seeds.json", evals


RELIABLE_AUDIT = """
name: mined
models: [shapes]
prompts: {prompts}
seeds:
  - {{label: grid, seeds: 0-1}}
  - {{label: mined, seeds: "reliable:{file}:2"}}
sampler: {{steps: 2}}
batch_size: 8
guidance:
  - {{name: cfg, scale: 3.5}}
measures:
  scs: {{embedder: efficientnet-lite0}}
  composition: {{judge: shapes}}
"""
