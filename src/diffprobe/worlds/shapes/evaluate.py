"""Measure a shapes-world model with the exact judge: ``python -m diffprobe.worlds.shapes.evaluate``.

Generates one image per eval-split prompt (seed = the prompt's index, CPU generator) with CFG and DDIM, judges it,
and reports per-category accuracy with a Wilson 95% interval, split by seen/held-out combinations and phrasings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ...errors import exit_on_user_error
from ...judges.base import ObjectSpec, Question
from ...metrics.stats import wilson
from .card import model_card
from .grammar import CATEGORIES, ShapesPrompt, prompts
from .judge import ShapesJudge, answer, detect


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Accuracy and Wilson CI per category and per (category, seen/held-out) group."""
    groups: dict[str, list[bool]] = {}
    for r in rows:
        keys = [r["category"], "all"]
        keys += [f"{r['category']}/{'heldout' if r['heldout_combo'] else 'seen'}-combo"]
        keys += [f"{r['category']}/{'heldout' if r['heldout_phrasing'] else 'seen'}-phrasing"]
        for k in keys:
            groups.setdefault(k, []).append(r["correct"])
        groups.setdefault(f"{r['category']}/ignoring-size", []).append(r["correct_ignoring_size"])
    out = {}
    for k, v in groups.items():
        n, c = len(v), sum(v)
        lo, hi = wilson(c, n)
        out[k] = {"n": n, "correct": c, "accuracy": c / n, "ci95": [lo, hi]}
    return out


def _without_size(q: Question) -> Question:
    objects = tuple(ObjectSpec(o.noun, o.color) for o in q.objects)
    return Question(q.kind, objects, q.count, q.relation, q.text)


def _save_grid(images: list, path: Path, cols: int = 10) -> None:
    from PIL import Image

    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, -(-len(images) // cols) * h), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def evaluate(model: str = "shapes", per_category: int = 150, steps: int = 25, scale: float = 3.5,
             batch: int = 50, split: str = "eval", device: str | None = None, grid_dir: str | None = None,
             log=print) -> dict:
    """Generate and judge ``per_category`` prompts of each category; returns rows and the summary."""
    from ...guidance import make_guider
    from ...models import load_model
    from ...sampling import sample

    adapter = load_model(model, device=device, dtype="fp32")
    guider = make_guider("cfg", scale=scale)
    suite: list[ShapesPrompt] = [p for c in CATEGORIES for p in prompts(split, c, per_category)]
    rows = []
    t0 = time.time()
    for i in range(0, len(suite), batch):
        chunk = suite[i:i + batch]
        result = sample(adapter, guider, [p.caption for p in chunk], [p.index for p in chunk], steps=steps)
        for p, image in zip(chunk, result.images, strict=True):
            dets = detect(image)
            v = answer(dets, p.question)
            rows.append({"category": p.category, "index": p.index, "caption": p.caption, "seed": p.index,
                         "heldout_combo": p.heldout_combo, "heldout_phrasing": p.heldout_phrasing,
                         "correct": v.correct, "answer": v.answer, "reason": v.reason,
                         "correct_ignoring_size": answer(dets, _without_size(p.question)).correct,
                         "detections": [dataclasses.asdict(d) for d in dets]})
        if grid_dir is not None:
            _save_grid(result.images, Path(grid_dir) / f"grid_{i // batch:02d}.png")
        log(f"{len(rows)}/{len(suite)} images ({time.time() - t0:.0f}s)")
    device_name = str(adapter.device)
    if adapter.device.type == "cuda":
        import torch

        device_name = torch.cuda.get_device_name(adapter.device)
    return {"model": model, "split": split, "device": device_name, "per_category": per_category, "steps": steps,
            "cfg_scale": scale,
            "sampler": "DDIM (eta 0)", "seeds": "seed = prompt index, CPU generator", "seconds": time.time() - t0,
            "summary": summarize(rows), "rows": rows}


def chance_rates(per_category: int = 150, split: str = "eval") -> dict[str, float]:
    """Accuracy of a caption-blind generator: each prompt judged against a rendered scene of *another* prompt
    of the same category (the next index), i.e. right layout statistics, wrong content."""
    from .grammar import make_scene
    from .render import render_tensor, to_pil

    judge = ShapesJudge()
    out = {}
    for c in CATEGORIES:
        ps = prompts(split, c, per_category)
        scenes = [make_scene(split, c, (p.index + 1) % per_category)[0] for p in ps]
        images = to_pil(render_tensor(scenes))
        out[c] = sum(judge.judge(im, p.question).correct for im, p in zip(images, ps, strict=True)) / len(ps)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--per-category", type=int, default=150)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=3.5, help="CFG scale (3.5 was chosen on the train split)")
    p.add_argument("--out", type=Path, default=Path("shapes-eval.json"))
    p.add_argument("--split", default="eval", help="prompt split: eval (report) or train (choose settings)")
    p.add_argument("--grids", default=None, help="folder for image grids (one per batch)")
    p.add_argument("--card", type=Path, default=None,
                   help="folder holding training.json: write evaluation.json and MODEL_CARD.md there")
    a = p.parse_args(argv)
    res = evaluate(a.model, a.per_category, a.steps, a.cfg, split=a.split, grid_dir=a.grids)
    res["chance"] = chance_rates(a.per_category, a.split)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    if a.card:
        write_card(a.card, res)
    for k, s in sorted(res["summary"].items()):
        print(f"{k:32s} {s['correct']:4d}/{s['n']:<4d} {s['accuracy']:.3f}  [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]")
    print("chance:", json.dumps(res["chance"]))


def findings(res: dict) -> list[str]:
    """Plain-language notes computed from an evaluation's rows."""
    rows = res["rows"]
    blank = [r for r in rows if not r["detections"]]
    rel = [r for r in rows if r["category"] == "relation"]
    both = [r for r in rel if not r["reason"].startswith("missing")]
    notes = [
        "- `single` requires the size word when the caption has one (\"a small red circle\");"
        " `single/ignoring-size` checks colour and kind only.",
        f"- Blank images (no shape found): {len(blank)} of {len(rows)},"
        f" {sum(r['category'] == 'single' for r in blank)} of them for single-shape prompts.",
        f"- Relations fail mostly on binding: {len(both)} of {len(rel)} relation images hold both objects with the"
        f" right colours and kinds, and {sum(r['correct'] for r in both)} of those have the right relation.",
    ]
    if "chance" in res:
        notes.append("- Chance: a caption-blind generator (each prompt judged on the rendered ground truth of another"
                     " prompt of its category) scores " + ", ".join(f"{k} {v:.3f}" for k, v in res["chance"].items())
                     + "; guessing a count uniformly from 2-6 with the right colour and kind scores 0.2.")
    return notes


def write_card(folder: Path, res: dict) -> None:
    """Write ``folder/evaluation.json`` (no per-image rows) and ``folder/MODEL_CARD.md`` from ``training.json``."""
    previous = folder / "evaluation.json"
    history = json.loads(previous.read_text()).get("history", []) if previous.is_file() else []
    summary = {k: v for k, v in res.items() if k != "rows"}
    summary["notes"] = findings(res) + [line for paragraph in history for line in ("", paragraph)]
    summary["history"] = history
    previous.write_text(json.dumps(summary, indent=2) + "\n")
    training = json.loads((folder / "training.json").read_text())
    (folder / "MODEL_CARD.md").write_text(model_card(training, summary))


if __name__ == "__main__":
    exit_on_user_error(main)
