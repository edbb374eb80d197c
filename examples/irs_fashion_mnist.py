"""IRS on real data: Fashion-MNIST as train/test, with synthetic "generators" of known diversity.

Two generator families, both scored with IRS-inf,a against the real test split (equal query counts, mean +- SD
over synthetic chunks):

* class fraction f: the generator returns held-out Fashion-MNIST images (not in the reference train set) from
  only round(10 f) of the 10 classes, so it covers about a fraction f of the data distribution;
* memorising fraction f: the generator returns copies of training images drawn uniformly from a random f N of
  them -- exactly the coupon-collector model behind IRS-inf, so IRS-inf should come out near f.

The paper reports IRS-inf,a rising near-linearly with the covered fraction. Features: efficientnet-lite0
(ImageNet, run offline) on images upsampled to --resolution; the paper used SwAV/Inception features.

Needs the Debian package ``dataset-fashion-mnist`` (files in /usr/share/datasets/fashion-mnist/).
Run: ``python examples/irs_fashion_mnist.py --cache-dir /tmp/fmnist`` (embeds about 24,000 images: roughly
8 CPU-minutes on 2 cores). Smaller query sets make IRS-inf noisy (try --train-size 6000 --test-size 600).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffprobe.embed import get_embedder
from diffprobe.metrics.irs import irs, irs_adjusted

DATA = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def embed(embedder, images: np.ndarray, cache: Path | None, label: str) -> np.ndarray:
    if cache is not None and cache.is_file():
        return np.load(cache)
    t0 = time.time()
    out = np.concatenate(
        [
            embedder.embed([Image.fromarray(im).convert("RGB") for im in images[i : i + 256]])
            for i in range(0, len(images), 256)
        ]
    )
    print(f"  embedded {len(images)} {label} images in {time.time() - t0:.0f} s", file=sys.stderr)
    if cache is not None:
        np.save(cache, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-size", type=int, default=10000, help="reference training images N")
    ap.add_argument("--test-size", type=int, default=2000, help="real test queries (= synthetic chunk size)")
    ap.add_argument("--chunks", type=int, default=2, help="synthetic chunks per generator (mean +- SD)")
    ap.add_argument("--resolution", type=int, default=64, help="embedder input size (Fashion-MNIST is 28x28)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None, help="keep features here between runs")
    args = ap.parse_args()

    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"]
    if not all((DATA / f).is_file() for f in files):
        sys.exit(f"Fashion-MNIST not found in {DATA}: install it with 'apt-get install dataset-fashion-mnist'")
    train_x, train_y = read_idx(DATA / files[0]), read_idx(DATA / files[1])
    test_x = read_idx(DATA / files[2])

    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(train_x))
    ref_idx, pool_idx = perm[: args.train_size], perm[args.train_size :]
    test_idx = rng.choice(len(test_x), args.test_size, replace=False)
    n_snth = args.test_size * args.chunks
    class_order = rng.permutation(10)
    # held-out pool images per class, enough for the smallest class set that contains the class
    need = {}
    for c in range(1, 11):
        for cls in class_order[:c]:
            need[cls] = max(need.get(cls, 0), -(-n_snth // c))
    pool_by_class = {cls: pool_idx[train_y[pool_idx] == cls][:count] for cls, count in need.items()}

    embedder = get_embedder("efficientnet-lite0", batch_size=128)
    embedder.preprocess = type(embedder.preprocess)(
        resize=args.resolution, crop=args.resolution, mean=embedder.preprocess.mean, std=embedder.preprocess.std
    )
    tag = f"r{args.resolution}-s{args.seed}-n{args.train_size}-t{args.test_size}-c{args.chunks}"
    cache = args.cache_dir
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    print(f"embedder: {embedder.id}", file=sys.stderr)
    train_f = embed(embedder, train_x[ref_idx], cache and cache / f"train-{tag}.npy", "train")
    test_f = embed(embedder, test_x[test_idx], cache and cache / f"test-{tag}.npy", "test")
    pool_all = np.concatenate([pool_by_class[cls] for cls in class_order])
    pool_f = embed(embedder, train_x[pool_all], cache and cache / f"pool-{tag}.npy", "held-out pool")
    row_of = {int(i): r for r, i in enumerate(pool_all)}

    real = irs(train_f, test_f)
    print(
        f"\nFashion-MNIST, efficientnet-lite0 features at {args.resolution}px (the paper uses SwAV/Inception); "
        f"N = {len(train_f)}, real test queries n = {len(test_f)}, {args.chunks} synthetic chunks of {len(test_f)}"
    )
    print(
        f"real test split: k = {real.k_measured}, IRS_alpha = {real.irs_alpha:.4f}, IRS_inf = {real.irs_inf:.4f} "
        f"[{real.irs_inf_l:.4f}, {real.irs_inf_u:.4f}] (one-sided 5% bounds)\n"
    )
    header = f"{'generator':<22}{'f':>5}{'k':>8}{'IRS_alpha':>11}{'IRS_inf':>9}{'bounds':>18}{'IRS_inf,a':>18}"
    print(header)
    print("-" * len(header))

    def row(name: str, f: float, snth_f: np.ndarray) -> None:
        out = irs_adjusted(train_f, test_f, snth_f, seed=args.seed)
        m = out["snth"]["mean"]
        sd = out["irs_adjusted_sd"] or 0.0
        print(
            f"{name:<22}{f:>5.1f}{m['k_measured']:>8.0f}{m['irs_alpha']:>11.4f}{m['irs_inf']:>9.4f}"
            f"{'[' + format(m['irs_inf_l'], '.3f') + ', ' + format(m['irs_inf_u'], '.3f') + ']':>18}"
            f"{format(out['irs_adjusted'], '.3f') + ' +- ' + format(sd, '.3f'):>18}"
        )

    for c in range(1, 11):
        classes = class_order[:c]
        candidates = np.concatenate([pool_by_class[cls][: -(-n_snth // c)] for cls in classes])
        chosen = rng.choice(candidates, n_snth, replace=False)
        row(f"classes {c}/10", c / 10, pool_f[[row_of[int(i)] for i in chosen]])
    print()
    for f in (0.1, 0.2, 0.4, 0.6, 0.8, 1.0):
        known = rng.choice(len(train_f), max(1, round(f * len(train_f))), replace=False)
        row("memorising", f, train_f[rng.choice(known, n_snth, replace=True)])


if __name__ == "__main__":
    main()
