"""Rendered text lines (labels known by construction) and PP-OCR cls/rec scored on them."""

from __future__ import annotations

import string

import numpy as np
import pytest

from fmcompress.data import InputSpec, load_dataset
from fmcompress.errors import InputError
from fmcompress.evaluation import textlines
from fmcompress.evaluation.thirdparty import real_model

try:
    textlines.find_fonts()
    HAVE_FONTS = True
except InputError:
    HAVE_FONTS = False

needs_fonts = pytest.mark.skipif(not HAVE_FONTS, reason="needs the DejaVu fonts (fonts-dejavu-core)")
CHARS = textlines.DEFAULT_CHARSET


# ------------------------------------------------------------------ CTC decoding


def _one_hot(steps: list[int], classes: int) -> np.ndarray:
    probs = np.full((len(steps), classes), 0.01, dtype=np.float32)
    probs[np.arange(len(steps)), steps] = 0.9
    return probs


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    dictionary = ["blank", "a", "b", " "]
    probs = np.stack([
        _one_hot([1, 1, 0, 1, 2, 2, 0, 0], 4),  # a a _ a b b _ _ -> "aab"
        _one_hot([0, 0, 0, 0, 0, 0, 0, 0], 4),  # all blank -> ""
        _one_hot([2, 3, 3, 1, 0, 1, 1, 2], 4),  # b ' ' a _ a b -> "b aab"
    ])
    assert textlines.ctc_greedy_decode(probs, dictionary) == ["aab", "", "b aab"]


def test_ctc_greedy_decode_checks_shapes():
    with pytest.raises(InputError, match="dictionary has 3"):
        textlines.ctc_greedy_decode(np.zeros((1, 5, 4)), ["blank", "a", "b"])
    with pytest.raises(InputError, match=r"\[N, T, classes\]"):
        textlines.ctc_greedy_decode(np.zeros((5, 4)), ["blank", "a", "b", " "])


def test_exact_match_ignores_spaces_like_paddleocr():
    assert textlines.exact_match([" ab1 ", "xy"], ["ab1", "xz"]) == 0.5
    assert textlines.exact_match([" ab1 ", "xy"], ["ab1", "xz"], ignore_space=False) == 0.0
    assert textlines.exact_matches([" ab1 ", "xy"], ["ab1", "xz"]).tolist() == [True, False]


# --------------------------------------------------------------------- rendering


@needs_fonts
def test_rendering_is_deterministic_per_seed():
    a, labels_a = textlines.cls_dataset(6, seed=3)
    b, labels_b = textlines.cls_dataset(6, seed=3)
    c, _ = textlines.cls_dataset(6, seed=4)
    assert a.shape == (6, 3, 48, 192) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert not np.array_equal(a, c)
    assert set(labels_a.tolist()) <= {0, 1}
    x, texts = textlines.rec_dataset(6, seed=5, charset=CHARS)
    y, again = textlines.rec_dataset(6, seed=5, charset=CHARS)
    assert x.shape == (6, 3, 48, 320)
    np.testing.assert_array_equal(x, y)
    assert texts == again
    assert all(4 <= len(t) <= 12 and set(t) <= set(CHARS) for t in texts)


@needs_fonts
def test_preprocess_normalises_and_pads_like_rapidocr():
    rng = np.random.default_rng(0)
    line = textlines.render_line("AB12", rng)
    assert line.dtype == np.uint8 and line.ndim == 3 and line.shape[2] == 3
    out = textlines.preprocess(line, 320)
    width = min(320, int(np.ceil(48 * line.shape[1] / line.shape[0])))
    assert out.shape == (3, 48, 320)
    assert out.min() >= -1 and out.max() <= 1
    assert not out[:, :, width:].any()  # zero padding after normalisation, as rapidocr pads
    assert out[:, :, :width].mean() > 0  # a light background


def test_cls_rotation_label_is_the_180_class():
    assert textlines.CLS_LABELS.index("180") == 1


def test_resize_follows_opencv_bilinear():
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(1).integers(0, 256, size=(37, 151, 3), dtype=np.uint8)
    for size in ((192, 48), (61, 48), (320, 48)):
        ours = textlines.resize_bilinear(image, *size).astype(int)
        theirs = cv2.resize(image, size).astype(int)
        assert np.abs(ours - theirs).max() <= 1  # OpenCV rounds with 11-bit fixed-point weights


@needs_fonts
def test_npz_round_trip_through_load_dataset(tmp_path):
    inputs, labels = textlines.cls_dataset(5, seed=0)
    path = textlines.save_npz(tmp_path / "cls.npz", inputs, labels)
    loaded = load_dataset(path, [InputSpec("x", (1, 3, 48, 192))], num_samples=10, num_classes=2)
    np.testing.assert_array_equal(loaded.inputs["x"], inputs)
    np.testing.assert_array_equal(loaded.labels, labels)
    rec_inputs, _ = textlines.rec_dataset(3, seed=0, charset=CHARS)
    path = textlines.save_npz(tmp_path / "rec.npz", rec_inputs)
    loaded = load_dataset(path, [InputSpec("x", (1, 3, 48, 320))])
    assert loaded.labels is None
    np.testing.assert_array_equal(loaded.inputs["x"], rec_inputs)


def test_save_npz_refuses_text_labels(tmp_path):
    with pytest.raises(InputError, match="not labels"):
        textlines.save_npz(tmp_path / "r.npz", np.zeros((2, 3, 48, 320), np.float32), np.array(["ab", "cd"]))


# ------------------------------------------------------------- the real models


@pytest.mark.real
def test_dictionary_matches_the_recognizer_output():
    import onnx

    path = real_model("ppocr-rec")
    dictionary = textlines.rec_dictionary(path)
    output = onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim[2].dim_value
    assert len(dictionary) == output  # blank + metadata characters + space
    assert dictionary[0] == "blank" and dictionary[-1] == " "
    assert set(CHARS) <= set(dictionary)


@pytest.mark.real
@needs_fonts
def test_original_recognizer_reads_rendered_lines():
    path = real_model("ppocr-rec")
    digits, digit_texts = textlines.rec_dataset(15, seed=11, charset=string.digits)
    assert textlines.rec_exact_match(path, digits, digit_texts) >= 0.8
    inputs, texts = textlines.rec_dataset(30, seed=12)
    hits = textlines.rec_hits(path, inputs, texts)
    assert hits.shape == (30,) and hits.dtype == bool
    assert textlines.rec_exact_match(path, inputs, texts) == hits.mean() >= 0.8


@pytest.mark.real
@needs_fonts
def test_original_classifier_tells_upright_from_upside_down():
    inputs, labels = textlines.cls_dataset(40, seed=13)
    assert 0 < labels.sum() < len(labels)
    hits = textlines.cls_hits(real_model("ppocr-cls"), inputs, labels)
    assert hits.shape == (40,) and hits.dtype == bool
    assert textlines.cls_accuracy(real_model("ppocr-cls"), inputs, labels) == hits.mean() >= 0.9
