"""Write a seeded Fashion-MNIST subset as PNG folders (train/ from the training split, test/ from the held-out
t10k split), the input of ``diffprobe score extractors`` and ``diffprobe score fd``.

Needs the Debian package ``dataset-fashion-mnist`` (files in /usr/share/datasets/fashion-mnist/).
Run: ``python examples/fashion_mnist_folders.py --train-size 5000 --test-size 1000 --out /tmp/fmnist``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from irs_fashion_mnist import DATA, read_idx
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", default=None, help="only these classes, e.g. 0,1,2,3,4 (default: all ten)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    files = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
    labels = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}
    if not all((DATA / f).is_file() for f in [*files.values(), *labels.values()]):
        sys.exit(f"Fashion-MNIST not found in {DATA}: install it with 'apt-get install dataset-fashion-mnist'")
    rng = np.random.default_rng(args.seed)
    for split, size in (("train", args.train_size), ("test", args.test_size)):
        images = read_idx(DATA / files[split])
        pool = np.arange(len(images))
        if args.classes is not None:
            pool = pool[np.isin(read_idx(DATA / labels[split]), [int(c) for c in args.classes.split(",")])]
        chosen = np.sort(rng.choice(pool, size, replace=False))
        folder = args.out / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in chosen:
            Image.fromarray(images[i]).save(folder / f"{split}-{i:05d}.png")
        print(f"wrote {size} images to {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
