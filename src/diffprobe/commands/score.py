"""``diffprobe score scs|irs|clip|composition|fd|extractors``: metrics on a run directory or a folder of images;
writes JSON.

``composition`` is the summary of ``diffprobe judge`` (:func:`diffprobe.commands.judge.judge_run`) as a score."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..console import message
from ..distributed import ReusePools
from ..embed import FeatureCache
from ..errors import check_writable
from ..metrics.provenance import write_json
from . import backend_options as bo
from . import judge as jf

score_app = typer.Typer(
    help="Score images: consistency (scs), diversity (irs), text alignment (clip), compositional accuracy "
    "(composition), quality (fd: FID/KID), and which feature extractor to trust (extractors).",
    no_args_is_help=True,
)
console = Console(stderr=True)

EMBEDDER_HELP = (
    "auto, clip-vit-b32 (other CLIP hub ids or local CLIP folders), efficientnet-lite0, "
    "swav or inception (both with --weights FILE), inception-torchscript (with --weights FILE), pixels, "
    "random-projection"
)

# The options every metric command shares, defined once (each command adds its own --out help, see out_option).
Weights = Annotated[Path | None, typer.Option(help="Local weights file (swav, inception).")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: the best available).")]
BatchSize = Annotated[int, typer.Option(min=1)]
Strict = Annotated[bool, typer.Option(help="Fail on unreadable or non-image files instead of skipping them.")]
Guidance = Annotated[str | None, typer.Option(help="Score only this guidance variant of a run.")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")]
CacheDir = Annotated[
    Path | None, typer.Option(help="Feature cache directory (default: run dir or $DIFFPROBE_CACHE).")
]


def out_option(metric: str) -> typer.models.OptionInfo:
    return typer.Option(help=f"Output JSON (default: RUN/scores/{metric}.json or ./<folder>_{metric}.json).")


def _target(out: Path | None, default: Path) -> Path:
    """Where the result goes, checked before any work (a bad --out must not cost an embedding pass)."""
    return check_writable(out if out is not None else default)


def _default_out(path: Path, metric: str) -> Path:
    from ..metrics.images import run_samples

    if run_samples(path) is not None:
        return path / "scores" / f"{metric}.json"
    return Path.cwd() / f"{path.resolve().name}_{metric}.json"


def _cache(no_cache: bool, cache_dir: Path | None):
    if no_cache:
        return None
    if cache_dir is not None:
        return FeatureCache.for_location(cache_dir=cache_dir)
    return True  # run store for runs, else $DIFFPROBE_CACHE


def _shared(device: str | None, batch_size: int, strict: bool, guidance: str | None, no_cache: bool,
            cache_dir: Path | None) -> dict:
    """The keyword arguments of the shared options, as every ``score_*`` function takes them."""
    return {"device": device, "batch_size": batch_size, "cache": _cache(no_cache, cache_dir), "strict": strict,
            "guidance": guidance}


def _pools(backend: str, address: str | None, workers: int | None, gpus_per_worker: float | None) -> ReusePools:
    """The backend the flags name, keeping its pool across the command's embedding passes (closed on exit)."""
    return ReusePools(bo.backend_from_flags(backend, address, workers, gpus_per_worker))


class _Bar:
    """A rich progress bar fed by the embedding loop (images embedded, cache hits are not counted)."""

    def __enter__(self):
        self.progress = Progress(
            TextColumn("embedding"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("embed", total=None)
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc):
        self.progress.stop()


def _report(result: dict, out: Path) -> None:
    write_json(result, out)
    emb = result.get("embedder", {})
    console.print(message(f"embedder: {emb.get('name')} ({emb.get('weights', '')})"))
    if emb.get("note"):
        console.print(message(emb["note"], "note:"))
    skipped = result.get("input", {}).get("skipped", {}).get("count", 0)
    if skipped:
        console.print(f"[yellow]skipped {skipped} unreadable or non-image file(s)[/] (--strict to fail instead)")
    for note in result.get("input", {}).get("notes", []):  # a run's missing or extra files
        console.print(message(note, "note:"))
    for w in result.get("warnings", []):
        console.print(message(w, "warning:"))
    console.print(message(f"wrote {out}"))


@score_app.command("scs")
def scs_cmd(
    path: Path = typer.Argument(..., help="Run directory, or folder grouped per prompt (manifest or subfolders)."),
    embedder: str = typer.Option("auto", help=EMBEDDER_HELP),
    weights: Weights = None,
    device: Device = None,
    batch_size: BatchSize = 64,
    out: Annotated[Path | None, out_option("scs")] = None,
    n_boot: int = typer.Option(200, min=1, help="Random subsets per repetition count in the sensitivity curve."),
    seed: int = typer.Option(0, help="Seed of the sensitivity bootstrap."),
    sensitivity: bool = typer.Option(True, help="Compute the SCS-vs-repetitions curve."),
    no_clamp: bool = typer.Option(False, "--no-clamp", help="Do not clamp negative cosines to 0 (not the paper's)."),
    strict: Strict = False,
    guidance: Guidance = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    backend: str = bo.BACKEND,
    address: str | None = bo.ADDRESS,
    workers: int | None = bo.WORKERS,
    gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
) -> None:
    """Semantic Consistency Score per prompt, mean +- SD, and a sensitivity curve over repetitions."""
    from ..metrics.scs import score_scs

    target = _target(out, _default_out(path, "scs"))
    with _pools(backend, address, workers, gpus_per_worker) as runner, _Bar() as progress:
        result = score_scs(path, embedder, weights=weights, sensitivity=sensitivity, n_boot=n_boot, seed=seed,
                           clamp=not no_clamp, progress=progress, backend=runner,
                           **_shared(device, batch_size, strict, guidance, no_cache, cache_dir))
    bo.print_pool_summaries(console, runner.worker_stats())
    s = result["summary"]
    console.print(
        f"SCS over {s['n_prompts']} prompts: mean {s['mean']:.2f} +- {s['sd']:.2f} (population SD), "
        f"median {s['median']:.2f}",
        highlight=False,
    )
    if sensitivity:
        sens = result["sensitivity"]
        curve = ", ".join(f"{c['n']}:{c['sd_per_prompt']:.2f}" for c in sens["curve"] if c["sd_per_prompt"] is not None)
        console.print(
            f"per-prompt SD of SCS by repetitions: {curve}; reaching SD <= {sens['tolerance']} needs "
            f"{sens['suggested_n'] or 'more than the available'} repetitions (projected: {sens['projected_n']})",
            highlight=False,
        )
    _report(result, target)


@score_app.command("irs")
def irs_cmd(
    path: Path = typer.Argument(..., help="Synthetic images: run directory, image folder, or .npy features."),
    train: Path = typer.Option(..., help="Training images (folder, recursive) or .npy features."),
    test: Path | None = typer.Option(None, help="Held-out real images for IRS-inf,a (same as --train: 50/50 split)."),
    embedder: str = typer.Option(
        "auto", help="auto (swav with --weights, else efficientnet-lite0) or " + EMBEDDER_HELP
    ),
    weights: Weights = None,
    device: Device = None,
    batch_size: BatchSize = 64,
    metric: str = typer.Option("euclidean", help="Retrieval distance: euclidean on raw features (paper) or cosine."),
    alpha_e: float = typer.Option(0.05, min=1e-6, max=0.5, help="One-sided error of each bound."),
    seed: int = typer.Option(42, help="Seed of subsampling, chunking and the train split."),
    backend: str = typer.Option("torch", help="Nearest-neighbour backend: torch (chunked) or faiss."),
    out: Annotated[Path | None, out_option("irs")] = None,
    strict: Strict = False,
    guidance: Guidance = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    embed_backend: str = typer.Option("local", "--embed-backend", help="Where image features are computed: local "
                                      "or ray (as --backend of generate; --backend here is the neighbour search)."),
    address: str | None = bo.ADDRESS,
    workers: int | None = bo.WORKERS,
    gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
) -> None:
    """Image Retrieval Score: IRS_alpha, IRS-inf with one-sided bounds, and IRS-inf,a against --test."""
    from ..metrics.irs import score_irs

    target = _target(out, Path("irs.json") if path.suffix == ".npy" else _default_out(path, "irs"))
    # one pool embeds the synthetic, training and test images
    with _pools(embed_backend, address, workers, gpus_per_worker) as runner, _Bar() as progress:
        result = score_irs(path, train, test, embedder=embedder, weights=weights, metric=metric, alpha_e=alpha_e,
                           seed=seed, backend=backend, progress=progress, embed_backend=runner,
                           **_shared(device, batch_size, strict, guidance, no_cache, cache_dir))
    bo.print_pool_summaries(console, runner.worker_stats())
    r = result["synthetic"]
    console.print(
        f"synthetic: n={r['n_sampled']} N={r['n_train']} k={r['k_measured']} IRS_alpha={r['irs_alpha']:.4f} "
        f"IRS_inf={r['irs_inf']:.4f} [{r['irs_inf_l']:.4f}, {r['irs_inf_u']:.4f}] ({result['bounds']})",
        highlight=False,
    )
    if "adjusted" in result:
        a = result["adjusted"]
        sd = f" +- {a['irs_adjusted_sd']:.4f}" if a["irs_adjusted_sd"] is not None else ""
        console.print(
            f"real test IRS_inf={a['test']['irs_inf']:.4f}; IRS_inf,a = {a['irs_adjusted']:.4f}{sd} "
            f"over {a['snth']['n_chunks']} chunk(s)",
            highlight=False,
        )
    _report(result, target)


@score_app.command("clip")
def clip_cmd(
    path: Path = typer.Argument(..., help="Run directory, or folder with prompt texts (manifest or prompt.txt)."),
    model: str = typer.Option("clip-vit-b32", help="CLIP hub id, alias (clip-vit-b32/b16/l14) or local folder."),
    device: Device = None,
    batch_size: BatchSize = 64,
    out: Annotated[Path | None, out_option("clip")] = None,
    strict: Strict = False,
    guidance: Guidance = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    backend: str = bo.BACKEND,
    address: str | None = bo.ADDRESS,
    workers: int | None = bo.WORKERS,
    gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
) -> None:
    """CLIP score (100 * max(cos, 0), text vs image) per prompt, and CLIP R-precision."""
    from ..metrics.clipscore import score_clip

    target = _target(out, _default_out(path, "clip"))
    with _pools(backend, address, workers, gpus_per_worker) as runner, _Bar() as progress:
        result = score_clip(path, model, progress=progress, backend=runner,
                            **_shared(device, batch_size, strict, guidance, no_cache, cache_dir))
    bo.print_pool_summaries(console, runner.worker_stats())
    s = result["summary"]
    rp = result["r_precision"]
    console.print(
        f"CLIP score over {s['n_prompts']} prompts: {s['mean']:.2f} +- {s['sd']:.2f}; R-precision "
        + (f"{rp:.3f} among {result['r_precision_candidates']} prompts" if rp is not None else "n/a"),
        highlight=False,
    )
    if result["truncated_prompts"]:
        console.print(
            f"[yellow]{len(result['truncated_prompts'])} prompt(s) truncated to "
            f"{result['truncated_prompts'][0]['max_tokens']} tokens[/]"
        )
    _report(result, target)


@score_app.command("composition")
@jf.with_judge_flags
def composition_cmd(
    run: Path = typer.Argument(..., help="Run directory (made by 'diffprobe generate')."),
    judge: str = typer.Option("shapes", "--judge", "-j", help=jf.JUDGE_HELP),
    out: Annotated[Path | None, typer.Option(help="Output JSON (default: RUN/scores/composition.json).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help=jf.BATCH_HELP)] = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    judge_flags: dict = None,  # type: ignore[assignment]  # filled by with_judge_flags
    backend: str = bo.BACKEND,
    address: str | None = bo.ADDRESS,
    workers: int | None = bo.WORKERS,
    gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
) -> None:
    """Compositional accuracy per category (count N, attribute, each relation) with Wilson 95 % intervals: the
    summary 'diffprobe judge' writes. Images not judged yet are judged first (stored in the run, resumable)."""
    runner = _pools(backend, address, workers, gpus_per_worker)
    [made] = jf.make_judges([judge], judge_flags)
    try:
        result = jf.judge_run(run, made, console=console, progress=not quiet, batch_size=batch_size,
                              summary_out=out, backend=runner)
    finally:
        runner.close()
        made.close()
    bo.print_pool_summaries(console, runner.worker_stats())
    for line in jf.summary_lines(result.summary):
        typer.echo(line)
    console.print(message(f"{result.judged} judged, {result.already} already judged; per-image verdicts in "
                          f"{result.jsonl}"))
    console.print(message(f"wrote {result.summary_path}"))
@score_app.command("fd")
def fd_cmd(
    path: Path = typer.Argument(..., help="Images: run directory, image folder (recursive), or .npy features."),
    ref: Path = typer.Option(..., help="Reference: image folder, run directory, .npy features, or a statistics "
                             ".npz from --save-stats."),
    inception: Path | None = typer.Option(None, help="inception-2015-12-05.pt (the TorchScript Inception of "
                                          "clean-fid/StyleGAN): the score is then FID proper."),
    resize: str = typer.Option("clean", help="FID resize with --inception: clean (PIL bicubic to 299, clean-fid's "
                               "default), legacy-tensorflow or legacy-pytorch."),
    embedder: str = typer.Option("auto", help="Without --inception: " + EMBEDDER_HELP),
    weights: Weights = None,
    device: Device = None,
    batch_size: BatchSize = 64,
    save_stats: Path | None = typer.Option(None, help="Save the reference's mean, covariance, count, embedder "
                                           "identity and features (for KID) to this .npz."),
    kid_subsets: int = typer.Option(100, min=0, help="KID subsets (0: no KID)."),
    kid_subset_size: int = typer.Option(1000, min=2, help="Images per KID subset (lowered to the smaller set)."),
    seed: int = typer.Option(0, help="Seed of the KID subsets."),
    sqrt: str = typer.Option("eigh", help="Matrix square root: eigh (stable when rank-deficient) or sqrtm "
                             "(scipy, with the 1e-6 offset fallback of pytorch-fid)."),
    out: Annotated[Path | None, out_option("fd")] = None,
    strict: Strict = False,
    guidance: Guidance = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    backend: str = bo.BACKEND,
    address: str | None = bo.ADDRESS,
    workers: int | None = bo.WORKERS,
    gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
) -> None:
    """Fréchet distance between Gaussian fits of the features (FID with --inception), and KID."""
    from ..metrics.fd import score_fd

    target = _target(out, Path("fd.json") if path.suffix == ".npy" else _default_out(path, "fd"))
    if save_stats is not None:
        check_writable(save_stats)
    # one pool embeds both the images and the reference
    with _pools(backend, address, workers, gpus_per_worker) as runner, _Bar() as progress:
        result = score_fd(path, ref, embedder=embedder, weights=weights, inception=inception, resize=resize,
                          save_stats=save_stats, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                          seed=seed, method=sqrt, progress=progress, backend=runner,
                          **_shared(device, batch_size, strict, guidance, no_cache, cache_dir))
    bo.print_pool_summaries(console, runner.worker_stats())
    label = f"FID ({result['resize']} resize)" if result["is_fid"] else f"FD ({result['embedder']['name']})"
    line = f"{label} = {result['fd']:.4f} over {result['n_images']} vs {result['n_reference']} images"
    if result["kid"] is not None:
        k = result["kid"]
        sd = f" +- {k['kid_sd']:.5f}" if k["kid_sd"] is not None else ""
        line += f"; KID = {k['kid']:.5f}{sd} ({k['subsets']} subsets of {k['subset_size']})"
    console.print(line, highlight=False)
    if result["fid_note"]:
        console.print(message(result["fid_note"], "note:"))
    if "saved_stats" in result:
        console.print(message(f"saved reference statistics to {result['saved_stats']}"))
    _report(result, target)


@score_app.command("extractors")
def extractors_cmd(
    train: Path = typer.Option(..., help="Training images (folder, recursive)."),
    test: Path = typer.Option(..., help="Held-out real images (folder, recursive)."),
    embedders: str = typer.Option(..., help="Comma-separated embedders, each NAME or NAME=WEIGHTS_FILE, e.g. "
                                  "efficientnet-lite0,pixels,random-projection,swav=swav.pth.tar."),
    consensus: int | None = typer.Option(None, min=1, help="Extractors that must retrieve the same training image "
                                         "for a pseudo ground truth (default: a strict majority; paper: 5 of 9)."),
    metric: str = typer.Option("euclidean", help="Retrieval distance: euclidean on raw features (paper) or cosine."),
    device: Device = None,
    batch_size: BatchSize = 64,
    out: Annotated[Path | None, typer.Option(help="Output JSON (default: ./<test folder>_extractors.json).")] = None,
    strict: Strict = False,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    backend: str = bo.BACKEND,
    address: str | None = bo.ADDRESS,
    workers: int | None = bo.WORKERS,
    gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
) -> None:
    """The IRS paper's extractor study: agreement with a consensus pseudo ground truth, real-data IRS-inf, and
    pairwise agreement."""
    from ..metrics.extractors import score_extractors

    target = _target(out, Path.cwd() / f"{test.resolve().name}_extractors.json")
    # one pool per extractor embeds both folders
    with _pools(backend, address, workers, gpus_per_worker) as runner, _Bar() as progress:
        result = score_extractors(train, test, embedders, min_agree=consensus, metric=metric, device=device,
                                  batch_size=batch_size, cache=_cache(no_cache, cache_dir), strict=strict,
                                  progress=progress, backend=runner)
    bo.print_pool_summaries(console, runner.worker_stats())
    console.print(
        f"N = {result['n_train']} train, n = {result['n_test']} test images; pseudo ground truth where >= "
        f"{result['min_agree']} of {len(result['extractors'])} extractors agree: {result['n_consensus']} "
        f"({100 * result['consensus_rate']:.1f}%)",
        highlight=False,
    )
    console.print(extractor_table(result), highlight=False)
    write_json(result, target)
    console.print(message(f"wrote {target}"))


def extractor_table(result: dict) -> str:
    """The per-extractor rows and the pairwise agreement matrix as plain text (also what docs quote)."""
    names = result["extractors"]
    width = max(len(n) for n in names) + 4
    def rate(value) -> str:
        return f"{value:.3f}" if value is not None else "n/a"

    lines = [f"{'extractor':<{width}}{'agreement':>10}{'vs others':>10}{'k':>7}{'IRS_inf':>9}  bounds"]
    for row in result["per_extractor"]:
        r = row["real_irs"]
        lines.append(f"{row['extractor']:<{width}}{rate(row['agreement']):>10}{rate(row.get('agreement_others')):>10}"
                     f"{r['k_measured']:>7}{r['irs_inf']:>9.4f}  [{r['irs_inf_l']:.4f}, {r['irs_inf_u']:.4f}]")
    lines.append("")
    lines.append("pairwise agreement (same retrieved training image):")
    lines.append(" " * width + "".join(f"{i:>8}" for i in range(len(names))))
    for i, (name, row) in enumerate(zip(names, result["pairwise_agreement"], strict=True)):
        lines.append(f"{f'{i} {name}':<{width}}" + "".join(f"{v:>8.3f}" for v in row))
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.add_typer(score_app, name="score")
