"""The Ray backend on a local two-CPU Ray cluster: the same images and job keys as the local backend, no finished
image lost when an actor dies, bounded retries, and a worker that cannot load its model fails the run at once.

One Ray instance (``ray.init(num_cpus=2)``) serves the whole session; each test still starts its own actor pool
(fresh worker processes that import torch and load the model: 5-30 s each on a busy 2-core machine). The tests that
run in CI (not marked slow) are the identity test with the tiny SD model, seed mining with the shapes model and
judge (the shapes model's identity), the killed-actor retry and the worker that cannot load; the others are slow
(``pytest -m slow tests/test_ray_backend.py``). Without Ray (``pip install 'diffprobe[ray]'``) they are skipped;
the tests of choosing a backend and of reusing pools run without it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from ray_toys import Squares

from diffprobe.distributed import LocalBackend, ReusePools, make_backend
from diffprobe.errors import InputError, WorkerError
from diffprobe.generate import generate
from diffprobe.spec import GuidanceSpec, ModelSpec, RunSpec, SamplerSpec
from diffprobe.store import open_run

TESTS = Path(__file__).resolve().parent
START_TIMEOUT = 120.0  # seconds for the actors of one pool to load their model
NO_RAY = "Ray is not installed; pip install 'diffprobe[ray]' (make install does) to run the Ray backend tests"


def spec_for(model: str, prompts=("a red cube", "a blue ball"), seeds=(0, 1, 2), size: int | None = 16) -> RunSpec:
    return RunSpec(model=ModelSpec(name=model, device="cpu", dtype="fp32"), prompts=list(prompts), seeds=list(seeds),
                   sampler=SamplerSpec(steps=2, height=size, width=size), guidance=GuidanceSpec(params={"scale": 5.0}))


def images_by_job(run) -> dict[tuple[str, int], tuple[str, str]]:
    with open_run(run) as store:
        return {(s.prompt, s.seed): (s.key, s.image_sha256) for s in store.samples()}


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray", reason=NO_RAY)
    # Workers import diffprobe and the toy workers (tests/ray_toys.py) the way the driver does.
    paths = [str(TESTS), *(p for p in sys.path if p)]
    env = {"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    # a small object store: the tests move small images, and CI containers often have a small /dev/shm
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False,
             logging_level="warning", runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


def ray_backend(**kwargs):
    from diffprobe.distributed.raypool import RayBackend

    return RayBackend(start_timeout=START_TIMEOUT, **{"workers": 2, **kwargs})


def batches_of(n: int, size: int = 2) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def collect(pool, batches):
    got = {}
    for done in pool.imap_unordered(batches, describe=lambda b: f"batch starting at {b[0]}"):
        got[done.index] = done.result
    return got


def test_worker_process_killed_mid_batch_is_retried_elsewhere(ray_cluster, tmp_path):
    backend = ray_backend()
    pool = backend.start(Squares(die_on=5, marker=str(tmp_path / "died")))
    try:
        batches = batches_of(12)
        got = collect(pool, batches)
    finally:
        pool.close()
    assert got == {i: [x * x for x in b] for i, b in enumerate(batches)}
    assert (tmp_path / "died").exists()
    assert sorted(s.died for s in pool.stats) == [False, True]
    assert sum(s.items for s in pool.stats) == 12 and pool.retries >= 1


@pytest.mark.slow
def test_a_batch_that_kills_every_worker_fails_with_its_name(ray_cluster, tmp_path):
    backend = ray_backend(max_attempts=2)
    pool = backend.start(Squares(die_on=3, always=True))
    try:
        with pytest.raises(WorkerError, match="batch starting at 2: its Ray worker died 2 times"):
            collect(pool, batches_of(8))
    finally:
        pool.close()


def test_a_worker_that_cannot_set_up_fails_the_start_with_its_message(ray_cluster):
    with pytest.raises(WorkerError, match="while loading failed: RuntimeError: no weights in /nowhere"):
        ray_backend(workers=1).start(Squares(setup_error="no weights in /nowhere"))


@pytest.mark.slow
def test_missing_model_fails_as_it_does_locally(ray_cluster, tmp_path):
    spec = spec_for(str(tmp_path / "no-such-model"))
    with pytest.raises(Exception) as local:
        generate(spec, tmp_path / "local", progress=False)
    with pytest.raises(type(local.value)) as remote:
        generate(spec, tmp_path / "ray", progress=False, backend=ray_backend(workers=1))
    assert str(remote.value) == str(local.value)
    assert not (tmp_path / "ray").exists()


# --- generation ---------------------------------------------------------------------------------------------


def test_tiny_sd_on_ray_matches_local_bit_for_bit_and_resumes_a_local_run(ray_cluster, tiny_sd, tiny_sd_path,
                                                                          tmp_path):
    spec = spec_for(str(tiny_sd_path))
    local = generate(spec, tmp_path / "local", batch_size=2, adapter=tiny_sd, progress=False)
    # A run a local call left partial (as a killed driver does) is finished on Ray.
    generate(spec_for(str(tiny_sd_path), seeds=(0,)), tmp_path / "ray", adapter=tiny_sd, progress=False)
    remote = generate(spec, tmp_path / "ray", batch_size=2, extend=True, progress=False, backend=ray_backend())
    assert (local.generated, remote.generated, remote.skipped) == (6, 4, 2)
    assert images_by_job(tmp_path / "ray") == images_by_job(tmp_path / "local")
    assert sum(s.items for s in remote.workers) == 4 and len(remote.workers) == 2
    with open_run(tmp_path / "ray") as store:
        assert store.verify() == []


@pytest.mark.slow
def test_shapes_on_ray_matches_local_and_survives_a_killed_actor(ray_cluster, tmp_path):
    import ray

    from diffprobe.distributed.raypool import RayBackend

    class KillFirstProducer(RayBackend):
        """Kills the actor that returned the first result, right after it was handed its next batch."""

        def start(self, worker):
            pool = super().start(worker)
            stream = pool.imap_unordered

            def imap(batches, **kwargs):
                for n, done in enumerate(stream(batches, **kwargs)):
                    if n == 0:
                        ray.kill(pool.actors[int(done.worker.removeprefix("ray-"))])
                    yield done

            pool.imap_unordered = imap
            return pool

    spec = spec_for("shapes", prompts=("two red circles", "one blue square"), seeds=range(4), size=None)
    local = generate(spec, tmp_path / "local", batch_size=1, progress=False, backend=LocalBackend())
    backend = KillFirstProducer(workers=2, start_timeout=START_TIMEOUT)
    remote = generate(spec, tmp_path / "ray", batch_size=1, progress=False, backend=backend)
    assert (local.generated, remote.generated) == (8, 8)
    assert images_by_job(tmp_path / "ray") == images_by_job(tmp_path / "local")
    assert sorted(s.died for s in remote.workers) == [False, True] and backend.pool.retries >= 1


# --- choosing a backend -------------------------------------------------------------------------------------


def test_without_ray_the_ray_backend_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'diffprobe\[ray\]'"):
        make_backend("ray")


def test_ray_flags_need_the_ray_backend():
    with pytest.raises(InputError, match="--workers only apply to --backend ray"):
        make_backend("local", workers=2)
    with pytest.raises(InputError, match="unknown --backend 'dask'"):
        make_backend("dask")
    assert isinstance(make_backend(), LocalBackend)


@pytest.mark.slow
def test_cli_generate_on_ray_prints_each_workers_share(ray_cluster, tmp_path):
    from typer.testing import CliRunner

    from diffprobe.cli import app

    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["generate", "--model", "shapes", "--prompt", "two red circles", "--seeds", "0-3",
                                   "--steps", "2", "--batch-size", "1", "--backend", "ray", "--workers", "2",
                                   "--out", str(run), "-q"])
    assert res.exit_code == 0, res.output
    shares = [int(line.split(": ")[1].split()[0]) for line in res.output.splitlines() if line.startswith("ray-")]
    assert len(shares) == 2 and sum(shares) == 4
    with open_run(run) as store:
        assert len(store) == 4


def test_cli_backend_mistakes_exit_2_with_the_fix(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from diffprobe.cli import app

    base = ["generate", "--model", "shapes", "--prompt", "a", "--steps", "2", "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(app, [*base, "--workers", "2"])
    assert res.exit_code == 2 and "--workers only apply to --backend ray" in res.output
    monkeypatch.setitem(sys.modules, "ray", None)
    res = CliRunner().invoke(app, [*base, "--backend", "ray"])
    assert res.exit_code == 2 and "pip install 'diffprobe[ray]'" in res.output
    assert not (tmp_path / "r").exists()


# --- embedding ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedding_on_ray_matches_local_and_the_driver_writes_the_cache(ray_cluster, tmp_path):
    import numpy as np
    from PIL import Image

    from diffprobe.embed import FeatureCache, embed_files, get_embedder

    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    embedder = get_embedder("efficientnet-lite0", device="cpu", batch_size=2)
    local = embed_files(embedder, paths, chunk=2)
    cache = FeatureCache(tmp_path / "features.sqlite")
    remote = embed_files(embedder, paths, cache=cache, chunk=2, backend=ray_backend(workers=1))
    assert np.array_equal(remote, local) and cache.computed == 5
    from diffprobe.embed.base import file_sha256

    cached = cache.get([file_sha256(p) for p in paths], embedder.id)
    assert np.array_equal(np.stack([cached[file_sha256(p)] for p in paths]), local)
    cache.close()


# --- judging ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_judging_on_ray_stores_the_verdicts_a_local_judge_stores(ray_cluster, tmp_path):
    import shutil

    from diffprobe.commands.judge import judge_run
    from diffprobe.prompts import Prompt

    questions = [Prompt("two red circles", {"kind": "count", "objects": ["red circle"], "count": 2}),
                 Prompt("a blue square to the left of a yellow triangle",
                        {"kind": "relation", "objects": ["blue square", "yellow triangle"], "relation": "left_of"})]
    spec = spec_for("shapes", prompts=[p.text for p in questions], seeds=(0, 1), size=None)
    generate(spec, tmp_path / "a", prompts=questions, progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    local = judge_run(tmp_path / "a", "shapes", progress=False, batch_size=1)
    remote = judge_run(tmp_path / "b", "shapes", progress=False, batch_size=1, backend=ray_backend(workers=1))
    assert remote.judged == local.judged == 4
    fields = ("key", "correct", "answer", "reason", "question")
    assert [[r[f] for f in fields] for r in remote.rows] == [[r[f] for f in fields] for r in local.rows]
    again = judge_run(tmp_path / "b", "shapes", progress=False, backend=ray_backend(workers=1))
    assert (again.judged, again.already) == (0, 4)


@pytest.mark.slow
def test_cli_score_scs_on_ray_gives_the_local_scores(ray_cluster, tmp_path):
    import json

    from typer.testing import CliRunner

    from diffprobe.cli import app

    spec = spec_for("shapes", prompts=("two red circles", "one blue square"), seeds=(0, 1, 2), size=None)
    generate(spec, tmp_path / "run", progress=False)
    scores = {}
    for name, flags in (("local", []), ("ray", ["--backend", "ray", "--workers", "2"])):
        out = tmp_path / f"{name}.json"
        res = CliRunner().invoke(app, ["score", "scs", str(tmp_path / "run"), "--embedder", "efficientnet-lite0",
                                       "--device", "cpu", "--batch-size", "2", "--no-cache", "--no-sensitivity",
                                       "--out", str(out), *flags])
        assert res.exit_code == 0, res.output
        scores[name] = json.loads(out.read_text())["per_prompt"]
    assert scores["ray"] == scores["local"] and len(scores["local"]) == 2


# --- seed mining and audits ---------------------------------------------------------------------------------

MINE_PROMPTS = [
    {"prompt": "two red circles", "kind": "count", "objects": ["red circle"], "count": 2},
    {"prompt": "three blue squares", "kind": "count", "objects": ["blue square"], "count": 3},
    {"prompt": "a red circle to the left of a blue square", "kind": "relation",
     "objects": ["red circle", "blue square"], "relation": "left_of"},
]


def worker_shares(output: str) -> dict[str, list[int]]:
    """Images per worker under each 'KIND, per worker:' heading of a command's summary."""
    shares: dict[str, list[int]] = {}
    kind = None
    for line in output.splitlines():
        if line.endswith(", per worker:"):
            kind = line.removesuffix(", per worker:")
        elif line.startswith("ray-") and kind is not None:
            shares.setdefault(kind, []).append(int(line.split(": ")[1].split()[0]))
    return shares


def test_seeds_mine_on_ray_equals_local(ray_cluster, tmp_path):
    """Generation and judging of the grid on two Ray workers: the shapes model's images (same job keys, same
    bytes), the exact judge's verdicts and the reliable seeds file are the local run's."""
    from typer.testing import CliRunner

    from diffprobe.cli import app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in MINE_PROMPTS), encoding="utf-8")
    base = ["seeds", "mine", "--model", "shapes", "--prompts", str(prompts), "--seeds", "0-3", "--steps", "2",
            "--height", "32", "--width", "32", "--judge", "shapes", "--top", "2", "--batch-size", "2", "-q"]
    outputs = {}
    for name, flags in (("local", []), ("ray", ["--backend", "ray", "--workers", "2"])):
        res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / name), *flags])
        assert res.exit_code == 0, res.output
        outputs[name] = res.output
    assert images_by_job(tmp_path / "ray") == images_by_job(tmp_path / "local")
    assert len(images_by_job(tmp_path / "local")) == 12
    verdicts = {}
    for name in ("local", "ray"):
        with open_run(tmp_path / name) as store:
            verdicts[name] = sorted((v.key, v.correct, v.answer) for v in store.judge_verdicts({"name": "shapes"}))
    assert verdicts["ray"] == verdicts["local"] and len(verdicts["local"]) == 12
    files = {name: json.loads((tmp_path / name / "reliable_seeds.json").read_text()) for name in ("local", "ray")}
    for field in ("categories", "latents", "model", "sampler", "judge", "skipped"):
        assert files["ray"][field] == files["local"][field], field
    assert files["ray"]["timing"]["images_generated"] == files["ray"]["timing"]["images_judged"] == 12
    shares = worker_shares(outputs["ray"])
    assert {kind: (len(s), sum(s)) for kind, s in shares.items()} == {"generation (shapes)": (2, 12),
                                                                      "judging (shapes)": (2, 12)}
    assert worker_shares(outputs["local"]) == {}


@pytest.mark.slow
def test_seeds_mine_on_ray_resumes_a_complete_local_run_without_sampling(ray_cluster, tmp_path):
    """A complete grid needs the model only for its latents' shape, which a worker reports."""
    from diffprobe.judges import make_judge
    from diffprobe.prompts import Prompt
    from diffprobe.seeds.mine import mine_seeds

    items = [Prompt(p["prompt"], {k: v for k, v in p.items() if k != "prompt"}) for p in MINE_PROMPTS]
    spec = spec_for("shapes", prompts=[p.text for p in items], seeds=range(4), size=32)
    local = mine_seeds(spec, items, tmp_path / "run", make_judge("shapes"), top_n=2, progress=False)
    before = (tmp_path / "run" / "reliable_seeds.safetensors").read_bytes()
    again = mine_seeds(spec, items, tmp_path / "run", make_judge("shapes"), top_n=2, progress=False,
                       backend=ray_backend(workers=1))
    assert again.data["timing"]["images_generated"] == again.data["timing"]["images_judged"] == 0
    assert again.data["categories"] == local.data["categories"] and again.data["latents"] == local.data["latents"]
    assert (tmp_path / "run" / "reliable_seeds.safetensors").read_bytes() == before
    assert [kind for kind, _ in again.workers] == ["generation (shapes)"]


@pytest.mark.slow
def test_audit_on_ray_loads_each_model_once_and_equals_local(ray_cluster, tmp_path):
    from report_helpers import write_config

    from diffprobe.audit import run_audit

    text = ("name: tiny\nmodels: [shapes]\nprompts: prompts.jsonl\n"
            "seeds: 0-2\nsampler: {steps: 2, height: 32, width: 32}\nbatch_size: 2\n"
            "guidance:\n  - {name: cfg, scale: [3.5, 5]}\n"
            "measures:\n  scs: {embedder: efficientnet-lite0}\n  composition: {judge: shapes}\n")
    config = write_config(tmp_path, text)
    local = run_audit(config, tmp_path / "local", progress=False, report=False)
    remote = run_audit(config, tmp_path / "ray", progress=False, report=False, backend=ray_backend())
    # two arms, one load of the model
    assert [kind for kind, _ in remote.workers] == ["generation (shapes)", "embedding (efficientnet-lite0)",
                                                    "judging (shapes)"]
    # 2 arms x 4 prompts x 3 seeds images, all embedded; the 3 prompts with a question are judged
    assert [sum(s.items for s in stats) for _, stats in remote.workers] == [24, 24, 18]
    assert [a["measures"] for a in remote.summary["arms"]] == [a["measures"] for a in local.summary["arms"]]
    assert remote.summary["comparisons"] == local.summary["comparisons"]
    for arm in local.summary["arms"]:
        assert images_by_job(tmp_path / "ray" / arm["run_dir"]) == images_by_job(tmp_path / "local" / arm["run_dir"])


# --- reusing a started pool (no Ray needed) -----------------------------------------------------------------


class Counted:
    """A worker whose setups are counted per key; ``key=None``: it cannot be reused."""

    def __init__(self, key: str | None, setups: list[str]):
        self.key, self.setups = key, setups

    def pool_key(self):
        return self.key

    def setup(self):
        self.setups.append(self.key)
        return len(self.setups)

    def run(self, batch):
        return [x + 1 for x in batch]


class Recording(LocalBackend):
    """The local backend, noting each pool it closes."""

    def __init__(self):
        self.closed = []

    def start(self, worker):
        pool = super().start(worker)
        pool.close = lambda: self.closed.append(worker.key)
        return pool


def test_reuse_pools_keep_one_pool_per_key_and_stop_the_one_before():
    setups: list[str] = []
    inner = Recording()
    pools = ReusePools(inner)
    first = pools.start(Counted("a", setups))
    assert [d.result for d in first.imap_unordered([[1], [2, 3]])] == [[2], [3, 4]]
    first.close()  # handed back, not stopped
    again = pools.start(Counted("a", setups))
    assert again.info == 1 and setups == ["a"] and inner.closed == []
    assert sum(s.items for s in again.stats) == 3  # the same workers, their counts go on
    other = pools.start(Counted("b", setups))
    assert setups == ["a", "b"] and inner.closed == ["a"] and other.info == 2
    pools.close()
    assert inner.closed == ["a", "b"]
    assert [kind for kind, _ in pools.worker_stats()] == ["Counted", "Counted"]


def test_reuse_pools_stop_a_pool_whose_stream_was_left_early():
    setups: list[str] = []
    inner = Recording()
    pools = ReusePools(inner)
    stream = pools.start(Counted("a", setups)).imap_unordered([[1], [2], [3]])
    next(stream)
    stream.close()  # as an error or an interrupt in the caller leaves it
    assert inner.closed == ["a"]
    pools.start(Counted("a", setups))
    assert setups == ["a", "a"]
    plain = [pools.start(Counted(None, setups)) for _ in range(2)]  # no key: a pool of its own each time
    assert setups == ["a", "a", None, None] and inner.closed == ["a", "a"]
    for pool in plain:
        pool.close()


@pytest.mark.parametrize("command", ["seeds mine", "audit", "score clip", "score fd", "score extractors",
                                     "score composition"])
def test_every_command_with_the_backend_flags_refuses_them_without_ray_backend(command, monkeypatch, tmp_path):
    from report_helpers import write_config
    from typer.testing import CliRunner

    from diffprobe.cli import app

    config = write_config(tmp_path)
    run, out = str(tmp_path / "run"), ["--out", str(tmp_path / "out.json")]  # the flags are checked before the run
    args = {"seeds mine": ["seeds", "mine", "--prompts", "shapes-train-count", "--seeds", "0-1", "--out",
                           str(tmp_path / "mine")],
            "audit": ["audit", str(config), "--out", str(tmp_path / "audit")],
            "score clip": ["score", "clip", run, *out],
            "score fd": ["score", "fd", run, "--ref", run, *out],
            "score extractors": ["score", "extractors", "--train", run, "--test", run, "--embedders", "pixels", *out],
            "score composition": ["score", "composition", run, *out]}[command]
    res = CliRunner().invoke(app, [*args, "--workers", "2"])
    assert res.exit_code == 2 and "--workers only apply to --backend ray" in res.output, res.output
    monkeypatch.setitem(sys.modules, "ray", None)
    res = CliRunner().invoke(app, [*args, "--backend", "ray"])
    assert res.exit_code == 2 and "pip install 'diffprobe[ray]'" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.yaml", "prompts.jsonl"]  # nothing made
