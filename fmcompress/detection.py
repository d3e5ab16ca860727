"""Box-level fidelity of YOLOv8-style detectors: decode, NMS, and match two models' boxes.

A detector's raw output says little about what changed for its users; the boxes
after the model's own decoding do. `box_agreement` decodes the reference and the
candidate outputs the way nudenet decodes its YOLOv8n (``nudenet._postprocess``)
and matches the two sets of boxes image by image:

* output layout [N, 4 + classes, anchors] (YOLOv8 / ultralytics export): rows 0-3
  are the box centre x, y, width and height in input pixels, the other rows the
  per-class scores (already sigmoid-ed, no objectness). [N, anchors, 4 + classes]
  is accepted too (``layout="anchors_first"``; ``"auto"`` picks the smaller of the
  two trailing axes as the 4 + classes one);
* an anchor is a candidate when its best class score is at least 0.25
  (nudenet keeps >= 0.2 and then `cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45)`
  drops the ones under 0.25, so 0.25 is its effective threshold); its class is the
  argmax;
* greedy NMS by descending score at IoU > 0.45, across classes (NMSBoxes is
  class-agnostic, and so is nudenet);
* boxes are compared in input pixels (nudenet's rescaling to the original image
  is the same affine map for both models, so it changes no IoU; its clipping to
  the image is optional here: ``image_size``);
* matching, per image and per class: all (reference, candidate) pairs of the
  same class with IoU >= 0.5, taken greedily by descending IoU, each box at most
  once.

Figures, summed over images: ``matched / candidate_boxes`` is the precision,
``matched / reference_boxes`` the recall, ``2 * matched / (reference + candidate)``
the F1 (1.0 when both sets are empty). numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

SCORE_THRESHOLD = 0.25  # nudenet: NMSBoxes score_threshold (candidates at >= 0.2 are pre-filtered)
NMS_IOU = 0.45  # nudenet: NMSBoxes nms_threshold
MATCH_IOU = 0.5
LAYOUTS = ("auto", "channels_first", "anchors_first")


@dataclass(frozen=True)
class Detections:
    """The boxes of one image: xyxy [K, 4] in input pixels, scores [K], classes [K], best score first."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes (zero-area boxes have IoU 0 with everything)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Indices kept by greedy NMS (descending score; a box is dropped at IoU > threshold with a kept one)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    iou = box_iou(boxes, boxes)
    kept: list[int] = []
    for index in order:
        if all(iou[index, k] <= iou_threshold for k in kept):
            kept.append(int(index))
    return np.asarray(kept, dtype=np.int64)


def decode_yolo(output: np.ndarray, *, score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
                layout: str = "auto", image_size: tuple[int, int] | None = None) -> list[Detections]:
    """Per-image detections from a YOLOv8-style output [N, 4 + classes, anchors] (see the module doc).

    `image_size` (width, height) clips the boxes to the image, as nudenet does.
    """
    rows = _anchor_rows(output, layout)
    result = []
    for image in rows:
        class_scores = image[:, 4:]
        best = class_scores.max(axis=1)
        keep = best >= score_threshold
        centre, size = image[keep, 0:2], image[keep, 2:4]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        if image_size is not None:
            boxes = np.clip(boxes, 0, np.array([*image_size, *image_size], dtype=np.float64))
        scores, classes = best[keep], class_scores[keep].argmax(axis=1)
        kept = nms(boxes, scores, nms_iou)
        result.append(Detections(boxes[kept], scores[kept], classes[kept].astype(np.int64)))
    return result


def match_boxes(reference: Detections, candidate: Detections,
                iou_threshold: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matches (reference index, candidate index, IoU) of same-class boxes at IoU >= threshold."""
    if not len(reference) or not len(candidate):
        return []
    iou = box_iou(reference.boxes, candidate.boxes)
    iou = np.where(reference.classes[:, None] == candidate.classes[None, :], iou, -1.0)
    pairs = np.argwhere(iou >= iou_threshold)
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_ref, used_cand, matches = set(), set(), []
    for r, c in pairs:
        if r in used_ref or c in used_cand:
            continue
        used_ref.add(r)
        used_cand.add(c)
        matches.append((int(r), int(c), float(iou[r, c])))
    return matches


def box_agreement(reference_outputs: Sequence[np.ndarray] | np.ndarray,
                  candidate_outputs: Sequence[np.ndarray] | np.ndarray, *,
                  score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
                  iou_threshold: float = MATCH_IOU, layout: str = "auto",
                  image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """How well the candidate's decoded boxes reproduce the reference's, summed over images.

    The outputs are what `fmcompress.ortrun.run_ort` returns (a list with one array
    per graph output, samples on axis 0; the first output is the detection head) or
    that array itself. Returns reference_boxes, candidate_boxes, matched, precision,
    recall, f1, mean_iou (over matched pairs, None without any), images and the
    thresholds used.
    """
    reference = _head(reference_outputs, "reference")
    candidate = _head(candidate_outputs, "candidate")
    if reference.shape != candidate.shape:
        raise InputError(f"reference output shape {list(reference.shape)} differs from candidate "
                         f"{list(candidate.shape)}")
    options = {"score_threshold": score_threshold, "nms_iou": nms_iou, "layout": layout, "image_size": image_size}
    ref_dets = decode_yolo(reference, **options)
    cand_dets = decode_yolo(candidate, **options)
    ref_total = sum(len(d) for d in ref_dets)
    cand_total = sum(len(d) for d in cand_dets)
    ious = [iou for r, c in zip(ref_dets, cand_dets, strict=True) for _, _, iou in match_boxes(r, c, iou_threshold)]
    matched = len(ious)
    return {
        "images": len(ref_dets),
        "reference_boxes": ref_total,
        "candidate_boxes": cand_total,
        "matched": matched,
        "precision": matched / cand_total if cand_total else 1.0,
        "recall": matched / ref_total if ref_total else 1.0,
        "f1": 2 * matched / (ref_total + cand_total) if ref_total + cand_total else 1.0,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "score_threshold": score_threshold,
        "nms_iou": nms_iou,
        "match_iou": iou_threshold,
    }


def _head(outputs: Sequence[np.ndarray] | np.ndarray, what: str) -> np.ndarray:
    if isinstance(outputs, np.ndarray):
        return outputs
    if not len(outputs):
        raise InputError(f"no {what} outputs")
    return np.asarray(outputs[0])


def _anchor_rows(output: np.ndarray, layout: str) -> np.ndarray:
    """The output as [N, anchors, 4 + classes] float64."""
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    output = np.asarray(output, dtype=np.float64)
    if output.ndim != 3:
        raise InputError(f"a YOLO-style output is [N, 4 + classes, anchors], got shape {list(output.shape)}")
    if layout == "auto":
        layout = "channels_first" if output.shape[1] <= output.shape[2] else "anchors_first"
    rows = output.transpose(0, 2, 1) if layout == "channels_first" else output
    if rows.shape[2] < 5:
        raise InputError(f"a YOLO-style output needs 4 box rows and at least one class row, got shape "
                         f"{list(output.shape)} ({layout})")
    return rows
