"""Partial captions on the shapes world: do exhaustive captions make concept guidance harmful?

    python examples/partial_captions.py                  # every stage in order; a re-run resumes where it stopped
    python examples/partial_captions.py --train          # the continuations only
    python examples/partial_captions.py --select         # choose the fraction on the TRAIN split (several --fractions)
    python examples/partial_captions.py --final          # the EVAL split, once, then the report
    python examples/partial_captions.py --report         # the report from finished runs

Hypothesis: every training caption of the shipped model names every shape of its scene, so for it "a red circle"
means "a red circle and nothing else", and concept guidance's branches pull toward single-shape images. A model that
has seen captions naming part of a scene ("a red circle" beside an unnamed blue square) reads a concept as "contains
a red circle", which is what concept guidance assumes.

Stages (each resumable: the continuations checkpoint, images and verdicts live in the audits' run stores, and a
finished audit is skipped):

1. ``--train``: continuations of the shipped weights (``python -m diffprobe.worlds.shapes.train --init``), one per
   fraction of ``--fractions`` with ``--partial-captions`` and one control with exhaustive captions (fraction 0);
   the same seed, examples, steps and batch for all, so they differ in their captions only.
2. ``--select`` (only with several fractions): on TRAIN prompts, single and count accuracy of every continuation
   under CFG, and concept guidance vs CFG on binding and relation prompts; the chosen fraction is the one whose mean
   concept-guidance gain is highest among those within 3 points of the control on single and count accuracy.
3. ``--final``, on EVAL prompts, once: ``diffprobe audit`` of the control and the partial continuation under CFG
   on all four categories (accuracy, SCS, paired comparison), and per continuation an audit of CFG at scales 2, 3.5
   and 5, S-CFG at the same scales and concept guidance (CFG scale 3.5, concept_scale 1, 3, 7.5; concepts: the
   prompt's own noun phrases) on binding and relation prompts.
4. ``--report``: per-category accuracy with Wilson intervals; partial vs control (exact McNemar per category, SCS
   Wilcoxon); concept guidance vs CFG 3.5 and S-CFG vs CFG at each scale (exact McNemar on the same prompt and seed,
   Holm over each curve); the hypothesis test (per-prompt concept-guidance gain, partial vs control, Wilcoxon,
   Holm over the three strengths); and the issue's decision rule, as ``OUT/report.md`` and ``OUT/report.json``.

The hypothesis holds when at some concept_scale the partial model's concept-guidance gain over CFG exceeds the
control's (Holm p < 0.05) and at none is it significantly smaller. The rule ships the partial weights when, on the
eval split, their single and count accuracy are within 3 points of the control's and S-CFG or concept guidance
helps the partial model somewhere on its curve (difference > 0, Holm p < 0.05 over the six points of both curves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from experiment import Timer, run, write_report  # examples/experiment.py

from diffprobe.audit import compare_arm
from diffprobe.metrics.stats import compare_scores, holm, wilson
from diffprobe.prompts import Prompt, load_prompts, unique
from diffprobe.report import gather_run
from diffprobe.worlds.shapes import weights_dir

CATEGORIES = ("single", "count", "binding", "relation")
GUIDED = ("binding", "relation")  # the categories the guidance curves are measured on
SCALES = (2.0, 3.5, 5.0)  # CFG and S-CFG scales
BASE_SCALE = 3.5  # the shapes model's CFG scale (chosen on the train split), concept guidance's w_g
CONCEPT_SCALES = (1.0, 3.0, 7.5)  # concept_scale 0 is CFG itself
QUALITY_POINTS = 0.03  # single and count accuracy must stay within 3 points of the control
ALPHA = 0.05
CONTROL = "control"


# --- prompts --------------------------------------------------------------------------------------------------


def phrase(obj: dict[str, Any]) -> str:
    return "a " + " ".join(w for w in (obj.get("size"), obj.get("color"), obj["noun"]) if w)


def suite(split: str, category: str, n: int) -> list[Prompt]:
    """The first ``n`` distinct prompts of a shapes suite, each with its objects as concepts (``noun_phrases``)."""
    items, _ = unique(load_prompts(f"shapes-{split}-{category}"))
    if n > len(items):
        sys.exit(f"asked for {n} {split} {category} prompts; the suite has {len(items)} distinct ones")
    return [Prompt(p.text, {**p.meta, "noun_phrases": [phrase(o) for o in p.meta["question"]["objects"]]})
            for p in items[:n]]


def write_prompts(path: Path, prompts: list[Prompt]) -> Path:
    """A jsonl prompt file with each prompt's metadata (its question and concepts), read back by the audit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"prompt": p.text, **p.meta}) + "\n" for p in prompts)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def categories_of(path: Path) -> dict[str, str]:
    """Prompt text -> shapes category, from a prompt file this script wrote."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["prompt"]: r["category"] for r in rows}


# --- stage 1: the continuations -------------------------------------------------------------------------------


def model_name(fraction: float) -> str:
    return CONTROL if fraction == 0 else f"partial-{fraction:g}"


def continuations(args: argparse.Namespace) -> dict[str, float]:
    return {CONTROL: 0.0, **{model_name(f): f for f in args.fractions}}


def train_one(args: argparse.Namespace, name: str, fraction: float) -> Path:
    """Continue the shipped weights; a killed run resumes from its checkpoint, a finished one is kept."""
    out = args.out / "models" / name
    if not (out / "training.json").is_file():
        device = ["--device", args.device] if args.device else []
        run("-m", "diffprobe.worlds.shapes.train", "--init", str(weights_dir()), "--partial-captions", f"{fraction:g}",
            "--seed", str(args.seed), "--steps", str(args.steps), "--batch", str(args.batch), "--lr", f"{args.lr:g}",
            "--warmup", str(args.warmup), "--ema", str(args.ema), "--checkpoint-every", str(args.checkpoint_every),
            "--workers", str(args.workers), *device, "--out", str(out))
    record = json.loads((out / "training.json").read_text())
    if record["partial_captions"] != fraction or record["unet_steps"] != args.steps or record["batch"] != args.batch:
        sys.exit(f"{out} holds another continuation (partial captions {record['partial_captions']}, "
                 f"{record['unet_steps']} steps, batch {record['batch']}); use another --out")
    return out / "weights"


def train_all(args: argparse.Namespace, timer: Timer) -> dict[str, Path]:
    return {name: timer.run(f"train {name}", train_one, args, name, f) for name, f in continuations(args).items()}


def training_records(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The settings and cost of each finished continuation under OUT/models, from its training.json."""
    out = {}
    for path in sorted((args.out / "models").glob("*/training.json")):
        r = json.loads(path.read_text())
        out[path.parent.name] = {
            **{k: r.get(k) for k in ("partial_captions", "unet_steps", "batch", "lr", "seed", "data_offset",
                                     "seconds_total", "device", "resumed_from_step")},
            # a resumed run's clock continues from its checkpoint; loading and saving are included
            "seconds_per_step": r["seconds_total"] / max(1, r["unet_steps"])}
    return out


# --- audits ---------------------------------------------------------------------------------------------------


def audit(args: argparse.Namespace, name: str, models: dict[str, Path], guidance: list[dict[str, Any]],
          prompts: Path, seeds: int, baseline: str, scs: bool) -> Path:
    """Write and run one audit config (``diffprobe audit``); a finished audit of the same config is skipped."""
    config = {
        "name": name,
        "models": [{"name": str(path), "label": label} for label, path in models.items()],
        "prompts": str(prompts.resolve()),
        "seeds": f"0-{seeds - 1}",
        "sampler": {"steps": args.sampler_steps} if args.sampler_steps else {},
        "guidance": guidance,
        "baseline": baseline,
        "measures": {"scs": {"embedder": args.embedder} if scs else False, "composition": {"judge": "shapes"}},
        "batch_size": args.sample_batch,
    }
    file = args.out / "configs" / f"{name}.yaml"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(yaml.safe_dump(config, sort_keys=False))
    audit_dir = args.out / "audits" / name
    marker = audit_dir / "finished.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"config": config, "prompts": prompts.read_text()}:
        return audit_dir
    run("-m", "diffprobe.cli", "audit", str(file), "--out", str(audit_dir), "--quiet")
    marker.write_text(json.dumps({"config": config, "prompts": prompts.read_text()}))
    return audit_dir


def curves() -> list[dict[str, Any]]:
    """The guidance arms of a curve audit: CFG and S-CFG at each scale, concept guidance at each strength."""
    return [{"name": "cfg", "scale": list(SCALES)}, {"name": "scfg", "scale": list(SCALES)},
            {"name": "concept", "scale": BASE_SCALE, "concept_scale": list(CONCEPT_SCALES), "extractor": "suite"}]


def arms(audit_dir: Path) -> dict[str, Any]:
    """Label -> the gathered run (images with verdicts, score files) of every arm of a finished audit."""
    summary = json.loads((audit_dir / "summary.json").read_text())
    return {a["label"]: gather_run(audit_dir / a["run_dir"], a["label"]) for a in summary["arms"]}


def find(audit_dir: Path, name: str, **params: float) -> str:
    """The label of the arm of guider ``name`` with ``params`` (labels spell numbers as YAML wrote them)."""
    summary = json.loads((audit_dir / "summary.json").read_text())
    for a in summary["arms"]:
        g = a["guidance"]
        if g["name"] == name and all(float(g["params"].get(k, -1)) == float(v) for k, v in params.items()):
            return a["label"]
    raise KeyError(f"{audit_dir}: no {name} arm with {params}")


def only(arm: Any, prompts: set[str]) -> Any:
    """The arm restricted to some prompts (for per-category numbers)."""
    return dataclasses.replace(arm, images={k: v for k, v in arm.images.items() if k[0] in prompts})


def accuracy(arm: Any) -> dict[str, Any]:
    verdicts = [i.correct for i in arm.images.values() if i.correct is not None]
    k, n = int(sum(verdicts)), len(verdicts)
    lo, hi = wilson(k, n)
    return {"correct": k, "n": n, "accuracy": k / n if n else None, "wilson95": [lo, hi],
            "unjudged": len(arm.images) - n}


def paired(base: Any, arm: Any) -> dict[str, Any] | None:
    """Arm vs base on the same (prompt, seed): exact McNemar, bootstrap interval of the difference."""
    r = compare_arm(base, arm, "composition")
    if r is None:
        return None
    return {k: r[k] for k in ("n_pairs", "difference", "ci", "p")} | {
        "arm_only_correct": r["detail"]["b_only_correct"], "base_only_correct": r["detail"]["a_only_correct"]}


def by_category(arm: Any, cats: dict[str, str], names: tuple[str, ...]) -> dict[str, Any]:
    groups = {c: {p for p, pc in cats.items() if pc == c} for c in names}
    return {**{c: only(arm, g) for c, g in groups.items()}, "all": only(arm, set().union(*groups.values()))}


def with_holm(results: list[dict[str, Any] | None]) -> None:
    """Add ``p_holm`` to each result (Holm over the family given)."""
    adjusted = holm([r["p"] if r else None for r in results])
    for r, p in zip(results, adjusted, strict=True):
        if r:
            r["p_holm"] = p


# --- stage 2: choosing the fraction on the train split --------------------------------------------------------


def select(args: argparse.Namespace, models: dict[str, Path], timer: Timer) -> float:
    """The fraction to evaluate: the only one given, or the one chosen on TRAIN prompts."""
    file = args.out / "selection.json"
    if len(args.fractions) == 1:
        choice = {"fraction": args.fractions[0], "split": None, "why": "a single candidate fraction was given"}
        file.write_text(json.dumps(choice, indent=1))
        return args.fractions[0]
    quality = write_prompts(args.out / "prompts" / "select-quality.jsonl",
                            [p for c in ("single", "count") for p in suite("train", c, args.select_quality_prompts)])
    guided = write_prompts(args.out / "prompts" / "select-guided.jsonl",
                           [p for c in GUIDED for p in suite("train", c, args.select_guided_prompts)])
    q_dir = timer.run("select quality", audit, args, "select-quality", models, [{"name": "cfg", "scale": BASE_SCALE}],
                      quality, args.select_seeds, f"{CONTROL} / cfg", False)
    q_arms, q_cats = arms(q_dir), categories_of(quality)
    candidates: dict[str, Any] = {}
    for fraction in args.fractions:
        name = model_name(fraction)
        drops = {}
        for cat in ("single", "count"):
            control = accuracy(by_category(q_arms[f"{CONTROL} / cfg"], q_cats, (cat,))[cat])["accuracy"]
            mine = accuracy(by_category(q_arms[f"{name} / cfg"], q_cats, (cat,))[cat])["accuracy"]
            drops[cat] = mine - control
        g_dir = timer.run(f"select guidance {name}", audit, args, f"select-guidance-{name}", {name: models[name]},
                          [{"name": "cfg", "scale": BASE_SCALE}, curves()[2]], guided, args.select_seeds, "cfg", False)
        g_arms = arms(g_dir)
        base = g_arms[find(g_dir, "cfg", scale=BASE_SCALE)]
        gains = {f"{cs:g}": accuracy(g_arms[find(g_dir, "concept", concept_scale=cs)])["accuracy"]
                 - accuracy(base)["accuracy"] for cs in CONCEPT_SCALES}
        candidates[f"{fraction:g}"] = {"quality_vs_control": drops, "concept_gain": gains,
                                       "eligible": all(abs(d) <= QUALITY_POINTS for d in drops.values()),
                                       "score": float(np.mean(list(gains.values())))}
    eligible = [f for f in args.fractions if candidates[f"{f:g}"]["eligible"]]
    pool = eligible or list(args.fractions)
    # Ties go to the fraction nearest 0.5, then to the smaller one.
    chosen = min(pool, key=lambda f: (-candidates[f"{f:g}"]["score"], round(abs(f - 0.5), 9), f))
    why = ("highest mean concept-guidance gain over CFG among the fractions within 3 points of the control on "
           "single and count" if eligible else "no fraction stayed within 3 points of the control on single and "
           "count; highest mean concept-guidance gain over CFG")
    choice = {"fraction": chosen, "split": "train", "why": why, "candidates": candidates,
              "seeds": args.select_seeds, "prompts": {"quality": args.select_quality_prompts,
                                                      "guided": args.select_guided_prompts}}
    file.write_text(json.dumps(choice, indent=1))
    print(f"chose partial captions {chosen:g} on the train split: {why}", flush=True)
    return chosen


# --- stage 3: the eval split ----------------------------------------------------------------------------------


def final(args: argparse.Namespace, models: dict[str, Path], fraction: float, timer: Timer) -> dict[str, Path]:
    quality = write_prompts(args.out / "prompts" / "eval-quality.jsonl",
                            [p for c in CATEGORIES for p in suite("eval", c, args.quality_prompts)])
    guided = write_prompts(args.out / "prompts" / "eval-guided.jsonl",
                           [p for c in GUIDED for p in suite("eval", c, args.guided_prompts)])
    name = model_name(fraction)
    pair = {CONTROL: models[CONTROL], name: models[name]}
    dirs = {"quality": timer.run("eval quality", audit, args, "eval-quality", pair,
                                 [{"name": "cfg", "scale": BASE_SCALE}], quality, args.quality_seeds,
                                 f"{CONTROL} / cfg", True)}
    for label, path in pair.items():
        dirs[label] = timer.run(f"eval guidance {label}", audit, args, f"eval-guidance-{label}", {label: path},
                                curves(), guided, args.guided_seeds, f"cfg scale={BASE_SCALE}", False)
    return dirs


# --- stage 4: the report --------------------------------------------------------------------------------------


def quality_report(args: argparse.Namespace, name: str) -> dict[str, Any]:
    q_dir = args.out / "audits" / "eval-quality"
    q_arms, cats = arms(q_dir), categories_of(args.out / "prompts" / "eval-quality.jsonl")
    split = {m: by_category(q_arms[f"{m} / cfg"], cats, CATEGORIES) for m in (CONTROL, name)}
    out: dict[str, Any] = {"models": {}, "partial_vs_control": {}}
    summary = json.loads((q_dir / "summary.json").read_text())
    for a in summary["arms"]:
        model = a["label"].removesuffix(" / cfg")
        out["models"][model] = {c: accuracy(arm) for c, arm in split[model].items()}
        out["models"][model]["scs"] = (a["measures"].get("scs") or {})
    for c in (*CATEGORIES, "all"):
        out["partial_vs_control"][c] = paired(split[CONTROL][c], split[name][c])
    with_holm([out["partial_vs_control"][c] for c in CATEGORIES])
    cmp_ = summary["comparisons"].get(f"{name} / cfg", {}).get("scs")
    out["scs_partial_vs_control"] = None if not cmp_ else {k: cmp_.get(k) for k in ("n_pairs", "difference", "ci",
                                                                                    "p", "test")}
    return out


def curve_report(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Accuracy of every arm and the paired tests of both curves, pooled over binding and relation and per
    category; Holm over the three points of each curve (pooled), and over the six per-category tests."""
    g_dir = args.out / "audits" / f"eval-guidance-{model}"
    g_arms, cats = arms(g_dir), categories_of(args.out / "prompts" / "eval-guided.jsonl")
    split = {label: by_category(arm, cats, GUIDED) for label, arm in g_arms.items()}
    cfg = {s: find(g_dir, "cfg", scale=s) for s in SCALES}
    points = {"concept": [(f"concept_scale {cs:g}", cfg[BASE_SCALE], find(g_dir, "concept", concept_scale=cs))
                          for cs in CONCEPT_SCALES],
              "scfg": [(f"scale {s:g}", cfg[s], find(g_dir, "scfg", scale=s)) for s in SCALES]}
    accuracies = {label: {c: accuracy(a) for c, a in parts.items()} for label, parts in split.items()}
    out: dict[str, Any] = {"arms": accuracies, "curves": {}}
    for method, rows in points.items():
        curve = []
        for point, base, arm in rows:
            curve.append({"point": point, "baseline": base, "arm": arm,
                          **{c: paired(split[base][c], split[arm][c]) for c in (*GUIDED, "all")}})
        with_holm([r["all"] for r in curve])
        with_holm([r[c] for r in curve for c in GUIDED])
        out["curves"][method] = curve
    return out


def per_prompt_gain(base: Any, arm: Any) -> dict[str, float]:
    """Prompt -> accuracy of ``arm`` minus accuracy of ``base`` over the seeds judged in both."""
    gains: dict[str, list[float]] = defaultdict(list)
    for key, info in base.images.items():
        other = arm.images.get(key)
        if other is not None and info.correct is not None and other.correct is not None:
            gains[key[0]].append(float(other.correct) - float(info.correct))
    return {p: float(np.mean(v)) for p, v in gains.items()}


def hypothesis(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Concept guidance's gain over CFG per prompt, partial vs control (Wilcoxon over prompts, Holm over the
    strengths); held when some strength is significantly better on the partial model and none worse."""
    gains = {}
    for model in (CONTROL, name):
        g_dir = args.out / "audits" / f"eval-guidance-{model}"
        g_arms = arms(g_dir)
        base = g_arms[find(g_dir, "cfg", scale=BASE_SCALE)]
        gains[model] = {cs: per_prompt_gain(base, g_arms[find(g_dir, "concept", concept_scale=cs)])
                        for cs in CONCEPT_SCALES}
    tests = []
    for cs in CONCEPT_SCALES:
        a, b = gains[CONTROL][cs], gains[name][cs]
        if len(set(a) & set(b)) < 2:
            tests.append({"concept_scale": cs, "note": "fewer than 2 prompts judged in both models", "p": None})
            continue
        r = compare_scores(a, b, names=(CONTROL, name), intersection=True)
        tests.append({"concept_scale": cs, "prompts": r["n_pairs"], "control_gain": float(np.mean(list(a.values()))),
                      "partial_gain": float(np.mean(list(b.values()))), "difference": r["difference"]["mean"],
                      "ci": [r["difference"]["bootstrap_ci"]["low"], r["difference"]["bootstrap_ci"]["high"]],
                      "p": r["wilcoxon"]["p"], "warnings": r["warnings"]})
    with_holm(tests)
    better = [t for t in tests if t.get("p_holm") is not None and t["p_holm"] < ALPHA and t["difference"] > 0]
    worse = [t for t in tests if t.get("p_holm") is not None and t["p_holm"] < ALPHA and t["difference"] < 0]
    return {"tests": tests, "held": bool(better) and not worse,
            "rule": "held when the partial model's per-prompt concept-guidance gain over CFG 3.5 exceeds the "
                    "control's at some concept_scale (Wilcoxon over prompts, Holm over the three, p < 0.05) and "
                    "is significantly smaller at none"}


def decision(quality: dict[str, Any], curves_partial: dict[str, Any], name: str) -> dict[str, Any]:
    models = quality["models"]
    drops = {c: models[name][c]["accuracy"] - models[CONTROL][c]["accuracy"] for c in ("single", "count")}
    within = all(abs(d) <= QUALITY_POINTS + 1e-12 for d in drops.values())
    family = [(method, r["point"], dict(r["all"] or {})) for method, rows in curves_partial["curves"].items()
              for r in rows]
    adjusted = holm([r.get("p") for _, _, r in family])
    helps = [{"method": m, "point": pt, "difference": r["difference"], "p": r["p"], "p_holm_6": p}
             for (m, pt, r), p in zip(family, adjusted, strict=True)
             if p is not None and p < ALPHA and r["difference"] > 0]
    return {"single_count_vs_control": drops, "within_3_points": within, "helping_points": helps,
            "ship": within and bool(helps),
            "rule": "ship the partial-caption weights as `shapes` only if single and count accuracy are within 3 "
                    "points of the control and S-CFG or concept guidance helps the partial model at some point of "
                    "its curve (binding and relation pooled, exact McNemar, Holm over the six points, p < 0.05)"}


def report(args: argparse.Namespace) -> dict[str, Any]:
    choice = json.loads((args.out / "selection.json").read_text())
    name = model_name(choice["fraction"])
    quality = quality_report(args, name)
    curves_ = {m: curve_report(args, m) for m in (CONTROL, name)}
    result = {"partial_model": name, "selection": choice, "quality": quality, "guidance": curves_,
              "hypothesis": hypothesis(args, name), "decision": decision(quality, curves_[name], name),
              "training": training_records(args)}
    write_report(args.out, result, args, markdown)
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _acc(s: dict[str, Any]) -> str:
    lo, hi = s["wilson95"]
    return f"{_pct(s['accuracy'])} [{_pct(lo)}, {_pct(hi)}] (n {s['n']})"


def _test(r: dict[str, Any] | None, holm_key: str = "p_holm") -> str:
    if not r:
        return "n/a"
    lo, hi = r["ci"]
    holm_p = f", Holm {r[holm_key]:.3g}" if r.get(holm_key) is not None else ""
    return (f"{100 * r['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], p {r['p']:.3g}{holm_p} "
            f"({r['arm_only_correct']} / {r['base_only_correct']})")


def markdown(result: dict[str, Any]) -> str:
    name, q = result["partial_model"], result["quality"]
    steps = min(r["unet_steps"] for r in result["training"].values())
    images = min(a["all"]["n"] for a in result["guidance"][name]["arms"].values())
    smoke = steps < 100 or images < 40
    lines = [f"# Partial captions: {name} vs {CONTROL}", ""]
    if smoke:
        lines += [f"SMOKE RUN ({steps} training steps, {images} images per guidance arm): the numbers below prove "
                  "that every stage runs; they are not results.", ""]
    lines += [f"Fraction: {result['selection']['fraction']:g} ({result['selection']['why']}).", "",
              "## Accuracy under CFG 3.5 (eval split)", "",
              "| category | " + f"{CONTROL} % [Wilson 95 %] | {name} % | {name} - {CONTROL}, pts [95 %], McNemar p, "
              "Holm (partial only / control only) |", "|---|---|---|---|"]
    for c in (*CATEGORIES, "all"):
        lines.append(f"| {c} | {_acc(q['models'][CONTROL][c])} | {_acc(q['models'][name][c])} | "
                     f"{_test(q['partial_vs_control'][c])} |")
    for m in (CONTROL, name):
        scs = q["models"][m].get("scs") or {}
        text = "n/a" if not scs else f"{scs['mean']:.2f} [{scs['low']:.2f}, {scs['high']:.2f}] over {scs['n']} prompts"
        lines.append(f"\nSCS {m}: {text}")
    if s := q.get("scs_partial_vs_control"):
        lines.append(f"\nSCS {name} - {CONTROL}: {s['difference']:+.2f} [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}], "
                     f"Wilcoxon p {s['p']:.3g} over {s['n_pairs']} prompts")
    for m in (CONTROL, name):
        g = result["guidance"][m]
        lines += ["", f"## Guidance curves, {m} (binding and relation, eval split)", "",
                  "| method | point | vs | binding + relation: diff pts [95 %], p, Holm (arm only / base only) | "
                  "binding | relation |", "|---|---|---|---|---|---|"]
        for method, rows in g["curves"].items():
            for r in rows:
                lines.append(f"| {method} | {r['point']} | {r['baseline']} | {_test(r['all'])} | {_test(r['binding'])}"
                             f" | {_test(r['relation'])} |")
        lines += ["", "| arm | binding + relation % | binding % | relation % |", "|---|---|---|---|"]
        for label, acc in g["arms"].items():
            lines.append(f"| {label} | {_acc(acc['all'])} | {_acc(acc['binding'])} | {_acc(acc['relation'])} |")
    h = result["hypothesis"]
    lines += ["", "## Hypothesis: exhaustive captions make concept guidance harmful", "",
              "| concept_scale | prompts | gain over CFG, control (pts) | gain, partial | partial - control [95 %] | "
              "Wilcoxon p | Holm |", "|---|---|---|---|---|---|---|"]
    for t in h["tests"]:
        if t.get("p") is None:
            lines.append(f"| {t['concept_scale']:g} | {t.get('note')} | | | | | |")
            continue
        lines.append(f"| {t['concept_scale']:g} | {t['prompts']} | {100 * t['control_gain']:+.1f} | "
                     f"{100 * t['partial_gain']:+.1f} | {100 * t['difference']:+.1f} [{100 * t['ci'][0]:+.1f}, "
                     f"{100 * t['ci'][1]:+.1f}] | {t['p']:.3g} | {t['p_holm']:.3g} |")
    d = result["decision"]
    lines += ["", f"Rule: {h['rule']}.", "", f"**The hypothesis {'held' if h['held'] else 'did not hold'}.**", "",
              "## Decision", "", f"Rule: {d['rule']}.", "",
              "Single / count vs control: " + ", ".join(f"{c} {100 * v:+.1f} pts" for c, v in
                                                        d["single_count_vs_control"].items())
              + f" ({'within' if d['within_3_points'] else 'not within'} 3 points).",
              "Guidance points that help the partial model (Holm over six): "
              + (", ".join(f"{x['method']} {x['point']} ({100 * x['difference']:+.1f} pts, Holm p {x['p_holm_6']:.3g})"
                           for x in d["helping_points"]) or "none") + ".", "",
              "**The rule says: " + ("ship the partial-caption weights as shapes" if d["ship"]
                                     else "keep the shipped weights") + ".**", ""]
    if d["ship"]:
        lines += [f"Next: copy `models/{name}/weights` and its `training.json` over `src/diffprobe/worlds/shapes/`,"
                  " then `python -m diffprobe.worlds.shapes.evaluate --per-category 150 --card"
                  " src/diffprobe/worlds/shapes` and `python examples/guidance_shapes.py` for the effect tables.", ""]
    else:
        lines += ["Next: keep today's weights and write this negative result, with these numbers, into "
                  "`docs/guidance.md`.", ""]
    lines.append("Training: " + "; ".join(
        f"{k}: {r['unet_steps']} steps of batch {r['batch']}, {r['seconds_total'] / 60:.1f} min on {r['device']} "
        f"({r['seconds_per_step']:.2f} s per step, loading and saving included)" for k, r in result["training"].items())
        + ".")
    return "\n".join(lines) + "\n"


# --- entry point ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/partial_captions"))
    parser.add_argument("--train", action="store_true", help="stage 1: the continuations")
    parser.add_argument("--select", action="store_true", help="stage 2: choose the fraction on the train split")
    parser.add_argument("--final", action="store_true", help="stage 3 on the eval split, then the report")
    parser.add_argument("--report", action="store_true", help="stage 4 only, from finished runs")
    g = parser.add_argument_group("continuations (the same for every fraction and the control)")
    g.add_argument("--fractions", type=float, nargs="+", default=[0.5],
                   help="candidate partial-caption fractions; several are chosen between on the train split")
    g.add_argument("--steps", type=int, default=1700, help="UNet + text-encoder steps of each continuation")
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--warmup", type=int, default=50)
    g.add_argument("--ema", type=float, default=0.998)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--workers", type=int, default=1, help="DataLoader workers that lay out scenes")
    g.add_argument("--device", default=None, help="training device (default: a GPU if there is one)")
    g = parser.add_argument_group("train split (--select, several fractions only)")
    g.add_argument("--select-quality-prompts", type=int, default=40, help="train prompts per category, single/count")
    g.add_argument("--select-guided-prompts", type=int, default=30, help="train prompts per category, binding/relation")
    g.add_argument("--select-seeds", type=int, default=2)
    g = parser.add_argument_group("eval split")
    g.add_argument("--quality-prompts", type=int, default=50, help="eval prompts per category (all four)")
    g.add_argument("--quality-seeds", type=int, default=4, help="seeds per prompt (SCS needs at least 2)")
    g.add_argument("--guided-prompts", type=int, default=60, help="eval prompts per category, binding and relation")
    g.add_argument("--guided-seeds", type=int, default=2)
    g.add_argument("--embedder", default="auto", help="SCS embedder (diffprobe score scs --embedder)")
    g = parser.add_argument_group("sampling")
    g.add_argument("--sample-batch", type=int, default=16)
    g.add_argument("--sampler-steps", type=int, default=None, help="denoising steps (default: the model's 25)")
    args = parser.parse_args()
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions: each fraction must lie in (0, 1]")
    if args.quality_seeds < 2:
        parser.error("--quality-seeds: SCS needs at least 2 seeds per prompt")
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(args.out / "timing.json")
    everything = not (args.train or args.select or args.final or args.report)
    if args.train or args.select or args.final or everything:
        models = train_all(args, timer)
    if args.select or args.final or everything:
        fraction = select(args, models, timer)
    if args.final or everything:
        final(args, models, fraction, timer)
    if args.final or args.report or everything:
        report(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: finished continuations, checkpoints, images and verdicts are kept; run the same "
                 "command to resume")
