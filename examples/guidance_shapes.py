"""Does S-CFG or concept guidance make the shapes model more compositionally correct than CFG?

    python examples/guidance_shapes.py                       # 3 categories x 25 prompts x 4 seeds = 300 images/arm
    python examples/guidance_shapes.py --prompts 50 --seeds 4 --out results/guidance_shapes

Arms: CFG, S-CFG (official-code defaults) and concept guidance (V0 defaults, concepts from spaCy noun chunks;
``concept-grammar`` takes the gold noun phrases from the grammar instead), all at the same guidance scale, steps,
scheduler and seeds: every (prompt, seed) pair
is sampled once per arm from identical initial noise. Prompts: the shapes world's eval split, categories
``binding`` (attribute binding), ``count`` and ``relation`` (spatial). Every image is checked by the exact shapes
judge.

Reported per arm (and per category): accuracy with a 95 % Wilson interval; versus CFG, the paired difference with
a 95 % bootstrap interval that resamples prompts (seeds of one prompt are not independent), the exact McNemar
test on the (prompt, seed) pairs, and the Wilcoxon signed-rank test on per-prompt accuracies. SCS per arm (mean over
prompts of the mean pairwise cosine x 100 across seeds, efficientnet-lite0 features unless --embedder) with the
paired Wilcoxon test against CFG. Everything lands in ``OUT/results.json`` and ``OUT/images.jsonl``; the table is
printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from diffprobe.guidance import CFG, Guider
from diffprobe.guidance.concept import ConceptGuidance
from diffprobe.guidance.scfg import SCFG
from diffprobe.metrics.stats import bootstrap_mean_ci, compare_scores
from diffprobe.models import load_model
from diffprobe.sampling import sample
from diffprobe.worlds.shapes.grammar import prompts as shapes_prompts

CATEGORIES = ("binding", "count", "relation")


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test on paired booleans: only discordant pairs count."""
    only_b, only_a = int((b & ~a).sum()), int((a & ~b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(stats.binomtest(only_b, n, 0.5).pvalue)
    return {"b_only_correct": only_b, "a_only_correct": only_a, "p": p}


def cluster_bootstrap_diff(rows_a: list[dict], rows_b: list[dict], n_boot: int = 10000) -> tuple[float, float, float]:
    """Mean accuracy difference B - A with a percentile CI that resamples prompts (paired rows share the prompt)."""
    per_prompt: dict[str, list[float]] = defaultdict(list)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        per_prompt[ra["prompt_id"]].append(float(rb["correct"]) - float(ra["correct"]))
    d = np.array([np.mean(v) for v in per_prompt.values()])
    lo, hi = bootstrap_mean_ci(d, n_boot=n_boot)
    return float(d.mean()), lo, hi


ARMS = ("cfg", "scfg", "concept", "concept-grammar")


def make_arms(names: list[str], scale: float, grammar_concepts: dict[str, list[str]]) -> dict[str, Guider]:
    """``concept`` extracts noun phrases with spaCy (the default); ``concept-grammar`` uses the gold phrases."""
    makers = {
        "cfg": lambda: CFG(scale=scale),
        "scfg": lambda: SCFG(scale=scale),
        "concept": lambda: ConceptGuidance(scale=scale, extractor="spacy"),
        "concept-grammar": lambda: ConceptGuidance(scale=scale, extractor=_Lookup(grammar_concepts)),
    }
    return {name: makers[name]() for name in names}


class _Lookup:
    """Concepts straight from the grammar's question objects ("a red circle"), i.e. gold noun phrases."""

    name = "grammar"

    def __init__(self, table: dict[str, list[str]]):
        self.table = table

    def __call__(self, prompt: str) -> list[str]:
        return list(self.table[prompt])


def pid(p: Any) -> str:
    """A prompt's identity in the suite (two prompts may share a caption)."""
    return f"{p.category}/{p.index}"


def gold_phrases(p: Any) -> list[str]:
    q = p.question
    if q.kind == "count":
        return [p.caption.removeprefix("there are ").split(" on a ")[0]]
    return [f"a {obj}" for obj in q.objects]


def load_judge() -> Any:
    from diffprobe.judges import make_judge

    return make_judge("shapes")


def run_arm(adapter: Any, guider: Guider, jobs: list[tuple[Any, int]], args: argparse.Namespace) -> list[dict]:
    """Sample every (prompt, seed) job; batches hold prompts with equal branch counts."""
    groups: dict[int, list[tuple[Any, int]]] = defaultdict(list)
    for p, seed in jobs:
        groups[len(guider.branches(p.caption))].append((p, seed))
    out: dict[tuple[str, int], dict] = {}
    for group in groups.values():
        for i in range(0, len(group), args.batch):
            chunk = group[i : i + args.batch]
            res = sample(adapter, guider, [p.caption for p, _ in chunk], [s for _, s in chunk], steps=args.steps)
            for (p, seed), image, record in zip(chunk, res.images, res.records, strict=True):
                out[(pid(p), seed)] = {"prompt_obj": p, "seed": seed, "image": image, "record": record}
    return [out[(pid(p), seed)] for p, seed in jobs]  # job order, identical across arms


def arm_category(
    adapter: Any, judge: Any, name: str, guider: Guider, jobs: list[tuple[Any, int]], folder: Path, args: Any
) -> tuple[list[dict], list[Any]]:
    """Rows and images of one arm and category: loaded from ``folder`` when a finished run is there, else made."""
    from PIL import Image

    done_file = folder / "rows.jsonl"
    if done_file.is_file():
        rows = [json.loads(line) for line in done_file.read_text().splitlines()]
        if [(r["prompt"], r["seed"]) for r in rows] == [(p.caption, s) for p, s in jobs]:
            return rows, [Image.open(folder / f"{i:05d}.png").convert("RGB") for i in range(len(rows))]
    t0 = time.perf_counter()
    done = run_arm(adapter, guider, jobs, args)
    seconds = (time.perf_counter() - t0) / max(len(done), 1)
    verdicts = judge.judge_many([d["image"] for d in done], [d["prompt_obj"].question for d in done])
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, (d, v) in enumerate(zip(done, verdicts, strict=True)):
        p = d["prompt_obj"]
        rec = {k: d["record"][k] for k in ("concepts", "mode", "benchmark") if k in d["record"]}
        rows.append(
            {
                "arm": name,
                "category": p.category,
                "prompt": p.caption,
                "seed": d["seed"],
                "correct": bool(v.correct),
                "answer": v.answer,
                "reason": v.reason,
                "seconds_per_image": seconds,
                **rec,
            }
        )
        d["image"].save(folder / f"{i:05d}.png")
    done_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"  {name}/{jobs[0][0].category if jobs else '-'}: {len(rows)} images, {seconds:.2f} s/image", flush=True)
    return rows, [d["image"] for d in done]


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module="scipy")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--prompts", type=int, default=25, help="prompts per category")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (the same for every arm)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (the shapes model's evaluation setting)")
    parser.add_argument("--scale", type=float, default=5.0, help="guidance scale, the same for every arm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--arms", default="cfg,scfg,concept", help=f"comma-separated, from {', '.join(ARMS)}; cfg first"
    )
    parser.add_argument("--embedder", default="efficientnet-lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="results/guidance_shapes")
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="subset to sample (with --sample-only)")
    parser.add_argument(
        "--sample-only",
        action="store_true",
        help="sample and judge the arms, skip the statistics "
        "(to fill OUT in several processes; a later run without it loads what is there)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if any(c not in CATEGORIES for c in categories) or (not args.sample_only and categories != list(CATEGORIES)):
        parser.error(f"--categories must name some of {', '.join(CATEGORIES)}; all of them unless --sample-only")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(args.model, device=args.device)
    judge = load_judge()
    suite = [p for c in categories for p in shapes_prompts("eval", c, n=args.prompts)]
    jobs = [(p, s) for p in suite for s in range(args.seeds)]
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    if (names[:1] != ["cfg"] and not args.sample_only) or any(n not in ARMS for n in names):
        parser.error(f"--arms must start with cfg and name only {', '.join(ARMS)}")
    arms = make_arms(names, args.scale, {p.caption: gold_phrases(p) for p in suite})

    rows: dict[str, list[dict]] = {}
    images: dict[str, list[Any]] = {}
    for name, guider in arms.items():
        rows[name], images[name] = [], []
        for cat in categories:
            cat_jobs = [(p, s) for p, s in jobs if p.category == cat]
            r, ims = arm_category(adapter, judge, name, guider, cat_jobs, out / "arms" / name / cat, args)
            rows[name] += r
            images[name] += ims
        acc = np.mean([r["correct"] for r in rows[name]])
        print(f"{name}: {len(rows[name])} images, accuracy {acc:.3f}", flush=True)
    if args.sample_only:
        return
    for name in arms:  # rows follow the job order; captions can repeat, so prompts are told apart by id
        for row, (p, _) in zip(rows[name], jobs, strict=True):
            row["prompt_id"] = pid(p)

    with open(out / "images.jsonl", "w") as f:
        for name in arms:
            for r in rows[name]:
                f.write(json.dumps(r) + "\n")

    # SCS per arm: groups = the seeds of one prompt
    from diffprobe.embed import get_embedder
    from diffprobe.metrics.scs import scs_per_prompt

    embedder = get_embedder(args.embedder, device=args.device if args.device != "auto" else None)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (p, _) in enumerate(jobs):
        groups[pid(p)].append(i)
    scs = {name: scs_per_prompt(embedder.embed(images[name]), dict(groups)) for name in arms}

    results: dict[str, Any] = {
        "settings": {
            **vars(args),
            "images_per_arm": len(jobs),
            "guiders": {n: g.config() for n, g in arms.items()},
            "embedder": embedder.describe(),
            "seconds_per_image": {n: float(np.mean([r["seconds_per_image"] for r in rows[n]])) for n in arms},
        },
        "arms": {},
    }
    table = [
        "| arm | category | n | accuracy [95% CI] | diff vs CFG [95% CI] | McNemar p | Wilcoxon p | SCS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in arms:
        entry: dict[str, Any] = {}
        for cat in ("all", *CATEGORIES):
            sel = [i for i, r in enumerate(rows[name]) if cat == "all" or r["category"] == cat]
            ok = np.array([rows[name][i]["correct"] for i in sel])
            lo, hi = wilson(int(ok.sum()), len(ok))
            e: dict[str, Any] = {"n": len(ok), "accuracy": float(ok.mean()), "wilson95": [lo, hi]}
            prompts_in = {rows[name][i]["prompt_id"] for i in sel}
            e["scs_mean"] = float(np.mean([scs[name][p] for p in prompts_in]))
            diff = "—"
            mc_p = wx_p = "—"
            if name != "cfg":
                base = np.array([rows["cfg"][i]["correct"] for i in sel])
                d, dlo, dhi = cluster_bootstrap_diff([rows["cfg"][i] for i in sel], [rows[name][i] for i in sel])
                e["diff_vs_cfg"] = {"mean": d, "bootstrap95_prompts": [dlo, dhi]}
                e["mcnemar"] = mcnemar_exact(base, ok)
                acc_a = {
                    p: np.mean([rows["cfg"][i]["correct"] for i in sel if rows["cfg"][i]["prompt_id"] == p])
                    for p in prompts_in
                }
                acc_b = {
                    p: np.mean([rows[name][i]["correct"] for i in sel if rows[name][i]["prompt_id"] == p])
                    for p in prompts_in
                }
                cmp_acc = compare_scores(acc_a, acc_b, names=("cfg", name))
                e["wilcoxon_per_prompt_accuracy_p"] = cmp_acc["wilcoxon"]["p"]
                cmp_scs = compare_scores(
                    {p: scs["cfg"][p] for p in prompts_in}, {p: scs[name][p] for p in prompts_in}, names=("cfg", name)
                )
                e["scs_vs_cfg"] = {
                    "mean_diff": cmp_scs["difference"]["mean"],
                    "wilcoxon_p": cmp_scs["wilcoxon"]["p"],
                    "bootstrap95": [
                        cmp_scs["difference"]["bootstrap_ci"]["low"],
                        cmp_scs["difference"]["bootstrap_ci"]["high"],
                    ],
                }
                diff = f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
                mc_p, wx_p = f"{e['mcnemar']['p']:.3g}", f"{e['wilcoxon_per_prompt_accuracy_p']:.3g}"
            entry[cat] = e
            scs_txt = f"{e['scs_mean']:.2f}"
            if "scs_vs_cfg" in e:
                scs_txt += f" (Δ {e['scs_vs_cfg']['mean_diff']:+.2f}, p {e['scs_vs_cfg']['wilcoxon_p']:.3g})"
            table.append(
                f"| {name} | {cat} | {len(ok)} | {ok.mean():.3f} [{lo:.3f}, {hi:.3f}] | {diff} | {mc_p} | "
                f"{wx_p} | {scs_txt} |"
            )
        results["arms"][name] = entry
    for name in arms:
        if name.startswith("concept"):
            counts: dict[int, int] = defaultdict(int)
            for r in rows[name]:
                counts[len(r.get("concepts", []))] += 1
            results["arms"][name]["concept_counts"] = dict(counts)
            print(f"{name}: images per number of concepts {dict(sorted(counts.items()))}")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(table))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
