"""DiADM on Fashion-MNIST: do pseudo-labels (each training image's own feature as its condition) raise diversity
(IRS-inf,a) without hurting quality (Fréchet distance), against the unconditional and the class-conditional model?

    OMP_NUM_THREADS=1 python examples/diadm_fashion_mnist.py --out results/diadm   # every stage; a re-run resumes

The defaults are the full run, sized for about 45 minutes on one idle CPU core (docs/diadm.md, "Cost").

Stages, each through the project's CLI or library (so each is resumable: the models keep checkpoints, the
samples live in run stores, features in one feature cache under OUT/cache, and a finished stage is skipped):

1. data: a seeded subset of the Fashion-MNIST train split (the training set, N images) and of the t10k split (the
   real test set), written once as PNG folders with one subfolder per class (``fashion-mnist:train:N``).
2. ``diffprobe train diadm`` three times, uncond / pseudocond / class: the same UNet, steps, batch, learning rate
   and seed. Pseudo-labels are the features of ``--cond-embedder``.
3. ``diffprobe sample diadm``: one image per training image (seed = index) for each model, and the pseudocond
   model once more with the features of the held-out test images (``--features-from``).
4. ``diffprobe score irs`` (IRS-inf,a against the real test split, one-sided 5 % bounds) and ``diffprobe score fd``
   (Fréchet distance and KID against the test split) on ``--eval-embedder`` features; the same for the real
   training images as the reference row.
5. Nearest-neighbour distances of every sample to the training set (evaluation features and raw pixels) beside
   those of the real test images, the near-copy fraction, and for pseudocond how often a sample's nearest training
   image is the very image it was conditioned on (replay).
6. ``OUT/report.md`` and ``OUT/report.json``.

Every setting is fixed in advance (the defaults below); the test split is used only for evaluation and for the
held-out conditions, never to choose anything. Needs the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from experiment import Timer, cli  # examples/experiment.py
from PIL import Image

from diffprobe.diadm.data import dataset_folder
from diffprobe.embed import FeatureCache, embed_files, get_embedder
from diffprobe.metrics.images import load_features
from diffprobe.metrics.memorisation import distance_summary, nearest_distances
from diffprobe.store import open_run

MODES = ("uncond", "pseudocond", "class")
ARMS = {  # run name -> (model, sampled with the features of held-out test images)
    "uncond": ("uncond", False),
    "class": ("class", False),
    "pseudocond": ("pseudocond", False),
    "pseudocond-test": ("pseudocond", True),
}
LABELS = {
    "uncond": "unconditional",
    "class": "class-conditional (true labels)",
    "pseudocond": "DiADM pseudocond (training features)",
    "pseudocond-test": "DiADM pseudocond (held-out test features)",
    "real": "real test images (IRS); real training images vs test (FD)",
}


def train(a: argparse.Namespace, mode: str) -> None:
    model = a.out / "models" / mode
    if (model / "diadm.json").is_file():
        print(f"model {mode}: {model} is trained, kept")
        return
    cli("train", "diadm", "--images", f"fashion-mnist:train:{a.train_size}", "--cond", mode,
        "--embedder", a.cond_embedder, "--resolution", str(a.resolution), "--channels", "1",
        "--width", str(a.width), "--steps", str(a.steps), "--batch-size", str(a.batch), "--lr", str(a.lr),
        "--warmup", str(a.warmup), "--checkpoint-every", str(a.checkpoint_every), "--seed", str(a.seed),
        "--device", a.device, "--cache-dir", str(a.out / "cache"), "--out", str(model))


def sample(a: argparse.Namespace, arm: str, test: Path) -> None:
    mode, held_out = ARMS[arm]
    run = a.out / "runs" / arm
    if (run / "run.sqlite").is_file():
        with open_run(run) as store:
            if len(store) == (a.test_size if held_out else a.train_size):
                print(f"run {arm}: {run} is complete, kept")
                return
    extra = ["--features-from", str(test)] if held_out else []
    cli("sample", "diadm", str(a.out / "models" / mode), "--out", str(run), "--steps",
        str(a.sampler_steps), "--batch-size", str(a.sample_batch), "--device", a.device, "--cache-dir",
        str(a.out / "cache"), "-q", *extra)


def score(a: argparse.Namespace, name: str, images: Path, train_dir: Path, test: Path, irs: bool = True) -> None:
    scores = a.out / "scores"
    common = ["--embedder", a.eval_embedder, "--device", a.device, "--cache-dir", str(a.out / "cache")]
    if irs and not (scores / f"{name}-irs.json").is_file():
        cli("score", "irs", str(images), "--train", str(train_dir), "--test", str(test), *common,
            "--out", str(scores / f"{name}-irs.json"))
    if not (scores / f"{name}-fd.json").is_file():
        cli("score", "fd", str(images), "--ref", str(test), *common, "--kid-subsets", str(a.kid_subsets),
            "--out", str(scores / f"{name}-fd.json"))


def pixels(paths: list[Path]) -> np.ndarray:
    """Grayscale pixels in [0, 1], one row per image."""
    return np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32).ravel() / 255.0 for p in paths])


def run_samples(run_dir: Path) -> tuple[list[Path], list[str], list[dict]]:
    """Image paths, hashes and records of a run, in seed (= condition index) order."""
    with open_run(run_dir) as run:
        samples = sorted(run.samples(), key=lambda s: s.seed)
    return [s.image_path for s in samples], [s.image_sha256 for s in samples], [s.records for s in samples]


def memorisation(a: argparse.Namespace, train_dir: Path, test: Path) -> dict:
    """Nearest-training-image distances per arm (evaluation features and pixels), against the real test images'."""
    cache = FeatureCache.for_location(cache_dir=a.out / "cache")
    embedder = get_embedder(a.eval_embedder, device=None if a.device == "auto" else a.device)
    from diffprobe.diadm.data import read_training_images

    train_images, test_images = read_training_images(train_dir), read_training_images(test)
    feats = {"train": load_features(train_dir, embedder, cache=cache)[0],
             "test": load_features(test, embedder, cache=cache)[0]}
    pix = {"train": pixels(train_images.paths), "test": pixels(test_images.paths)}
    records: dict[str, list[dict]] = {}
    for arm in ARMS:
        paths, shas, records[arm] = run_samples(a.out / "runs" / arm)
        feats[arm] = embed_files(embedder, paths, cache=cache, shas=shas)
        pix[arm] = pixels(paths)
    cache.close()
    out: dict[str, Any] = {}
    ref = {space: nearest_distances(data["train"], data["test"])[1] for space, data in (("features", feats),
                                                                                      ("pixels", pix))}
    out["real-test"] = {space: distance_summary(ref[space], ref[space]) for space in ref}
    row_of = {name: i for i, name in enumerate(train_images.relative())}
    test_row = {f"{test.name}/{name}": i for i, name in enumerate(test_images.relative())}
    for arm in ARMS:
        row: dict[str, Any] = {}
        for space, data in (("features", feats), ("pixels", pix)):
            idx, dist = nearest_distances(data["train"], data[arm])
            row[space] = distance_summary(dist, ref[space])
            if arm == "pseudocond":  # is the nearest training image the one the sample was conditioned on?
                own = [row_of[r["image"]] for r in records[arm]]
                row[space]["replay_fraction"] = float(np.mean(idx == np.array(own)))
            if arm == "pseudocond-test":  # closer to its own (held-out) condition image than to any training image?
                own = data["test"][[test_row[r["image"]] for r in records[arm]]]
                to_own = np.linalg.norm(data[arm].astype(np.float64) - own, axis=1)
                row[space]["follows_condition_fraction"] = float(np.mean(to_own < dist))
        out[arm] = row
    return out


def report(a: argparse.Namespace, timing: dict, memo: dict) -> dict:
    scores = a.out / "scores"
    rows = []
    for name in ARMS:
        irs = json.loads((scores / f"{name}-irs.json").read_text())
        fd = json.loads((scores / f"{name}-fd.json").read_text())
        adj, snth = irs["adjusted"], irs["adjusted"]["snth"]["mean"]
        rows.append({
            "arm": name, "label": LABELS[name], "images": irs["synthetic"]["n_sampled"],
            "irs_inf": snth["irs_inf"], "irs_inf_l": snth["irs_inf_l"], "irs_inf_u": snth["irs_inf_u"],
            "irs_inf_a": adj["irs_adjusted"], "irs_inf_a_sd": adj["irs_adjusted_sd"], "chunks": adj["snth"]["n_chunks"],
            "irs_inf_real_test": adj["test"]["irs_inf"], "fd": fd["fd"],
            "kid": fd["kid"]["kid"] if fd.get("kid") else None, "nn": memo.get(name),
        })
    # the reference: the real test split is IRS-inf,a = 1 by definition; its FD is the training images' against it
    test_irs = rows[0]["irs_inf_real_test"]
    test_bounds = json.loads((scores / "uncond-irs.json").read_text())["adjusted"]["test"]
    fd = json.loads((scores / "real-train-fd.json").read_text())
    rows.append({"arm": "real", "label": LABELS["real"], "images": test_bounds["n_sampled"], "irs_inf": test_irs,
                 "irs_inf_l": test_bounds["irs_inf_l"], "irs_inf_u": test_bounds["irs_inf_u"], "irs_inf_a": 1.0,
                 "irs_inf_a_sd": None, "chunks": 1, "irs_inf_real_test": test_irs, "fd": fd["fd"],
                 "kid": fd["kid"]["kid"] if fd.get("kid") else None, "nn": memo.get("real-test")})
    cards = {m: json.loads((a.out / "models" / m / "diadm.json").read_text()) for m in MODES}
    sampled = {arm: _sampling_seconds(a.out / "runs" / arm) for arm in ARMS}
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "eval_embedder": a.eval_embedder, "cond_embedder": a.cond_embedder,
        "n_train": rows[0]["images"] if rows else None,
        "rows": rows, "nn_real_test": memo.get("real-test"),
        "training": {m: {"steps": c["steps"], "batch": c["options"]["batch"], "images_seen": c["images_seen"],
                         "parameters": c["parameters"], "seconds_per_step": c["seconds_per_step_this_call"],
                         "seconds": c["seconds_this_call"]} for m, c in cards.items()},
        "sampling_seconds_per_image": sampled,
        "timing_s": timing,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "notes": [
            "FD is the Fréchet distance of Gaussian fits of the evaluation embedder's features against the real test "
            "split; it is not comparable with Inception FID numbers.",
            "IRS bounds are one-sided at 5 % each (about a 90 % interval), for the mean over synthetic chunks.",
            "IRS-inf,a = IRS-inf(samples) / IRS-inf(real test split), both against the training images.",
        ],
    }
    (a.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "report.md").write_text(markdown(result))
    return result


def _sampling_seconds(run_dir: Path) -> float | None:
    """Seconds per sampled image, as `diffprobe sample diadm` records them in the run (summed over its calls)."""
    from diffprobe.diadm.sample import TIMING_META

    with open_run(run_dir) as run:
        spent = run.get_meta(TIMING_META)
    return spent["seconds"] / spent["images"] if spent and spent["images"] else None


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# DiADM on Fashion-MNIST",
        "",
        f"Training set: {s['train_size']} Fashion-MNIST training images (seeded subset); real test set: "
        f"{s['test_size']} t10k images. Models: the same UNet (width {s['width']}, {s['resolution']} px, grayscale), "
        f"{s['steps']} steps x batch {s['batch']}, lr {s['lr']}, seed {s['seed']}; DDIM {s['sampler_steps']} steps.",
        f"Pseudo-labels: `{r['cond_embedder']}` features. Evaluation features: `{r['eval_embedder']}` (IRS and FD).",
        "",
        "| model | images | IRS∞ [bounds] | IRS∞,a | FD vs test | KID | NN dist. (feat.) / real | near-copies | "
        "replay / follows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        nn = row["nn"] or {}
        feat = nn.get("features", {})
        sd = f" ± {row['irs_inf_a_sd']:.3f}" if row["irs_inf_a_sd"] is not None else ""
        kid = f"{row['kid']:.4f}" if row["kid"] is not None else "n/a"
        ratio = f"{feat['median_over_reference']:.2f}" if feat else "n/a"
        copies = f"{feat['near_copy_fraction']:.3f}" if feat else "n/a"
        replay = next((f"{feat[k]:.3f}" for k in ("replay_fraction", "follows_condition_fraction") if k in feat), "")
        lines.append(f"| {row['label']} | {row['images']} | {row['irs_inf']:.3f} [{row['irs_inf_l']:.3f}, "
                     f"{row['irs_inf_u']:.3f}] | {row['irs_inf_a']:.3f}{sd} | {row['fd']:.3f} | {kid} | {ratio} | "
                     f"{copies} | {replay} |")
    real = r["rows"][0]["irs_inf_real_test"] if r["rows"] else None
    lines += [
        "",
        f"IRS∞ of the real test split against the training images: {real:.3f} (the denominator of IRS∞,a).",
        "IRS∞,a: mean ± SD over synthetic chunks of the test split's size; bounds: one-sided 5 % each.",
        "FD: Fréchet distance on the evaluation features against the real test split; not comparable with "
        "Inception FID.",
        "NN dist. / real: median distance of a sample to its nearest training image over the same median for the "
        "real test images (below 1: closer to the training set than new real images are). Near-copies: fraction "
        "of samples closer to the training set than the 1 % quantile of the real test images' distances. Replay: "
        "fraction of pseudocond samples whose nearest training image is the image they were conditioned on. "
        "Follows (held-out conditions): fraction of samples closer to their own test image than to every training "
        "image.",
        "",
        "Pixel-space nearest-neighbour distances (raw grayscale pixels in [0, 1]):",
        "",
        "| model | median | / real | near-copies | replay / follows |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        px = (row["nn"] or {}).get("pixels")
        if px:
            own = next((f"{px[k]:.3f}" for k in ("replay_fraction", "follows_condition_fraction") if k in px), "")
            lines.append(f"| {row['label']} | {px['median']:.3f} | {px['median_over_reference']:.2f} | "
                         f"{px['near_copy_fraction']:.3f} | {own} |")
    lines += ["", "## Cost", "", "| model | steps x batch | s / training step | s / sampled image |",
              "|---|---|---|---|"]
    for m, t in r["training"].items():
        per = r["sampling_seconds_per_image"].get(m)
        lines.append(f"| {m} | {t['steps']} x {t['batch']} | {t['seconds_per_step']:.3f} | "
                     + (f"{per:.3f} |" if per else "n/a |"))
    lines += ["", f"Wall seconds per stage (OMP_NUM_THREADS={r['threads']}): "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["timing_s"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-size", type=int, default=2000, help="training images N (seeded subset)")
    ap.add_argument("--test-size", type=int, default=1000, help="real test images (seeded subset of t10k)")
    ap.add_argument("--resolution", type=int, default=28, help="model size in pixels (Fashion-MNIST is 28)")
    ap.add_argument("--width", type=int, default=16, help="UNet channels of the first level")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler-steps", type=int, default=20)
    ap.add_argument("--sample-batch", type=int, default=100)
    ap.add_argument("--kid-subsets", type=int, default=20, help="KID subsets per score (100 cost 40 CPU-s each)")
    ap.add_argument("--cond-embedder", default="efficientnet-lite1@64",
                    help="features of the pseudo-labels (not the evaluation's network, as the paper conditions on "
                         "Inception and evaluates with SwAV)")
    ap.add_argument("--eval-embedder", default="efficientnet-lite0@64",
                    help="features of IRS, FD and the feature-space distances (the IRS example's, at 64 px)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(a.out / "timing.json")
    cache = a.out / "cache"
    train_dir = timer.run("data", dataset_folder, f"fashion-mnist:train:{a.train_size}", cache)
    test = timer.run("data", dataset_folder, f"fashion-mnist:test:{a.test_size}", cache)
    for mode in MODES:
        timer.run(f"train {mode}", train, a, mode)
    for arm in ARMS:
        timer.run(f"sample {arm}", sample, a, arm, test)
    for arm in ARMS:
        timer.run(f"score {arm}", score, a, arm, a.out / "runs" / arm, train_dir, test)
    timer.run("score real-train", score, a, "real-train", train_dir, train_dir, test, False)
    memo_file = a.out / "scores" / "nearest.json"
    if not memo_file.is_file():
        memo_file.write_text(json.dumps(timer.run("nearest neighbours", memorisation, a, train_dir, test), indent=2))
    result = report(a, timer.data, json.loads(memo_file.read_text()))
    print((a.out / "report.md").read_text())
    print(f"wrote {a.out / 'report.md'} and {a.out / 'report.json'} ({len(result['rows'])} rows)")


if __name__ == "__main__":
    main()
