"""Rules over detected boxes, with no model in sight: score threshold, class-wise NMS, relations of box centres.

Boxes are ``xyxy`` in pixels (x to the right, y downwards), ``labels`` index the image's query list.

* :func:`keep_boxes` -- boxes scoring strictly above the threshold, then class-wise non-maximum suppression: a box
  is dropped when it overlaps a higher-scoring box *of the same label* with IoU strictly above ``nms_iou``
  (``nms_iou=1`` keeps every box).
* :func:`relations` -- where box A lies relative to box B, as GenEval judges positions: the centre offset
  ``A - B`` is shrunk on each axis by ``margin`` times the two boxes' summed extent on that axis (never past zero);
  A is left of B when the shrunk horizontal offset points left by more than half the length of the full offset,
  and likewise right of, above and below. So a relation needs the centres apart by more than the margin allows
  and the offset mostly along that axis (a diagonal offset can give two relations, a small one none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RELATIONS = ("left_of", "right_of", "above", "below")


@dataclass(frozen=True)
class Boxes:
    """Detections of one image: ``labels`` int [N] (query index), ``scores`` float [N], ``xyxy`` float [N, 4]."""

    labels: np.ndarray
    scores: np.ndarray
    xyxy: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.scores.shape != (n,) or self.xyxy.shape != (n, 4):
            raise ValueError(f"boxes disagree in length: labels {self.labels.shape}, scores {self.scores.shape}, "
                             f"xyxy {self.xyxy.shape}")

    @classmethod
    def of(cls, labels, scores, xyxy) -> Boxes:
        return cls(np.asarray(labels, np.int64).reshape(-1), np.asarray(scores, np.float64).reshape(-1),
                   np.asarray(xyxy, np.float64).reshape(-1, 4))

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index) -> Boxes:
        return Boxes(self.labels[index], self.scores[index], self.xyxy[index])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes (continuous coordinates; an empty union gives 0)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: Boxes, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes class-wise greedy NMS keeps, highest score first (ties: the earlier box first)."""
    order = np.argsort(-boxes.scores, kind="stable")
    xyxy, labels = boxes.xyxy[order], boxes.labels[order]
    # A box may suppress only boxes of its own label ranked after it.
    suppresses = (box_iou(xyxy, xyxy) > iou_threshold) & (labels[:, None] == labels[None, :])
    suppresses = np.triu(suppresses, k=1)
    alive = np.ones(len(order), bool)
    for i in range(len(order)):  # greedy: a suppressed box suppresses nothing
        if alive[i]:
            alive &= ~suppresses[i]
    return order[alive]


def keep_boxes(boxes: Boxes, score_threshold: float, nms_iou: float) -> Boxes:
    """Boxes with score > ``score_threshold`` that survive class-wise NMS at ``nms_iou``, highest score first."""
    above = boxes.take(boxes.scores > score_threshold)
    return above.take(nms(above, nms_iou))


def centre(xyxy: np.ndarray) -> np.ndarray:
    return (xyxy[..., :2] + xyxy[..., 2:]) / 2


def relations(a: np.ndarray, b: np.ndarray, margin: float) -> set[str]:
    """The relations (of :data:`RELATIONS`) in which box ``a`` stands to box ``b`` (xyxy each); see the module."""
    offset = centre(a) - centre(b)
    extent = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin * extent, 0.0)
    length = float(np.hypot(*offset))
    if length == 0.0:
        return set()
    dx, dy = shrunk / length
    found = set()
    if dx < -0.5:
        found.add("left_of")
    if dx > 0.5:
        found.add("right_of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


__all__ = ["RELATIONS", "Boxes", "box_iou", "centre", "keep_boxes", "nms", "relations"]
