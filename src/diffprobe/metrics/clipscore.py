"""CLIP score (100 * max(cos(text, image), 0)) and CLIP R-precision for images with known prompts."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _relative(path, root) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def clip_scores(image_features: np.ndarray, text_features: np.ndarray, scale: float = 100.0) -> np.ndarray:
    """Row-wise score of image i against text i: ``scale * max(cos, 0)``."""
    if image_features.shape != text_features.shape:
        raise InputError(f"image and text features differ in shape: {image_features.shape} vs {text_features.shape}")
    cos = np.sum(_normalize(image_features) * _normalize(text_features), axis=1)
    return scale * np.maximum(cos, 0.0)


def r_precision(image_features: np.ndarray, text_features: np.ndarray, true_index: np.ndarray) -> float:
    """Fraction of images whose most similar text (among all candidate texts) is their own prompt (R = 1)."""
    sim = _normalize(image_features) @ _normalize(text_features).T
    return float(np.mean(np.argmax(sim, axis=1) == np.asarray(true_index)))


def score_clip(
    path,
    model: str = "clip-vit-b32",
    *,
    device=None,
    batch_size: int = 64,
    cache=True,
    strict: bool = False,
    guidance: str | None = None,
    progress=None,
    backend=None,
) -> dict:
    """CLIP score per image and prompt, and R-precision over the set's prompts. ``backend``
    (``diffprobe.distributed``) decides where image features missing from the cache are computed; the prompts'
    text features are computed here."""
    from ..embed import get_embedder
    from ..embed.clip import CLIPEmbedder
    from .images import load_image_set
    from .provenance import provenance
    from .scs import summarize

    images = load_image_set(path, strict=strict, guidance=guidance)
    groups = images.groups()
    texts = images.prompt_texts()
    missing = [g for g, t in texts.items() if not t]
    if missing:
        raise InputError(
            f"CLIP score needs prompt texts; none for {len(missing)} prompt(s), e.g. '{missing[0]}' "
            "(add prompt.txt to each subfolder or a prompt column to the manifest)"
        )
    embedder = model if isinstance(model, CLIPEmbedder) else get_embedder(model, device=device, batch_size=batch_size)
    if not isinstance(embedder, CLIPEmbedder):
        raise InputError(f"CLIP score needs a CLIP model, got '{model}'")
    names = list(groups)
    prompt_list = [texts[g] for g in names]
    token_counts = embedder.count_tokens(prompt_list)
    truncated = [
        {"prompt_id": g, "tokens": c, "max_tokens": embedder.max_tokens}
        for g, c in zip(names, token_counts, strict=True)
        if c > embedder.max_tokens
    ]
    text_feats = embedder.embed_text(prompt_list)
    image_feats = images.features(embedder, cache=cache, progress=progress, backend=backend)
    owner = np.empty(len(images.items), dtype=np.int64)
    for p, g in enumerate(names):
        owner[groups[g]] = p
    per_image = clip_scores(image_feats, text_feats[owner])
    per_prompt = {g: float(per_image[groups[g]].mean()) for g in names}
    warnings = []
    if truncated:
        warnings.append(
            f"{len(truncated)} prompt(s) exceed {embedder.max_tokens} CLIP tokens and were truncated "
            "for the text embedding"
        )
    return {
        "metric": "clip_score",
        "definition": "100 * max(cos(text embedding, image embedding), 0); R-precision: top-1 prompt retrieval "
        "among all prompts of the set",
        "input": images.summary(),
        "embedder": embedder.describe(),
        "summary": summarize(list(per_prompt.values())),
        "r_precision": r_precision(image_feats, text_feats, owner) if len(names) > 1 else None,
        "r_precision_candidates": len(names),
        "truncated_prompts": truncated,
        "per_prompt": [
            {"prompt_id": g, "prompt": texts[g], "n_images": len(groups[g]), "clip_score": per_prompt[g]} for g in names
        ],
        # one row per image; ``key`` is the run's sample key (None for folders), which ``diffprobe export`` joins on
        "per_image": [
            {"key": item.key, "file": _relative(item.path, images.root), "prompt_id": item.group, "seed": item.seed,
             "score": float(value)}
            for item, value in zip(images.items, per_image, strict=True)
        ],
        "warnings": warnings,
        "provenance": provenance(),
    }
