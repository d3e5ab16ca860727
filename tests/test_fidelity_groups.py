"""Fidelity per output and per channel group of a detection head, against plain numpy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fmcompress.evaluation.thirdparty import real_model
from fmcompress.metrics import fidelity, head_axis, output_figures
from fmcompress.reports.markdown import render_compile_markdown


def _cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean over samples of the cosine of the flattened samples, one sample at a time."""
    values = []
    for r, c in zip(ref, cand, strict=True):
        r, c = r.ravel().astype(np.float64), c.ravel().astype(np.float64)
        values.append(float(r @ c / (np.sqrt(r @ r) * np.sqrt(c @ c))))
    return float(np.mean(values))


def _figures(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float, float]:
    ref, cand = ref.astype(np.float64), cand.astype(np.float64)
    return _cosine(ref, cand), float(np.sqrt(((cand - ref) ** 2).sum() / (ref**2).sum())), float(np.abs(cand - ref).max())


def _head_pair(seed: int = 0, anchors: int = 600, channels: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """[N, anchors, K]: large boxes barely perturbed, small scores heavily perturbed."""
    rng = np.random.default_rng(seed)
    ref = np.concatenate([rng.uniform(0, 320, (3, anchors, 4)), rng.uniform(0, 1, (3, anchors, channels - 4))],
                         axis=2).astype(np.float32)
    noise = np.concatenate([rng.normal(0, 0.5, (3, anchors, 4)), rng.normal(0, 0.3, (3, anchors, channels - 4))],
                           axis=2)
    return ref, (ref + noise).astype(np.float32)


def _check(entry: dict, ref: np.ndarray, cand: np.ndarray) -> None:
    np.testing.assert_allclose([entry["cosine_similarity"], entry["relative_error"], entry["max_abs_error"]],
                               _figures(ref, cand), rtol=1e-6)


def test_per_output_figures_match_numpy_and_overall_is_unchanged():
    head, head_cand = _head_pair()
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 7)).astype(np.float32)
    scores_cand = scores + rng.normal(0, 0.1, scores.shape).astype(np.float32)
    result = fidelity([head, scores], [head_cand, scores_cand])
    first, second = output_figures([head, scores], [head_cand, scores_cand], ["boxes", "logits"])
    assert (first["name"], first["shape"], second["name"], second["shape"]) == ("boxes", [3, 600, 10], "logits", [3, 7])
    _check(first, head, head_cand)
    _check(second, scores, scores_cand)
    assert second["channels"] is None
    assert result.cosine_similarity == pytest.approx((_cosine(head, head_cand) + _cosine(scores, scores_cand)) / 2)
    assert "outputs" not in result.to_dict()  # measure adds them beside the overall figures
    assert [o["name"] for o in output_figures([head], [head_cand])] == ["output0"]


def test_channel_groups_match_numpy_and_expose_score_loss():
    ref, cand = _head_pair()
    channels = output_figures([ref], [cand])[0]["channels"]
    assert channels["axis"] == 2 and channels["layout"] == "channels_last"
    box, scores = channels["groups"]
    assert (box["name"], box["channels"], scores["name"], scores["channels"]) == ("box", [0, 4], "scores", [4, 10])
    _check(box, ref[..., :4], cand[..., :4])
    _check(scores, ref[..., 4:], cand[..., 4:])
    want = np.corrcoef(ref[..., 4:].ravel(), cand[..., 4:].ravel())[0, 1]
    assert scores["correlation"] == pytest.approx(want, rel=1e-6)
    for entry in channels["channels"]:
        k = entry["index"]
        assert entry["group"] == ("box" if k < 4 else "scores")
        _check(entry, ref[..., k], cand[..., k])
        assert entry["correlation"] == pytest.approx(np.corrcoef(ref[..., k].ravel(), cand[..., k].ravel())[0, 1])
    overall = output_figures([ref], [cand])[0]["cosine_similarity"]
    assert overall > 0.99 and scores["cosine_similarity"] < 0.95 and scores["correlation"] < 0.8


def test_channels_first_layout_and_constant_channel():
    ref, cand = _head_pair(anchors=400, channels=9)
    ref, cand = ref.transpose(0, 2, 1).copy(), cand.transpose(0, 2, 1).copy()
    ref[:, 8], cand[:, 8] = 0.5, 0.5  # a constant score channel: no correlation
    channels = output_figures([ref], [cand])[0]["channels"]
    assert channels["axis"] == 1 and channels["layout"] == "channels_first"
    _check(channels["groups"][0], ref[:, :4], cand[:, :4])
    assert channels["channels"][8]["correlation"] is None
    assert channels["channels"][8]["cosine_similarity"] == pytest.approx(1.0)


def test_what_is_not_a_detection_head():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 40, 300))
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert head_axis(softmax) is None  # a CTC head: a distribution per step
    assert head_axis(rng.normal(size=(2, 10))) is None
    assert head_axis(rng.normal(size=(2, 4, 500))) is None  # boxes alone
    assert head_axis(rng.normal(size=(2, 50, 100))) is None  # too few anchors per quantity
    assert head_axis(rng.normal(size=(2, 84, 8400))) == 1 and head_axis(rng.normal(size=(1, 3549, 6))) == 2


def test_report_renders_outputs_and_groups():
    ref, cand = _head_pair()
    quality = {**fidelity([ref], [cand]).to_dict(), "outputs": output_figures([ref], [cand])}
    text = render_compile_markdown({"model": "m.onnx", "fidelity": quality})
    assert "| output | shape | cosine | relative error | max abs error | correlation |" in text
    assert "`output0` box (channels 0-3)" in text and "`output0` scores (channels 4-9)" in text
    assert "per channel)" in text
    plain = {**fidelity([ref], [cand]).to_dict(), "outputs": output_figures([ref[:, :2, 0]], [cand[:, :2, 0]])}
    assert "| output |" not in render_compile_markdown({"model": "m.onnx", "fidelity": plain})
    old = {key: value for key, value in quality.items() if key != "outputs"}  # reports before the field
    assert "| output |" not in render_compile_markdown({"model": "m.onnx", "fidelity": old})


@pytest.mark.slow
def test_yolov8n_groups_differ_from_the_overall_cosine():
    """YOLOv8n's [N, 22, anchors] head: input noise stands in for compression."""
    ort = pytest.importorskip("onnxruntime")
    path = real_model("yolov8n")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, 3, 320, 320)).astype(np.float32)
    noisy = np.clip(images + rng.normal(0, 0.05, images.shape), 0, 1).astype(np.float32)
    name = onnx.load(str(path)).graph.output[0].name
    ref = np.concatenate([session.run(None, {"images": x[None]})[0] for x in images])
    cand = np.concatenate([session.run(None, {"images": x[None]})[0] for x in noisy])
    result = fidelity([ref], [cand])
    entry = output_figures([ref], [cand], [name])[0]
    assert entry["name"] == "output0" and entry["shape"] == [2, 22, 2100]
    box, scores = entry["channels"]["groups"]
    _check(box, ref[:, :4], cand[:, :4])
    _check(scores, ref[:, 4:], cand[:, 4:])
    assert abs(scores["cosine_similarity"] - result.cosine_similarity) > 1e-3
    assert len(entry["channels"]["channels"]) == 22
