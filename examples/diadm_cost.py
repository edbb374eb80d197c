"""What the DiADM experiment's parts cost on this machine: CPU seconds (process time) and wall seconds per training
step, per sampled image and per embedded image, at the experiment's model size. The process time is what one
thread costs on an otherwise idle core; the wall time shows how busy the machine was.

    OMP_NUM_THREADS=1 python examples/diadm_cost.py --cache-dir /tmp/diadm-cost
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffprobe.diadm import DiadmOptions, load, train_diadm
from diffprobe.diadm.data import dataset_folder, read_training_images
from diffprobe.diadm.model import condition_vectors
from diffprobe.diadm.sample import ddim_sample
from diffprobe.diadm.train import image_features


def clock() -> tuple[float, float]:
    return time.process_time(), time.time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, required=True, help="data set folders and the feature cache")
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="training steps timed (the median step counts)")
    ap.add_argument("--sampler-steps", type=int, default=20)
    ap.add_argument("--cond-embedder", default="efficientnet-lite1@64")
    ap.add_argument("--eval-embedder", default="efficientnet-lite0@64")
    ap.add_argument("--kid-subsets", type=int, default=20)
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp())
    result: dict = {"threads": torch.get_num_threads()}
    marks: list[tuple[float, float]] = []

    def mark(step: int) -> bool:  # the training core asks after every optimisation step
        marks.append(clock())
        return False

    options = DiadmOptions(cond="pseudocond", embedder=a.cond_embedder, resolution=a.resolution, channels=1,
                           width=a.width, steps=a.steps, batch=a.batch, lr=1e-3, warmup=5, checkpoint_every=0,
                           log_every=100)
    train_diadm("fashion-mnist:train:200", out / "model", options, device="cpu", cache_dir=a.cache_dir, stop=mark)
    later = marks[4:]  # the first steps warm kernels up
    for i, kind in enumerate(("cpu", "wall")):
        per_step = np.diff([m[i] for m in later])
        result[f"train_step_{kind}_s"] = float(np.median(per_step))
        result[f"train_step_{kind}_s_quartiles"] = [float(q) for q in np.quantile(per_step, [0.25, 0.75])]
    model = load(out / "model")
    cond = condition_vectors("pseudocond", model.features, None, 0)[:100]
    ddim_sample(model, list(range(10)), cond[:10], 2, torch.device("cpu"))  # warm-up
    c0, w0 = clock()
    ddim_sample(model, list(range(100)), cond, a.sampler_steps, torch.device("cpu"))
    c1, w1 = clock()
    result[f"sampled_image_{a.sampler_steps}_steps_cpu_s"] = (c1 - c0) / 100
    result[f"sampled_image_{a.sampler_steps}_steps_wall_s"] = (w1 - w0) / 100
    test = read_training_images(dataset_folder("fashion-mnist:test:300", a.cache_dir))
    for name in (a.eval_embedder, a.cond_embedder):
        c0, w0 = clock()
        image_features(test.paths, test.shas, name, device="cpu", no_cache=True)
        c1, w1 = clock()
        result[f"embedded_image_{name}_cpu_s"] = (c1 - c0) / len(test)
        result[f"embedded_image_{name}_wall_s"] = (w1 - w0) / len(test)
    from diffprobe.metrics.fd import kid

    rng = np.random.default_rng(0)  # KID's cost depends on the sizes only
    c0, w0 = clock()
    kid(rng.random((2000, 1280)), rng.random((1000, 1280)), subsets=a.kid_subsets, subset_size=1000)
    c1, w1 = clock()
    result[f"kid_{a.kid_subsets}_subsets_of_1000_cpu_s"] = c1 - c0
    result[f"kid_{a.kid_subsets}_subsets_of_1000_wall_s"] = w1 - w0
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
