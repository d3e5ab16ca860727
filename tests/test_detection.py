"""YOLO-style decoding, NMS and box matching between a reference and a candidate model."""

from __future__ import annotations

import numpy as np
import pytest

from fmcompress.detection import box_agreement, box_iou, decode_yolo, match_boxes, nms
from fmcompress.errors import InputError
from fmcompress.evaluation.thirdparty import real_model

CLASSES = 3
ANCHORS = 16


def _output(images: list[list[tuple[float, float, float, float, int, float]]]) -> np.ndarray:
    """[N, 4 + classes, anchors]: each box (x1, y1, x2, y2, class, score) on its own anchor."""
    out = np.zeros((len(images), 4 + CLASSES, ANCHORS), dtype=np.float32)
    for n, boxes in enumerate(images):
        for a, (x1, y1, x2, y2, cls, score) in enumerate(boxes):
            out[n, :4, a] = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
            out[n, 4 + cls, a] = score
    return out


BOXES = [
    [(10, 10, 50, 60, 0, 0.9), (100, 100, 140, 130, 2, 0.7)],
    [(0, 0, 30, 30, 1, 0.8)],
]


def test_identical_outputs_agree_fully():
    out = _output(BOXES)
    result = box_agreement([out], [out.copy()])
    assert result["images"] == 2
    assert result["reference_boxes"] == result["candidate_boxes"] == result["matched"] == 3
    assert result["precision"] == result["recall"] == result["f1"] == 1.0
    assert result["mean_iou"] == pytest.approx(1.0)


def test_decoding_gives_corner_boxes_classes_and_scores():
    dets = decode_yolo(_output(BOXES))
    np.testing.assert_allclose(dets[0].boxes, [[10, 10, 50, 60], [100, 100, 140, 130]])
    assert dets[0].classes.tolist() == [0, 2]
    np.testing.assert_allclose(dets[0].scores, [0.9, 0.7], rtol=1e-6)
    assert len(dets[1]) == 1


def test_shifted_boxes_below_iou_half_are_unmatched():
    reference = _output([[(0, 0, 10, 10, 0, 0.9)]])
    shifted = _output([[(6, 0, 16, 10, 0, 0.9)]])  # IoU 40 / 160 = 0.25
    assert box_iou([[0, 0, 10, 10]], [[6, 0, 16, 10]])[0, 0] == pytest.approx(0.25)
    result = box_agreement(reference, shifted)
    assert (result["matched"], result["precision"], result["recall"], result["f1"]) == (0, 0.0, 0.0, 0.0)
    slightly = _output([[(2, 0, 12, 10, 0, 0.9)]])  # IoU 80 / 120 = 0.67
    assert box_agreement(reference, slightly)["matched"] == 1


def test_class_mismatch_is_unmatched():
    result = box_agreement(_output([[(0, 0, 10, 10, 0, 0.9)]]), _output([[(0, 0, 10, 10, 1, 0.9)]]))
    assert result["matched"] == 0 and result["f1"] == 0.0


def test_empty_sets():
    empty = _output([[], []])
    both = box_agreement(empty, empty)
    assert both["reference_boxes"] == both["candidate_boxes"] == 0
    assert both["f1"] == 1.0 and both["mean_iou"] is None
    lost = box_agreement(_output(BOXES), empty)  # the candidate finds nothing
    assert (lost["precision"], lost["recall"], lost["f1"]) == (1.0, 0.0, 0.0)
    extra = box_agreement(empty, _output(BOXES))  # the candidate invents boxes
    assert (extra["precision"], extra["recall"], extra["f1"]) == (0.0, 1.0, 0.0)


def test_partial_agreement_figures():
    candidate = _output([[(10, 10, 50, 60, 0, 0.9)], [(0, 0, 30, 30, 1, 0.8), (200, 200, 220, 220, 1, 0.5)]])
    result = box_agreement(_output(BOXES), candidate)
    assert result["matched"] == 2
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)


def test_score_threshold_and_class_agnostic_nms():
    out = _output([[(0, 0, 10, 10, 0, 0.9), (1, 0, 11, 10, 1, 0.6), (50, 50, 60, 60, 0, 0.2)]])
    dets = decode_yolo(out)[0]
    assert len(dets) == 1 and dets.classes.tolist() == [0]  # overlap of another class suppressed, 0.2 dropped
    assert len(decode_yolo(out, score_threshold=0.1, nms_iou=0.95)[0]) == 3
    assert nms(np.array([[0, 0, 10, 10], [0, 0, 10, 10]]), np.array([0.3, 0.6])).tolist() == [1]


def test_matching_is_one_to_one_by_best_iou():
    reference = decode_yolo(_output([[(0, 0, 10, 10, 0, 0.9)]]))[0]
    candidate = decode_yolo(_output([[(1, 0, 11, 10, 0, 0.9), (0, 0, 10, 10, 0, 0.5)]]), nms_iou=0.99)[0]
    matches = match_boxes(reference, candidate)
    assert [(r, c) for r, c, _ in matches] == [(0, 1)]


def test_anchors_first_layout_and_errors():
    out = _output(BOXES)
    assert box_agreement(out.transpose(0, 2, 1), out.transpose(0, 2, 1), layout="anchors_first")["matched"] == 3
    with pytest.raises(InputError, match="differs"):
        box_agreement(out, out[:1])
    with pytest.raises(InputError, match="YOLO-style"):
        box_agreement(np.zeros((2, 5)), np.zeros((2, 5)))
    with pytest.raises(InputError, match="layout"):
        decode_yolo(out, layout="nhwc")


@pytest.mark.real
def test_real_yolov8n_agrees_with_itself_on_a_photograph():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from fmcompress.ortrun import run_ort

    photo = Image.fromarray(skimage_data.astronaut()).resize((320, 320), Image.Resampling.BILINEAR)
    x = (np.asarray(photo, dtype=np.float32) / 255).transpose(2, 0, 1)[None]  # RGB, [0, 1], as nudenet feeds it
    outputs = run_ort(real_model("yolov8n"), [{"images": x}])
    assert outputs[0].shape == (1, 22, 2100)
    result = box_agreement(outputs, [o.copy() for o in outputs])
    assert result["reference_boxes"] >= 1  # nudenet finds the astronaut's face
    assert result["f1"] == 1.0
