"""The second evaluation set (otherlines): deterministic, in the dictionary, shaped for PP-OCR,
unlike the first set (textlines), and read well by the original models."""

from __future__ import annotations

import numpy as np
import pytest

from fmcompress.data import InputSpec, load_dataset
from fmcompress.errors import InputError
from fmcompress.evaluation import otherlines, textlines
from fmcompress.evaluation.thirdparty import real_model

try:
    otherlines.find_fonts()
    HAVE_FONTS = True
except InputError:
    HAVE_FONTS = False

needs_fonts = pytest.mark.skipif(not HAVE_FONTS, reason="needs matplotlib's STIX and Computer Modern fonts")


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [otherlines.random_text(rng) for _ in range(n)]


# ------------------------------------------------------------------------- texts


def test_texts_stay_in_the_charset_and_lengths():
    texts = _texts(2000, seed=0)
    low, high = otherlines.LENGTHS
    assert all(low <= len(t) <= high for t in texts)
    assert set("".join(texts)) <= set(otherlines.CHARSET)
    assert set("".join(_texts(5000, seed=1))) == set(otherlines.CHARSET)  # every character comes up


def test_every_text_source_is_drawn():
    rng = np.random.default_rng(0)
    for name, (_, source) in otherlines.SOURCES.items():
        text = source(rng)
        assert text and set(text) <= set(otherlines.CHARSET), name
    codes = [otherlines.code_text(rng) for _ in range(300)]
    assert not set("".join(codes)) & set("0OoD1Il")  # nothing in a random code tells these apart


@pytest.mark.real
def test_charset_is_in_the_recognizers_dictionary():
    dictionary = set(textlines.rec_dictionary(real_model("ppocr-rec")))
    assert set(otherlines.CHARSET) <= dictionary


# --------------------------------------------------------------------- rendering


@needs_fonts
def test_datasets_are_deterministic_per_seed_and_shaped_for_ppocr():
    x, texts = otherlines.rec_dataset(6, seed=3)
    y, again = otherlines.rec_dataset(6, seed=3)
    z, other = otherlines.rec_dataset(6, seed=4)
    assert x.shape == (6, 3, textlines.HEIGHT, textlines.REC_WIDTH) and x.dtype == np.float32
    np.testing.assert_array_equal(x, y)
    assert texts == again and texts != other
    assert not np.array_equal(x, z)
    assert x.min() >= -1 and x.max() <= 1
    a, labels_a = otherlines.cls_dataset(6, seed=3)
    b, labels_b = otherlines.cls_dataset(6, seed=3)
    assert a.shape == (6, 3, textlines.HEIGHT, textlines.CLS_WIDTH) and a.dtype == np.float32
    assert labels_a.dtype == np.int64 and set(labels_a.tolist()) <= {0, 1}
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(labels_a, labels_b)


@needs_fonts
def test_classifier_lines_are_the_recognizers_half_turned_over():
    crops, _ = otherlines.lines(16, seed=5)
    inputs, labels = otherlines.cls_dataset(16, seed=5)
    assert 0 < labels.sum() < len(labels)
    assert textlines.CLS_LABELS[1] == "180"
    for crop, x, label in zip(crops, inputs, labels, strict=True):
        expected = textlines.preprocess(crop[::-1, ::-1] if label else crop, textlines.CLS_WIDTH)
        np.testing.assert_array_equal(x, expected)


def test_preprocessing_and_scoring_are_the_first_sets():
    assert otherlines.preprocess is textlines.preprocess  # imported, not copied
    assert otherlines.CLS_LABELS is textlines.CLS_LABELS


@needs_fonts
def test_render_line_gives_a_bgr_crop_and_respects_the_faces():
    rng = np.random.default_rng(0)
    line = otherlines.render_line('"Total": $12.50', rng)
    assert line.dtype == np.uint8 and line.ndim == 3 and line.shape[2] == 3
    assert line.shape[0] >= 10 and line.shape[1] > line.shape[0]
    cm = [f for f in otherlines.find_fonts() if f.name == "cmr10.ttf"]
    with pytest.raises(InputError, match="draws every character"):
        otherlines.render_line('"quoted"', rng, fonts=cm)  # Computer Modern draws " as a closing quote


@needs_fonts
def test_npz_round_trip_through_load_dataset(tmp_path):
    inputs, labels = otherlines.cls_dataset(4, seed=0)
    path = textlines.save_npz(tmp_path / "cls.npz", inputs, labels)
    loaded = load_dataset(path, [InputSpec("x", (1, 3, 48, 192))], num_samples=10, num_classes=2)
    np.testing.assert_array_equal(loaded.inputs["x"], inputs)
    np.testing.assert_array_equal(loaded.labels, labels)


@needs_fonts
def test_contact_sheet_writes_a_png(tmp_path):
    from PIL import Image

    crops, texts = otherlines.lines(3, seed=0)
    path = otherlines.contact_sheet(tmp_path / "sheet.png", crops, texts)
    with Image.open(path) as image:
        assert image.size[1] == 3 * (textlines.HEIGHT + 4) + 4


# ----------------------------------------------------------- unlike the first set


@needs_fonts
def test_fonts_are_disjoint_from_the_first_set():
    ours = otherlines.find_fonts()
    assert len(ours) >= 6
    assert not any("dejavu" in f.name.lower() for f in ours)
    assert not {f.name for f in ours} & set(textlines.FONT_FILES)


def test_texts_are_not_what_the_first_set_draws():
    texts = _texts(500, seed=2)
    # textlines draws 4-12 characters of DEFAULT_CHARSET: no spaces, no O/o/I/l, little punctuation
    beyond = [len(t) > 12 or not set(t) <= set(textlines.DEFAULT_CHARSET) for t in texts]
    assert np.mean(beyond) > 0.5
    words = {w.lower() for w in otherlines.WORDS}
    assert np.mean([any(part.lower() in words for part in t.split()) for t in texts]) > 0.2
    assert np.mean([any(c.isdigit() for c in t) for t in texts]) > 0.4  # dates, prices, codes


@needs_fonts
def test_backgrounds_are_light_and_dark():
    crops, _ = otherlines.lines(60, seed=6)
    dark = np.mean([crop.mean() < 110 for crop in crops])
    assert 0.15 < dark < 0.6  # the first set is always dark text on a light background
    rng = np.random.default_rng(6)
    first = [textlines.render_line(textlines.random_text(rng), rng) for _ in range(20)]
    assert min(crop.mean() for crop in first) > 110


# --------------------------------------------------------- the original models


@pytest.mark.slow
@needs_fonts
def test_original_models_read_the_second_set():
    inputs, texts = otherlines.rec_dataset(40, seed=31)
    assert textlines.rec_exact_match(real_model("ppocr-rec"), inputs, texts) >= 0.8
    inputs, labels = otherlines.cls_dataset(40, seed=31)
    assert 0 < labels.sum() < len(labels)
    assert textlines.cls_accuracy(real_model("ppocr-cls"), inputs, labels) >= 0.9
