"""Exact judge of the shapes world: reads shapes from pixels alone and answers questions with a reason.

Pixels are explained as a mix of the white background and one palette colour (the renderer's anti-aliasing and a
generator's blur both look like that): each pixel gets the colour whose white-to-colour segment it lies nearest to,
if near enough and at least half-way to the colour. Connected regions of one colour are shapes; a region's kind
comes from how much of its bounding box it fills (square ~1, circle ~pi/4, upright triangle ~1/2) and from where
its mass sits (a triangle's is low). Regions too small, too unlike any kind, or far larger than one shape are
reported as what they are rather than forced into a class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from ...errors import InputError
from ...judges.base import RELATION_WORDS, Judge, ObjectSpec, Question, Verdict
from .render import BACKGROUND, COLORS, SIZES

_PALETTE = np.asarray(list(COLORS.values()), np.float32)  # [K, 3]
_NAMES = list(COLORS)
_MIN_AREA = 0.004  # of the image area: smaller regions are noise (a small square covers ~0.029)
_MAX_DIST = 60.0  # RGB distance from the nearest white-to-colour segment


@dataclass(frozen=True)
class Detection:
    color: str
    kind: str  # circle, square, triangle, or "blob" when the outline fits none
    size: str  # small, medium, big (nearest box half-extent), or "huge" (merged shapes)
    x: float  # bounding-box centre, fraction of width
    y: float  # bounding-box centre, fraction of height
    area: float  # fraction of the image
    fill: float  # region area / bounding-box area

    def __str__(self) -> str:
        return f"{self.color} {self.kind} at ({self.x:.2f}, {self.y:.2f})"


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32)
    arr = np.asarray(image, np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"the shapes judge needs an RGB image (H, W, 3), got an array of shape {arr.shape}")
    return arr if arr.max() > 1.5 else arr * 255.0


def _label_pixels(rgb: np.ndarray) -> np.ndarray:
    """Palette index per pixel, -1 for background or unexplained colour."""
    white = np.asarray(BACKGROUND, np.float32)
    d = rgb.reshape(-1, 1, 3) - white  # offset from white
    seg = _PALETTE - white  # [K, 3]
    alpha = np.clip((d * seg).sum(-1) / (seg * seg).sum(-1), 0.0, 1.2)  # [N, K] position along each segment
    resid = np.linalg.norm(d - alpha[..., None] * seg, axis=-1)  # [N, K]
    best = resid.argmin(1)
    rows = np.arange(len(best))
    ok = (alpha[rows, best] >= 0.5) & (resid[rows, best] <= _MAX_DIST)
    return np.where(ok, best, -1).reshape(rgb.shape[:2])


def _kind(mask: np.ndarray) -> str:
    """Kind of one region from its fill ratio and the balance of its mass between the box's top and bottom."""
    h, w = mask.shape
    fill = mask.mean()
    aspect = max(h, w) / max(1, min(h, w))
    if aspect > 1.6 or fill < 0.35:
        return "blob"
    rows = mask.sum(1).astype(np.float64)
    weight = np.clip((np.arange(h) + 0.5) / h * 2 - 0.5, 0, 1)  # 0 for the top half, 1 for the bottom, blended
    bottom = (rows * weight).sum() / rows.sum()  # 1/2 for shapes symmetric top-bottom, 3/4 for an upright triangle
    if bottom > 0.59:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def detect(image) -> list[Detection]:
    """Every shape-like region in the image, left to right."""
    rgb = _as_array(image)
    H, W = rgb.shape[:2]
    labels = _label_pixels(rgb)
    out: list[Detection] = []
    for k, name in enumerate(_NAMES):
        comp, n = ndimage.label(labels == k, structure=np.ones((3, 3), bool))
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is None:
                continue
            mask = comp[sl] == i
            area = mask.sum() / (H * W)
            if area < _MIN_AREA:
                continue
            hgt, wid = (sl[0].stop - sl[0].start) / H, (sl[1].stop - sl[1].start) / W
            half = max(hgt, wid) / 2
            size = min(SIZES, key=lambda s: abs(SIZES[s] - half))
            kind = _kind(mask)
            if half > 1.5 * SIZES["big"]:
                size = "huge"
            out.append(Detection(name, kind, size, (sl[1].start + sl[1].stop) / 2 / W,
                                 (sl[0].start + sl[0].stop) / 2 / H, float(area), float(mask.mean())))
    return sorted(out, key=lambda d: (d.x, d.y))


def _matches(d: Detection, spec: ObjectSpec) -> bool:
    return (d.kind == spec.noun and (spec.color is None or d.color == spec.color)
            and (spec.size is None or d.size == spec.size))


def _relation(a: Detection, b: Detection, relation: str) -> bool:
    from .grammar import relation_holds

    return relation_holds((a.x, a.y), (b.x, b.y), relation)


def _plural(spec: ObjectSpec, n: int) -> str:
    return f"{n} {spec}" + ("s" if n != 1 else "")


def _seen(dets: list[Detection]) -> str:
    return "saw " + (", ".join(map(str, dets)) if dets else "no shapes")


def answer(dets: list[Detection], question: Question) -> Verdict:
    """Answer ``question`` from detections (split from :func:`detect` so callers can reuse them)."""
    seen = _seen(dets)
    if question.kind == "count":
        spec = question.objects[0]
        n = sum(_matches(d, spec) for d in dets)
        ok = n == question.count
        huge = [d for d in dets if d.size == "huge" and d.color == spec.color]
        note = "; a region of that colour is larger than any shape (merged shapes?)" if huge else ""
        return Verdict(ok, str(n), f"expected {_plural(spec, question.count)}, found {n}; {seen}{note}")
    if question.kind == "attribute":
        found = {str(s): sum(_matches(d, s) for d in dets) for s in question.objects}
        missing = [s for s, n in found.items() if n == 0]
        ok = not missing
        why = "all present" if ok else "missing " + ", ".join(missing)
        return Verdict(ok, "yes" if ok else "no", f"{why}; {seen}")
    a_spec, b_spec = question.objects
    rel = question.relation
    As = [d for d in dets if _matches(d, a_spec)]
    Bs = [d for d in dets if _matches(d, b_spec)]
    words = RELATION_WORDS[rel]
    if not As or not Bs:
        missing = ", ".join(str(s) for s, xs in ((a_spec, As), (b_spec, Bs)) if not xs)
        return Verdict(False, "no", f"missing {missing}; {seen}")
    pair = next(((a, b) for a in As for b in Bs if a is not b and _relation(a, b, rel)), None)
    if pair:
        return Verdict(True, "yes", f"{pair[0]} is {words} {pair[1]}; {seen}")
    a, b = As[0], Bs[0]
    return Verdict(False, "no", f"both present but {a} is not {words} {b}; {seen}")


class ShapesJudge(Judge):
    """The exact judge for shapes-world images (any resolution; shapes measured relative to the image side)."""

    name = "shapes"

    def judge(self, image, question: Question) -> Verdict:
        return answer(detect(image), question)
