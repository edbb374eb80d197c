"""Check the extractor study against the labels Fashion-MNIST has: for each extractor, how often the training image
it retrieves for a held-out image is of the same class (1-NN class agreement), beside its consensus agreement.

Input: the folders written by ``fashion_mnist_folders.py`` (file names hold the original indices) and the JSON of
``diffprobe score extractors`` on them. Run:
``python examples/extractors_fashion_mnist.py --folders /tmp/fd-fmnist-study --result extractors.json``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from irs_fashion_mnist import DATA, read_idx


def labels_of(folder: Path, labels: np.ndarray) -> np.ndarray:
    """Labels of the images in the order the study indexes them (sorted paths), from the index in each name."""
    files = sorted(f for f in folder.rglob("*.png"))
    return labels[[int(f.stem.split("-")[-1]) for f in files]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folders", type=Path, required=True, help="the --out folder of fashion_mnist_folders.py")
    ap.add_argument("--result", type=Path, required=True, help="JSON written by diffprobe score extractors")
    args = ap.parse_args()
    result = json.loads(args.result.read_text())
    train_y = labels_of(args.folders / "train", read_idx(DATA / "train-labels-idx1-ubyte.gz"))
    test_y = labels_of(args.folders / "test", read_idx(DATA / "t10k-labels-idx1-ubyte.gz"))
    if len(train_y) != result["n_train"] or len(test_y) != result["n_test"]:
        raise SystemExit("the folders do not hold the images the result was computed on")
    truth = np.array(result["pseudo_truth"])
    has = truth >= 0
    print(f"N = {result['n_train']}, n = {result['n_test']}; consensus (>= {result['min_agree']} of "
          f"{len(result['extractors'])}) on {has.sum()} test images, of which "
          f"{(train_y[truth[has]] == test_y[has]).mean():.3f} of the same class")
    print()
    print("| extractor | agreement with consensus | vs consensus of the others | 1-NN same class | k | real IRS∞ "
          "[one-sided 5 % bounds] |")
    print("|---|---|---|---|---|---|")
    for row in result["per_extractor"]:
        same_class = (train_y[np.array(row["neighbors"])] == test_y).mean()
        r = row["real_irs"]
        others = row.get("agreement_others")
        print(f"| `{row['extractor']}` | {row['agreement']:.3f} | "
              f"{'n/a' if others is None else format(others, '.3f')} | {same_class:.3f} | {r['k_measured']} | "
              f"{r['irs_inf']:.3f} [{r['irs_inf_l']:.3f}, {r['irs_inf_u']:.3f}] |")
    print()
    names = result["extractors"]
    print("| pairwise agreement | " + " | ".join(f"`{n}`" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for name, row in zip(names, result["pairwise_agreement"], strict=True):
        print(f"| `{name}` | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
