"""Reliable seeds on the shapes world: do mined seeds and Q/K fine-tuning on their images help counts and layouts?

    python examples/seeds_shapes.py --select              # mine, data set, fine-tune each LR, pick on TRAIN
    python examples/seeds_shapes.py --final               # the five arms on held-out EVAL prompts, once
    python examples/seeds_shapes.py --report              # the tables (also printed at the end of --final)
    python examples/seeds_shapes.py                       # all three in order

Stages (each through the project's CLI, so every step is resumable: images and verdicts live in run stores, the
fine-tunes in checkpoints, and a re-run skips whatever is finished):

1. ``diffprobe seeds mine`` on a deterministic sample of the TRAIN split's count (2..6) and relation prompts, with
   ``--candidates`` seeds.
2. ``diffprobe seeds dataset`` on other TRAIN prompts, seeded from the mined top seeds (``--rectify``).
3. ``diffprobe seeds finetune``: Q/K (default layers) and ``--full``, same data, steps, batch, for every learning
   rate of ``--lrs`` / ``--full-lrs``; each is scored on held-out TRAIN prompts (random seeds), and the best LR of
   each kind is chosen there (``--select``). The eval split plays no part in any choice.
4. ``--final``: on held-out EVAL prompts, the same prompts for every arm, ``--images`` per prompt:
   (a) base + random seeds, (b) base + mined seeds (``reliable:``), (c) Q/K + random seeds, (d) Q/K + mined seeds
   (stored latents), (e) full + random seeds. Arms a, c, e use the same seed integers, hence the same initial
   noise, so their images pair on (prompt, image index). Also single-object accuracy and SCS (``diffprobe score
   scs`` and ``diffprobe compare``) for base vs Q/K vs full.
5. ``--report``: accuracy per category with Wilson intervals, paired differences vs (a) with the exact McNemar test
   and a bootstrap over prompts, the relative gain beside the paper's (SD 2.1: +29.3 % numerical, +60.7 %
   spatial), as Markdown (``OUT/report.md``) and JSON (``OUT/report.json``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from experiment import Timer, cli, write_report  # examples/experiment.py

from diffprobe.metrics.stats import bootstrap_mean_ci, mcnemar, wilson
from diffprobe.prompts import Prompt, load_prompts, unique
from diffprobe.store import open_run

PAPER_GAIN = {"count": 0.293, "relation": 0.607}  # SD 2.1, relative gain after fine-tuning (spec section 6)
ARMS = {
    "a": "base + random seeds",
    "b": "base + mined seeds",
    "c": "Q/K + random seeds",
    "d": "Q/K + mined seeds",
    "e": "full + random seeds",
}
CATEGORIES = ("count", "relation")


# --- prompts --------------------------------------------------------------------------------------------------


def suite(split: str, category: str) -> list[Prompt]:
    """Unique prompts of a shapes suite in a fixed shuffled order (counts 2..6 only for count prompts)."""
    items, _ = unique(load_prompts(f"shapes-{split}-{category}"))
    if category == "count":
        items = [p for p in items if 2 <= p.meta["question"]["count"] <= 6]
    random.Random(f"{split}-{category}").shuffle(items)
    return interleave(items)


def interleave(items: list[Prompt]) -> list[Prompt]:
    """Round-robin over the subcategories (count N, each relation), so any prefix covers every one of them: the
    mined seeds file then has top seeds for every category the eval prompts ask for."""
    groups: dict[Any, list[Prompt]] = defaultdict(list)
    for p in items:
        q = p.meta["question"]
        groups[q["count"] if q["kind"] == "count" else q["relation"]].append(p)
    lists = [groups[k] for k in sorted(groups, key=str)]
    return [g[i] for i in range(max(map(len, lists), default=0)) for g in lists if i < len(g)]


def write_prompts(path: Path, prompts: list[Prompt]) -> Path:
    """A jsonl prompt file with each prompt's metadata (its question), read back by every command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"prompt": p.text, **p.meta}) + "\n" for p in prompts)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def train_splits(args: argparse.Namespace) -> dict[str, list[Prompt]]:
    """Mining prompts, data set prompts and selection prompts of the TRAIN split (data and selection disjoint)."""
    out: dict[str, list[Prompt]] = {"mine": [], "data": [], "select": []}
    for cat in CATEGORIES:
        items = suite("train", cat)
        if args.data_prompts + args.select_prompts > len(items):
            sys.exit(f"--data-prompts + --select-prompts ({args.data_prompts} + {args.select_prompts}) exceed the "
                     f"{len(items)} unique train {cat} prompts")
        out["mine"] += items[: args.mine_prompts]
        out["data"] += items[: args.data_prompts]
        out["select"] += items[len(items) - args.select_prompts:]
    return out


def eval_prompts(args: argparse.Namespace) -> dict[str, list[Prompt]]:
    return {"eval": [p for cat in CATEGORIES for p in suite("eval", cat)[: args.eval_prompts]],
            "single": suite("eval", "single")[: args.single_prompts]}


# --- stages ---------------------------------------------------------------------------------------------------


def common(args: argparse.Namespace) -> list[str]:
    flags = ["--batch-size", str(args.sample_batch), "--quiet"]
    return flags + (["--steps", str(args.sampler_steps)] if args.sampler_steps else [])


def random_seeds(args: argparse.Namespace, k: int) -> str:
    return f"{args.random_seed}-{args.random_seed + k - 1}"


def mine(args: argparse.Namespace, prompts: list[Prompt]) -> Path:
    run = args.out / "mine"
    file = run / "reliable_seeds.json"
    if not file.is_file():
        cli("seeds", "mine", "--model", "shapes", "--prompts", str(write_prompts(args.out / "prompts/mine.jsonl",
            prompts)), "--seeds", f"0-{args.candidates - 1}", "--top", str(args.top), "--judge", "shapes",
            "--out", str(run), *common(args))
        cli("seeds", "show", str(file), "--limit", "10")
    return file


def dataset(args: argparse.Namespace, prompts: list[Prompt], seeds_file: Path) -> Path:
    data = args.out / "data"
    if not (data / "dataset.json").is_file():
        rectify = ["--rectify", args.rectify] + (["--judge", "shapes"] if args.rectify != "none" else [])
        cli("seeds", "dataset", "--model", "shapes", "--seeds-file", str(seeds_file), "--prompts",
            str(write_prompts(args.out / "prompts/data.jsonl", prompts)), *rectify, "--out", str(data),
            "--batch-size", str(args.sample_batch), "--quiet")
    return data


def model_dir(args: argparse.Namespace, kind: str, lr: float) -> Path:
    return args.out / "models" / f"{kind}-lr{lr:g}"


def finetune(args: argparse.Namespace, data: Path, kind: str, lr: float) -> Path:
    out = model_dir(args, kind, lr)
    if not (out / "finetune.json").is_file():  # otherwise resumes from OUT.training's newest checkpoint
        cli("seeds", "finetune", str(data), "--model", "shapes", "--out", str(out), *(["--full"] if kind == "full"
            else []), "--lr", f"{lr:g}", "--steps", str(args.ft_steps), "--batch-size", str(args.ft_batch),
            "--grad-accum", "1", "--ema-decay", str(args.ema_decay), "--checkpoint-every", str(args.checkpoint_every),
            "--device", "cpu")
    return out


def generate_judged(args: argparse.Namespace, model: str, prompts: Path, seeds: str, run: Path,
                    *extra: str) -> Path:
    """Generate (resumes) and judge (only new images) one run; a finished run with the same command is skipped
    without starting a process (the marker lives beside the runs, in OUT/done/)."""
    argv = ["generate", "--model", model, "--prompts", str(prompts), "--seeds", seeds, "--out", str(run),
            *common(args), *extra]
    marker = args.out / "done" / (str(run.relative_to(args.out)).replace("/", "__") + ".json")
    if marker.is_file() and json.loads(marker.read_text()) == argv:
        return run
    cli(*argv)
    cli("judge", str(run), "--judge", "shapes", "--quiet")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(argv))
    return run


def select(args: argparse.Namespace, timer: Timer) -> dict[str, Any]:
    """Stages 1-3 on the TRAIN split, ending with the chosen learning rate of each fine-tuning kind."""
    splits = train_splits(args)
    seeds_file = timer.run("mine", mine, args, splits["mine"])
    data = timer.run("dataset", dataset, args, splits["data"], seeds_file)
    select_file = write_prompts(args.out / "prompts/select.jsonl", splits["select"])
    choice: dict[str, Any] = {"split": "train", "select_prompts": len(splits["select"]), "kinds": {}}
    for kind, grid in (("qk", args.lrs), ("full", args.full_lrs)):
        scores = {}
        for lr in grid:
            model = timer.run(f"finetune {kind} lr {lr:g}", finetune, args, data, kind, lr)
            if len(grid) > 1:  # a single candidate needs no score to be chosen
                run = timer.run(f"select {kind} lr {lr:g}", generate_judged, args, str(model), select_file,
                                random_seeds(args, args.select_images), args.out / "select" / f"{kind}-lr{lr:g}")
                scores[f"{lr:g}"] = accuracy(read_run(run))
        best = max(grid, key=lambda lr: scores.get(f"{lr:g}", {}).get("all", 0.0))
        choice["kinds"][kind] = {"lr": best, "model": str(model_dir(args, kind, best)), "train_accuracy": scores}
        print(f"{kind}: chose lr {best:g} on the train split {scores or '(single candidate)'}", flush=True)
    choice["seeds_file"] = str(seeds_file)
    (args.out / "selection.json").write_text(json.dumps(choice, indent=1))
    return choice


def final(args: argparse.Namespace, timer: Timer) -> None:
    """Stage 4: each final arm on the EVAL split, once."""
    choice_file = args.out / "selection.json"
    if not choice_file.is_file():
        sys.exit(f"no {choice_file}: run --select first (settings are chosen on the train split)")
    choice = json.loads(choice_file.read_text())
    seeds_file, qk, full = choice["seeds_file"], choice["kinds"]["qk"]["model"], choice["kinds"]["full"]["model"]
    ev = eval_prompts(args)
    eval_file = write_prompts(args.out / "prompts/eval.jsonl", ev["eval"])
    single_file = write_prompts(args.out / "prompts/single.jsonl", ev["single"])
    rand, mined = random_seeds(args, args.images), f"reliable:{seeds_file}:{args.images}"
    plan = {
        "a": ("shapes", rand, ()),
        "b": ("shapes", mined, ()),
        "c": (qk, rand, ()),
        "d": (qk, mined, ("--use-stored-latents",)),
        "e": (full, rand, ()),
    }
    for arm, (model, seeds, extra) in plan.items():
        timer.run(f"final {arm}", generate_judged, args, model, eval_file, seeds, args.out / "final" / arm, *extra)
    for name, model in (("base", "shapes"), ("qk", qk), ("full", full)):
        run = args.out / "final" / f"single-{name}"
        timer.run(f"single {name}", generate_judged, args, model, single_file,
                  random_seeds(args, args.single_images), run)
        if not (run / "scores/scs.json").is_file():
            cli("score", "scs", str(run), "--embedder", args.embedder, "--no-sensitivity")
    for name in ("qk", "full"):
        out = args.out / "final" / f"scs_base_vs_{name}.json"
        if not out.is_file():
            cli("compare", str(args.out / "final/single-base/scores/scs.json"),
                str(args.out / f"final/single-{name}/scores/scs.json"), "--out", str(out))


# --- reading results and statistics ---------------------------------------------------------------------------


def read_run(run: Path) -> list[dict[str, Any]]:
    """One row per image: prompt, category, image index (rank of its seed in the prompt), correct (None: unparsed)."""
    with open_run(run) as store:
        verdicts = store.verdicts()
        by_prompt: dict[str, list[Any]] = defaultdict(list)
        for s in store.samples():
            by_prompt[s.prompt].append(s)
    rows = []
    for prompt, samples in by_prompt.items():
        for index, s in enumerate(sorted(samples, key=lambda s: s.seed)):
            found = verdicts.get(s.key, [])
            if len(found) != 1:
                sys.exit(f"{run}: image {s.key} has {len(found)} verdicts, expected one (run `diffprobe judge`)")
            correct = found[0]["correct"]
            rows.append({"prompt": prompt, "category": s.prompt_meta["category"], "index": index, "seed": s.seed,
                         "correct": None if correct is None else bool(correct)})
    return rows


def accuracy(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for cat in sorted({r["category"] for r in rows}) + ["all"]:
        parsed = [r["correct"] for r in rows if cat in ("all", r["category"]) and r["correct"] is not None]
        out[cat] = sum(parsed) / len(parsed) if parsed else float("nan")
    return out


def arm_stats(rows: list[dict[str, Any]], cat: str) -> dict[str, Any]:
    parsed = [r for r in rows if r["category"] == cat and r["correct"] is not None]
    k, n = sum(r["correct"] for r in parsed), len(parsed)
    lo, hi = wilson(k, n)
    return {"correct": k, "n": n, "unparsed": sum(1 for r in rows if r["category"] == cat) - n,
            "accuracy": k / n if n else None, "wilson95": [lo, hi]}


def paired(base: list[dict[str, Any]], arm: list[dict[str, Any]], cat: str, n_boot: int) -> dict[str, Any]:
    """Arm vs (a) on the same (prompt, image index): McNemar on the pairs, bootstrap over prompts."""
    key = {(r["prompt"], r["index"]): r["correct"] for r in base if r["category"] == cat}
    pairs = [(key[(r["prompt"], r["index"])], r["correct"], r["prompt"]) for r in arm
             if r["category"] == cat and (r["prompt"], r["index"]) in key]
    pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
    if not pairs:
        return {"n_pairs": 0}
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    per_prompt: dict[str, list[float]] = defaultdict(list)
    for x, y, prompt in pairs:
        per_prompt[prompt].append(float(y) - float(x))
    d = np.array([np.mean(v) for v in per_prompt.values()])
    lo, hi = bootstrap_mean_ci(d, n_boot=n_boot)
    base_acc = a.mean()
    return {**mcnemar(a, b), "difference": float(b.mean() - a.mean()), "bootstrap95_over_prompts": [lo, hi],
            "prompts": len(d), "relative_gain": float((b.mean() - base_acc) / base_acc) if base_acc else None}


def report(args: argparse.Namespace) -> dict[str, Any]:
    rows = {arm: read_run(args.out / "final" / arm) for arm in ARMS}
    result: dict[str, Any] = {"arms": ARMS, "paper_relative_gain_sd21": PAPER_GAIN, "categories": {}}
    for cat in CATEGORIES:
        result["categories"][cat] = {
            arm: {**arm_stats(r, cat), **({"vs_a": paired(rows["a"], r, cat, args.n_boot)} if arm != "a" else {})}
            for arm, r in rows.items()}
    result["single"] = {name: arm_stats(read_run(args.out / "final" / f"single-{name}"), "single")
                        for name in ("base", "qk", "full")}
    for name in ("base", "qk", "full"):
        scs = json.loads((args.out / f"final/single-{name}/scores/scs.json").read_text())
        result["single"][name]["scs"] = {k: scs.get(k) for k in ("mean", "sd") if k in scs} or scs.get("summary")
    for name in ("qk", "full"):
        cmp_ = json.loads((args.out / f"final/scs_base_vs_{name}.json").read_text())
        result["single"][name]["scs_vs_base"] = {"difference": cmp_["difference"]["mean"],
                                                 "bootstrap_ci": cmp_["difference"]["bootstrap_ci"],
                                                 "wilcoxon_p": cmp_["wilcoxon"]["p"]}
    if (args.out / "selection.json").is_file():
        result["selection"] = json.loads((args.out / "selection.json").read_text())
    write_report(args.out, result, args, markdown)
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def markdown(result: dict[str, Any]) -> str:
    lines = ["| Category | Arm | Accuracy % [Wilson 95 %] | n | vs (a): diff pts [bootstrap 95 %] | McNemar p "
             "(a-only / arm-only) | Relative gain | Paper (SD 2.1) |", "|---|---|---|---|---|---|---|---|"]
    for cat, arms in result["categories"].items():
        for arm, s in arms.items():
            lo, hi = s["wilson95"]
            cells = [cat, f"({arm}) {ARMS[arm]}", f"{_pct(s['accuracy'])} [{_pct(lo)}, {_pct(hi)}]", str(s["n"])]
            v = s.get("vs_a")
            if v and v.get("n_pairs"):
                blo, bhi = v["bootstrap95_over_prompts"]
                gain = v["relative_gain"]
                cells += [f"{100 * v['difference']:+.1f} [{100 * blo:+.1f}, {100 * bhi:+.1f}]",
                          f"{v['p']:.3g} ({v['a_only_correct']} / {v['b_only_correct']})",
                          "n/a" if gain is None else f"{100 * gain:+.1f} %",
                          f"+{100 * PAPER_GAIN[cat]:.1f} %" if arm in "cd" else ""]
            else:
                cells += ["", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| Model | Single-object accuracy % [Wilson 95 %] | n | SCS | SCS vs base [bootstrap 95 %], "
              "Wilcoxon p |", "|---|---|---|---|---|"]
    for name, s in result["single"].items():
        lo, hi = s["wilson95"]
        scs = s.get("scs") or {}
        v = s.get("scs_vs_base")
        vs = "" if not v else (f"{v['difference']:+.2f} [{v['bootstrap_ci']['low']:+.2f}, "
                               f"{v['bootstrap_ci']['high']:+.2f}], p = {v['wilcoxon_p']:.3g}")
        mean = scs.get("mean")
        lines.append(f"| {name} | {_pct(s['accuracy'])} [{_pct(lo)}, {_pct(hi)}] | {s['n']} | "
                     f"{'n/a' if mean is None else format(mean, '.2f')} | {vs} |")
    return "\n".join(lines) + "\n"


# --- entry point ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/seeds_shapes"))
    parser.add_argument("--select", action="store_true", help="stages 1-3 on the train split (mine, data, tune)")
    parser.add_argument("--final", action="store_true", help="stage 4 on the eval split, then the report")
    parser.add_argument("--report", action="store_true", help="stage 5 only, from finished runs")
    g = parser.add_argument_group("train split")
    g.add_argument("--mine-prompts", type=int, default=40, help="train prompts per category to mine on")
    g.add_argument("--candidates", type=int, default=16, help="candidate seeds 0..N-1")
    g.add_argument("--top", type=int, default=3, help="top seeds kept per category (the paper: 3)")
    g.add_argument("--data-prompts", type=int, default=80, help="train prompts per category in the data set")
    g.add_argument("--rectify", default="relabel", choices=("none", "relabel", "filter"))
    g.add_argument("--select-prompts", type=int, default=20, help="held-out train prompts per category to choose "
                   "the learning rate on (disjoint from the data set)")
    g.add_argument("--select-images", type=int, default=1, help="images per selection prompt")
    g.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3], help="Q/K learning rates to choose from")
    g.add_argument("--full-lrs", type=float, nargs="+", default=[1e-4], help="full fine-tuning learning rates")
    g.add_argument("--ft-steps", type=int, default=300, help="optimisation steps (the same for Q/K and full)")
    g.add_argument("--ft-batch", type=int, default=16)
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--checkpoint-every", type=int, default=50)
    g = parser.add_argument_group("eval split")
    g.add_argument("--eval-prompts", type=int, default=40, help="eval prompts per category (count, relation)")
    g.add_argument("--images", type=int, default=2, help="images per eval prompt and arm (<= --top)")
    g.add_argument("--single-prompts", type=int, default=20, help="single-object eval prompts")
    g.add_argument("--single-images", type=int, default=4, help="images per single-object prompt (SCS needs >= 2)")
    g.add_argument("--embedder", default="auto", help="SCS embedder (diffprobe score scs --embedder)")
    g = parser.add_argument_group("sampling")
    g.add_argument("--random-seed", type=int, default=1000, help="first of the 'random' seeds shared by arms a, c, e")
    g.add_argument("--sample-batch", type=int, default=8)
    g.add_argument("--sampler-steps", type=int, default=None, help="denoising steps (default: the model's)")
    g.add_argument("--n-boot", type=int, default=10000)
    args = parser.parse_args()
    if args.images > args.top:
        parser.error(f"--images ({args.images}) cannot exceed --top ({args.top}): mined arms draw distinct top seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(args.out / "timing.json")
    everything = not (args.select or args.final or args.report)
    if args.select or everything:
        select(args, timer)
    if args.final or everything:
        final(args, timer)
    if args.final or args.report or everything:
        report(args)


if __name__ == "__main__":
    main()
