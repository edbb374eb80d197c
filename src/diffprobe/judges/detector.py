"""Open-vocabulary detector judge: OWL-ViT, OWLv2 or Grounding DINO through transformers, plus rules over boxes.

Two parts:

* :class:`ZeroShotDetector` -- the detection backend. Loads ``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``
  once (hub id or local folder) and returns, for a batch of images each with its own text queries, every predicted
  box with the query it scores highest for (``Boxes``: label = query index, score, xyxy in pixels). Images go
  through the model ``batch_size`` at a time; each image's queries are its own (padding queries of a batch are
  masked out), so an image's boxes do not depend on which images share its batch.
* :class:`DetectorJudge` -- the rules (:mod:`diffprobe.judges.boxes`): counting is the number of boxes of the
  object's noun scoring above ``box_threshold`` after class-wise NMS at ``nms_iou``; a relation holds when some
  box of the first object stands in it to some box of the second (GenEval's centre rule with ``margin``;
  ``pairs="top"`` compares only the highest-scoring box of each, as GenEval does); an attribute question holds when
  every object has a box of its colour. Colours are read by a CLIP, zero-shot among :data:`COLORS` on the box crop,
  only when a CLIP is given; without one a question naming a colour is not judged (:meth:`DetectorJudge.supports`
  says why, and ``diffprobe judge`` skips it with that reason). Sizes are never judged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, ModelNotFoundError
from .base import RELATION_WORDS, Judge, ObjectSpec, Question, Verdict
from .boxes import Boxes, keep_boxes, relations

# The colour words GenEval classifies among, and gray; a question's colour must be one of them.
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
COLOR_TEMPLATES = ("a photo of a {color} {noun}", "a photo of a {color}-colored {noun}", "a photo of a {color} object")
BOX_THRESHOLD = 0.3
NMS_IOU = 0.5
MARGIN = 0.1
PAIRS = ("any", "top")
SUPPORTED = {"owlvit": "owl", "owlv2": "owl", "grounding-dino": "grounding-dino",
             "mm-grounding-dino": "grounding-dino"}
# OWL models were trained on prompts like "a photo of a cat"; Grounding DINO reads bare phrases ("cat.").
QUERY_TEMPLATES = {"owl": "a photo of a {noun}", "grounding-dino": "{noun}"}
EXAMPLE_ID = "google/owlv2-base-patch16-ensemble"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class DetectionBackend(Protocol):
    """What the judge needs from a detector: boxes for images with their queries, and what identifies it.
    ``kind`` ("owl" or "grounding-dino") picks the default query template."""

    kind: str

    def identity(self) -> dict[str, Any]: ...

    def detect(self, images: Sequence[Image.Image], queries: Sequence[Sequence[str]]) -> list[Boxes]: ...


def _weights_hint(source: str) -> str:
    from ..embed.clip import hub_offline

    folder = "a local folder saved with the model's and its processor's save_pretrained"
    if hub_offline():
        return (f"HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache: download it where the hub is "
                f"reachable (`hf download {source}`), or give {folder}")
    return (f"check the id (for example {EXAMPLE_ID} or IDEA-Research/grounding-dino-tiny) and that huggingface.co "
            f"is reachable (`hf download {source}` says why not), or give {folder}")


def _hub_revision(source: str) -> str | None:
    """The commit of the cached hub snapshot ``source`` was loaded from (None when it cannot be told)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    match = re.search(r"snapshots/([0-9a-f]{40})", str(cached)) if isinstance(cached, str) else None
    return match.group(1) if match else None


class ZeroShotDetector:
    """A transformers zero-shot detector, loaded once; ``detect`` returns every box with its best query."""

    def __init__(self, name_or_path: str, *, device: str | torch.device | None = None, batch_size: int = 8,
                 local_only: bool = False):
        from ..embed.clip import hub_offline
        from ..models.libraries import quiet_libraries
        from ..models.loading import choose_device, local_folder, weights_fingerprint

        if batch_size < 1:
            raise InputError(f"the detector batch size must be at least 1, got {batch_size}")
        self.device = choose_device(device)  # a wrong device fails before any weights are read
        folder = local_folder(name_or_path)
        if folder is None and not _HUB_ID.match(name_or_path):
            raise ModelNotFoundError(f"detector {name_or_path!r} not found: it is neither a local folder nor a hub id "
                                     f"like {EXAMPLE_ID}")
        if folder is not None and not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"{folder} is not a detector folder (no config.json): "
                                     f"{_weights_hint(name_or_path)}")
        source = str(folder) if folder is not None else name_or_path
        local_only = local_only or hub_offline() or folder is not None
        with quiet_libraries(f"detector {source}"):
            from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

            try:
                config = AutoConfig.from_pretrained(source, local_files_only=local_only)
            except (OSError, ValueError) as err:
                raise ModelNotFoundError(f"detector weights {name_or_path!r} are not available ({type(err).__name__}):"
                                         f" {_weights_hint(name_or_path)}") from None
            self.kind = SUPPORTED.get(config.model_type)
            if self.kind is None:
                raise InputError(f"{name_or_path!r} is a {config.model_type!r} model; the detector judge runs "
                                 f"{', '.join(SUPPORTED)} checkpoints (for example {EXAMPLE_ID})")
            try:
                self.processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
                self.model = AutoModelForZeroShotObjectDetection.from_pretrained(source, local_files_only=local_only)
            except (OSError, ValueError) as err:
                raise ModelNotFoundError(f"detector {name_or_path!r} cannot be loaded ({type(err).__name__}: "
                                         f"{(str(err).strip().splitlines() or [''])[0][:200]}): "
                                         f"{_weights_hint(name_or_path)}") from None
        self.model.eval().to(self.device)
        self.batch_size = batch_size
        self.model_type = config.model_type
        self.model_id = str(folder.resolve()) if folder is not None else name_or_path
        self.weights = ({"weights_sha256": weights_fingerprint(folder)} if folder is not None
                        else {"revision": _hub_revision(name_or_path)})
        # OWLv2 pads each image to a square (bottom and right) before resizing: its boxes are fractions of that.
        self.pads_to_square = type(self.processor.image_processor).__name__.startswith("Owlv2")

    def identity(self) -> dict[str, Any]:
        return {"model": self.model_id, "model_type": self.model_type, **self.weights}

    def detect(self, images: Sequence[Image.Image], queries: Sequence[Sequence[str]]) -> list[Boxes]:
        if len(images) != len(queries):
            raise InputError(f"{len(images)} images but {len(queries)} query lists")
        if any(not q for q in queries):
            raise InputError("every image needs at least one text query")
        out: list[Boxes] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            texts = [list(q) for q in queries[start:start + self.batch_size]]
            forward = self._owl if self.kind == "owl" else self._grounding_dino
            with torch.inference_mode():
                logits, boxes = forward(chunk, texts)  # [B, P, Q] per-query logits, [B, P, 4] cxcywh fractions
            out += [self._boxes(s, b, im, len(t)) for s, b, im, t in zip(logits, boxes, chunk, texts, strict=True)]
        return out

    def _owl(self, images: list[Image.Image], texts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_lengths([t for ts in texts for t in ts], self.processor.tokenizer.model_max_length, "query")
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding="max_length",
                                truncation=True).to(self.device)
        outputs = self.model(**inputs)
        return outputs.logits.float(), outputs.pred_boxes.float()

    def _check_lengths(self, texts: list[str], limit: int, what: str) -> None:
        """A text longer than the text tower reads would be cut short: say which one instead."""
        for text, ids in zip(texts, self.processor.tokenizer(texts, truncation=False)["input_ids"], strict=True):
            if len(ids) > limit:
                raise InputError(f"the detector {what} {text!r} is {len(ids)} tokens, more than the {limit} that "
                                 f"{self.model_id} reads; use shorter nouns or a shorter query template")

    def _grounding_dino(self, images: list[Image.Image], texts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        # One caption per image ("cat. dog."); a query's logit for a box is its tokens' best logit.
        captions, spans = [], []
        for labels in texts:
            parts = [label.strip().lower() for label in labels]
            caption, cuts = "", []
            for part in parts:
                cuts.append((len(caption), len(caption) + len(part)))
                caption += part + ". "
            captions.append(caption.strip())
            spans.append(cuts)
        self._check_lengths(captions, self.model.config.max_text_len, "caption")
        encoded = self.processor.tokenizer(captions, padding="longest", return_offsets_mapping=True,
                                           return_tensors="pt")
        offsets = encoded.pop("offset_mapping")
        pixels = self.processor.image_processor(images, return_tensors="pt")
        outputs = self.model(**{k: v.to(self.device) for k, v in {**encoded, **pixels}.items()})
        token_logits = outputs.logits.float()  # [B, P, T]
        width = max(len(s) for s in spans)
        logits = torch.full((*token_logits.shape[:2], width), -torch.inf, device=token_logits.device)
        for i, cuts in enumerate(spans):
            start, end = offsets[i, :, 0], offsets[i, :, 1]
            for q, (lo, hi) in enumerate(cuts):
                tokens = ((start >= lo) & (end <= hi) & (end > start)).nonzero().flatten()
                tokens = tokens[tokens < token_logits.shape[-1]]
                if len(tokens):
                    logits[i, :, q] = token_logits[i][:, tokens.to(token_logits.device)].amax(-1)
        return logits, outputs.pred_boxes.float()

    def _boxes(self, logits: torch.Tensor, boxes: torch.Tensor, image: Image.Image, n_queries: int) -> Boxes:
        # The best query by logit (sigmoid saturates to ties); padding queries of the batch never win.
        best, label = logits[:, :n_queries].max(-1)
        w, h = image.size
        scale_w, scale_h = (max(w, h), max(w, h)) if self.pads_to_square else (w, h)
        cx, cy, bw, bh = boxes.unbind(-1)
        xyxy = torch.stack([(cx - bw / 2) * scale_w, (cy - bh / 2) * scale_h, (cx + bw / 2) * scale_w,
                            (cy + bh / 2) * scale_h], -1)
        return Boxes.of(label.cpu().numpy(), best.sigmoid().cpu().numpy(), xyxy.cpu().numpy())


class ColorClassifier:
    """Zero-shot colour of image crops with a CLIP embedder: the colour whose prompts (:data:`COLOR_TEMPLATES`,
    averaged) are most similar to the crop."""

    def __init__(self, embedder, colors: Sequence[str] = COLORS):
        self.embedder = embedder
        self.colors = tuple(colors)
        self._prompts: dict[str, np.ndarray] = {}

    def identity(self) -> dict[str, Any]:
        return {"clip": self.embedder.id, "colors": list(self.colors), "color_templates": list(COLOR_TEMPLATES)}

    def _class_vectors(self, noun: str) -> np.ndarray:
        if noun not in self._prompts:
            texts = [t.format(color=c, noun=noun) for c in self.colors for t in COLOR_TEMPLATES]
            emb = _unit(self.embedder.embed_text(texts)).reshape(len(self.colors), len(COLOR_TEMPLATES), -1)
            self._prompts[noun] = _unit(emb.mean(1))
        return self._prompts[noun]

    def classify(self, crops: Sequence[Image.Image], nouns: Sequence[str]) -> list[str]:
        """The colour of each crop (``nouns[i]`` is what crop ``i`` shows); one embedding call for all crops."""
        if not crops:
            return []
        feats = _unit(self.embedder.embed(list(crops)))
        return [self.colors[int(np.argmax(self._class_vectors(n) @ f))] for f, n in zip(feats, nouns, strict=True)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Seen:
    """One kept box as the judge reports it."""

    noun: str
    score: float
    xyxy: tuple[float, float, float, float]
    color: str | None = None

    def __str__(self) -> str:
        x0, y0, x1, y1 = self.xyxy
        color = f"{self.color} " if self.color else ""
        return f"{color}{self.noun} {self.score:.2f} at ({x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f})"


def _nouns(question: Question) -> list[str]:
    return list(dict.fromkeys(o.noun for o in question.objects))


class DetectorJudge(Judge):
    """Judges count, relation and attribute questions from detector boxes (see the module docstring)."""

    name = "detector"

    def __init__(self, detector: DetectionBackend, *, box_threshold: float = BOX_THRESHOLD, nms_iou: float = NMS_IOU,
                 margin: float = MARGIN, pairs: str = "any", query_template: str | None = None,
                 colors: ColorClassifier | None = None):
        for what, value in (("box threshold", box_threshold), ("NMS IoU", nms_iou)):
            if not 0.0 <= value <= 1.0:
                raise InputError(f"the {what} must be between 0 and 1, got {value}")
        if margin < 0:
            raise InputError(f"the relation margin must be at least 0, got {margin}")
        if pairs not in PAIRS:
            raise InputError(f"unknown relation pairing {pairs!r}; use any (some box of each) or top (the "
                             "highest-scoring box of each, as GenEval)")
        template = query_template or QUERY_TEMPLATES.get(detector.kind, "{noun}")
        if "{noun}" not in template:
            raise InputError(f"the query template {template!r} must contain {{noun}}")
        self.detector, self.colors = detector, colors
        self.box_threshold, self.nms_iou, self.margin, self.pairs = box_threshold, nms_iou, margin, pairs
        self.query_template = template

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, **self.detector.identity(), "query_template": self.query_template,
                "box_threshold": self.box_threshold, "nms_iou": self.nms_iou, "margin": self.margin,
                "pairs": self.pairs, **(self.colors.identity() if self.colors else {"clip": None})}

    def supports(self, question: Question) -> str | None:
        sized = [o for o in question.objects if o.size]
        if sized:
            return f"the detector judge does not judge sizes ({', '.join(map(str, sized))})"
        colored = [o for o in question.objects if o.color]
        if colored and self.colors is None:
            return f"colours ({', '.join(map(str, colored))}) need a CLIP: give the detector judge --clip MODEL"
        unknown = sorted({o.color for o in colored} - set(self.colors.colors if self.colors else ()))
        if unknown:
            known = ", ".join(self.colors.colors)  # type: ignore[union-attr]
            return f"colour(s) {', '.join(unknown)} are not among the detector judge's colours ({known})"
        return None

    def judge(self, image: Image.Image, question: Question) -> Verdict:
        return self.judge_many([image], [question])[0]

    def judge_many(self, images: list[Image.Image], questions: list[Question]) -> list[Verdict]:
        if len(images) != len(questions):
            raise InputError(f"{len(images)} images but {len(questions)} questions")
        for q in questions:
            why = self.supports(q)
            if why:
                raise InputError(f"cannot judge {q.text or q.kind!r}: {why}")
        nouns = [_nouns(q) for q in questions]
        queries = [[self.query_template.format(noun=n) for n in ns] for ns in nouns]
        kept = [keep_boxes(b, self.box_threshold, self.nms_iou) for b in self.detector.detect(images, queries)]
        seen = self._describe(images, questions, nouns, kept)
        return [answer(q, s, self.margin, self.pairs) for q, s in zip(questions, seen, strict=True)]

    def _describe(self, images, questions, nouns, kept) -> list[list[Seen]]:
        """Kept boxes as :class:`Seen`, with a colour for the boxes of nouns a question asks a colour of (all crops of
        the batch in one CLIP call)."""
        crops, where = [], []
        for i, (im, q, ns, boxes) in enumerate(zip(images, questions, nouns, kept, strict=True)):
            asked = {o.noun for o in q.objects if o.color}
            for j, (label, xyxy) in enumerate(zip(boxes.labels, boxes.xyxy, strict=True)):
                if ns[label] in asked:
                    crops.append(_crop(im, xyxy))
                    where.append((i, j, ns[label]))
        colors = self.colors.classify(crops, [n for _, _, n in where]) if crops else []
        color_of = {(i, j): c for (i, j, _), c in zip(where, colors, strict=True)}
        return [[Seen(ns[label], float(score), tuple(float(v) for v in xyxy), color_of.get((i, j)))
                 for j, (label, score, xyxy) in enumerate(zip(boxes.labels, boxes.scores, boxes.xyxy, strict=True))]
                for i, (ns, boxes) in enumerate(zip(nouns, kept, strict=True))]


def _crop(image: Image.Image, xyxy: np.ndarray) -> Image.Image:
    w, h = image.size
    x0, y0 = max(0, int(np.floor(xyxy[0]))), max(0, int(np.floor(xyxy[1])))
    x1, y1 = min(w, int(np.ceil(xyxy[2]))), min(h, int(np.ceil(xyxy[3])))
    if x1 <= x0 or y1 <= y0:  # a box outside the image or of no area: colour of the nearest pixel
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        x1, y1 = x0 + 1, y0 + 1
    return image.convert("RGB").crop((x0, y0, x1, y1))


def _matches(s: Seen, spec: ObjectSpec) -> bool:
    return s.noun == spec.noun and (spec.color is None or s.color == spec.color)


def _seen_text(seen: list[Seen]) -> str:
    return "saw " + (", ".join(map(str, seen)) if seen else "nothing")


def _raw(seen: list[Seen]) -> str:
    return json.dumps([{"noun": s.noun, "score": round(s.score, 4), "xyxy": [round(v, 1) for v in s.xyxy],
                        **({"color": s.color} if s.color else {})} for s in seen])


def answer(question: Question, seen: list[Seen], margin: float = MARGIN, pairs: str = "any") -> Verdict:
    """The verdict on ``question`` from the kept boxes ``seen`` (highest score first)."""
    text = _seen_text(seen)
    if question.kind == "count":
        spec = question.objects[0]
        n = sum(_matches(s, spec) for s in seen)
        return Verdict(n == question.count, str(n), f"expected {question.count} {spec}, found {n}; {text}", _raw(seen))
    if question.kind == "attribute":
        missing = [str(o) for o in question.objects if not any(_matches(s, o) for s in seen)]
        why = "all present" if not missing else "missing " + ", ".join(missing)
        return Verdict(not missing, "no" if missing else "yes", f"{why}; {text}", _raw(seen))
    a_spec, b_spec = question.objects
    As = [s for s in seen if _matches(s, a_spec)]
    Bs = [s for s in seen if _matches(s, b_spec)]
    words = RELATION_WORDS[question.relation]
    if not As or not Bs:
        missing = ", ".join(str(o) for o, xs in ((a_spec, As), (b_spec, Bs)) if not xs)
        return Verdict(False, "no", f"missing {missing}; {text}", _raw(seen))
    if len(As) == 1 and all(b is As[0] for b in Bs):  # "a cat left of a cat" with one cat
        return Verdict(False, "no", f"only one {a_spec}, a relation needs two; {text}", _raw(seen))
    if pairs == "top":
        As, Bs = As[:1], [b for b in Bs if b is not As[0]][:1]
    pair = next(((a, b) for a in As for b in Bs
                 if a is not b and question.relation in relations(np.asarray(a.xyxy), np.asarray(b.xyxy), margin)),
                None)
    if pair:
        return Verdict(True, "yes", f"{pair[0]} is {words} {pair[1]}; {text}", _raw(seen))
    a, b = As[0], next((b for b in Bs if b is not As[0]), Bs[0])
    found = relations(np.asarray(a.xyxy), np.asarray(b.xyxy), margin)
    where = " and ".join(RELATION_WORDS[r] for r in sorted(found)) or "not clearly beside, above or below"
    return Verdict(False, "no", f"no {a_spec} is {words} a {b_spec} (margin {margin:g}); {a} is {where} {b}; {text}",
                   _raw(seen))


def make_detector_judge(detector: str | DetectionBackend | None = None, *, clip: str | None = None,
                        device: str | None = None, batch_size: int = 8, box_threshold: float = BOX_THRESHOLD,
                        nms_iou: float = NMS_IOU, margin: float = MARGIN, pairs: str = "any",
                        query_template: str | None = None,
                        clip_factory: Callable[..., Any] | None = None) -> DetectorJudge:
    """The ``detector`` judge of :func:`diffprobe.judges.make_judge`: ``detector`` is a hub id, a local folder or a
    ready backend; ``clip`` (a CLIP hub id, alias or folder) enables colour questions."""
    if detector is None or (isinstance(detector, str) and not detector.strip()):
        raise InputError(f"the detector judge needs a detector model: --detector {EXAMPLE_ID} or a local folder")
    backend = ZeroShotDetector(detector, device=device, batch_size=batch_size) if isinstance(detector, str) \
        else detector
    colors = None
    if clip:
        from ..embed.clip import CLIPEmbedder

        colors = ColorClassifier((clip_factory or CLIPEmbedder)(clip, device=device))
    return DetectorJudge(backend, box_threshold=box_threshold, nms_iou=nms_iou, margin=margin, pairs=pairs,
                         query_template=query_template, colors=colors)


__all__ = ["BOX_THRESHOLD", "COLORS", "MARGIN", "NMS_IOU", "ColorClassifier", "DetectionBackend", "DetectorJudge",
           "Seen", "ZeroShotDetector", "answer", "make_detector_judge"]
