"""Metrics on folders of images and run directories: SCS, IRS, CLIP score, FD/FID/KID, the extractor study, and
paired statistics.

The common case is one call, e.g. ``score_scs("runs/sdxl")`` or ``score_irs(snth, train, test)``; each
returns the JSON-ready dict that ``diffprobe score`` writes.
"""

from .clipscore import clip_scores, r_precision, score_clip
from .extractors import evaluate_extractors, score_extractors
from .fd import frechet_distance, gaussian_stats, kid, score_fd
from .irs import irs, irs_adjusted, irs_from_counts, nearest_neighbors, score_irs
from .scs import score_scs, scs, scs_per_prompt, scs_sensitivity
from .stats import compare_scores

__all__ = [
    "clip_scores",
    "compare_scores",
    "evaluate_extractors",
    "frechet_distance",
    "gaussian_stats",
    "irs",
    "irs_adjusted",
    "irs_from_counts",
    "kid",
    "nearest_neighbors",
    "r_precision",
    "score_clip",
    "score_extractors",
    "score_fd",
    "score_irs",
    "score_scs",
    "scs",
    "scs_per_prompt",
    "scs_sensitivity",
]
