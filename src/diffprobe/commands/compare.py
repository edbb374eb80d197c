"""``diffprobe compare A B``: paired per-prompt statistics between two score results or two image sets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..console import message
from ..errors import InputError, check_writable
from ..metrics.provenance import provenance, write_json
from ..metrics.stats import (
    PAIR_BY,
    ScoreResult,
    compare_paired,
    keyed_rows,
    load_result,
    pair,
    read_score_result,
    setting_warnings,
    undefined_pairs,
)

console = Console(stderr=True)


def _result(path: Path, embedder: str, weights: Path | None, device: str | None, strict: bool) -> ScoreResult:
    if path.suffix == ".json":
        return load_result(path)
    from ..metrics.scs import score_scs

    scored = score_scs(path, embedder, weights=weights, device=device, strict=strict, sensitivity=False)
    return read_score_result(scored, path)


def _examples(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        a: Path = typer.Argument(..., help="Score JSON (from diffprobe score), run directory or grouped image folder."),
        b: Path = typer.Argument(..., help="The same for the second model."),
        intersection: bool = typer.Option(False, help="Compare only the prompts both sides share."),
        pair_by: str = typer.Option(
            "prompt",
            help="Pair prompts by text (prompt), by prompt id (id), or by position "
            "(order, for prompt lists that differ on purpose, e.g. a LoRA trigger word).",
        ),
        drop_undefined: bool = typer.Option(
            False, help="Leave out prompts whose score is undefined on either side (a single image)."
        ),
        embedder: str = typer.Option("auto", help="Embedder for SCS when A/B are image sets."),
        weights: Path | None = typer.Option(None),
        device: str | None = typer.Option(None),
        n_boot: int = typer.Option(10000, min=100, help="Bootstrap resamples for the CI of the mean difference."),
        confidence: float = typer.Option(0.95, min=0.5, max=0.999),
        seed: int = typer.Option(0),
        allow_different_embedders: bool = typer.Option(False, help="Compare scores made with different embedders."),
        strict: bool = typer.Option(False),
        out: Path = typer.Option(Path("compare.json"), help="Output JSON."),
    ) -> None:
        """Wilcoxon signed-rank, two-sample KS, bootstrap CI of the mean difference and effect sizes (B - A)."""
        if pair_by not in PAIR_BY:
            raise InputError(f"--pair-by must be one of {', '.join(PAIR_BY)}")
        check_writable(out)
        ra, rb = (_result(p, embedder, weights, device, strict) for p in (a, b))
        if ra.metric != rb.metric:
            raise InputError(f"cannot compare different metrics: A is {ra.metric}, B is {rb.metric}")
        ida, idb = (ra.embedder or {}).get("id"), (rb.embedder or {}).get("id")
        if ida != idb and not allow_different_embedders:
            raise InputError(
                f"A and B were scored with different embedders ({ida} vs {idb}); rescore one side, or "
                "pass --allow-different-embedders"
            )
        rows = pair(keyed_rows(ra, pair_by, "A"), keyed_rows(rb, pair_by, "B"), intersection=intersection,
                    by_order=pair_by == "order")
        undefined_a, undefined_b = undefined_pairs(rows)
        dropped: list[str] = []
        if drop_undefined:
            rows, dropped = rows.drop(lambda x, y: x.score is None or y.score is None)
        elif undefined_a or undefined_b:
            raise InputError(
                f"{ra.metric} is undefined for {len(undefined_a)} paired prompt(s) of A and {len(undefined_b)} of B "
                f"(a single image each), e.g. {_examples(undefined_a or undefined_b)}; pass --drop-undefined to "
                "compare the other prompts, or generate more images of those"
            )
        result = compare_paired(rows.map(lambda row: row.score), names=(str(a), str(b)), n_boot=n_boot,
                                confidence=confidence, seed=seed)
        result["dropped"]["undefined"] = len(dropped)
        result["warnings"] = setting_warnings(ra, rb, rows) + result["warnings"]
        result = {"metric": ra.metric, "embedder": ra.embedder, **result, "provenance": provenance()}
        write_json(result, out)
        d, w, ks = result["difference"], result["wilcoxon"], result["ks_2samp"]
        ci, dz, rbis = d["bootstrap_ci"], result["effect_size"]["cohens_dz"], result["effect_size"]["rank_biserial"]
        console.print(message(
            f"{ra.metric}: A {result['A']['mean']:.2f} +- {result['A']['sd']:.2f}, B {result['B']['mean']:.2f} +- "
            f"{result['B']['sd']:.2f} over {result['n_pairs']} paired prompts\n"
            f"B - A: mean {d['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] ({ci['confidence']:.0%} bootstrap CI), "
            f"B higher on {d['b_higher']}, A higher on {d['a_higher']}\n"
            f"Wilcoxon p = {w['p']:.3g}; KS p = {ks['p']:.3g}; Cohen's d_z = "
            f"{'n/a' if dz is None else format(dz, '.3f')}; rank-biserial r = {rbis:.3f}"
        ))
        if dropped:
            console.print(message(f"left out {len(dropped)} prompt(s) with an undefined score: {_examples(dropped)}"))
        for warning in result["warnings"]:
            console.print(message(warning, "warning:"))
        console.print(message(f"wrote {out}"))
