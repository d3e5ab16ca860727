"""The codec's parts: the symbol split, the bit packers (against Python's own binary
formatting), the zero-flag models, the clustering, the reference screening, quantisation."""

from __future__ import annotations

import numpy as np
import pytest
from codectools import METHODS, correlated_planes, round_trip
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fmcompress import codec
from fmcompress.codec import bitpack, clustering, encoder, references, symbols
from fmcompress.errors import InputError


def test_symbols_are_a_complete_prefix_free_split_of_the_int8_values():
    """Rule c, by its properties: (token, extra bits) <-> value is one to one, each token
    covers exactly 2^(its extra bits) values (so the split loses no code space), 0 is token
    0, the sign lives in the token, and the decoder's lookup inverts the split."""
    values = np.arange(256, dtype=np.uint8)
    signed = values.view(np.int8)
    pairs = set(zip(symbols.TOKEN.tolist(), symbols.EXTRA.tolist(), strict=True))
    assert len(pairs) == 256
    assert not (symbols.EXTRA >> symbols.NBITS).any()  # no bit beyond a token's extra bits
    assert (symbols.TOKEN < symbols.TOKENS).all()
    covered = np.bincount(symbols.TOKEN, minlength=symbols.TOKENS)
    np.testing.assert_array_equal(covered, 1 << symbols.TOKEN_NBITS.astype(np.int64))
    assert np.flatnonzero(symbols.TOKEN == 0).tolist() == [0]
    positive, negative = set(symbols.TOKEN[signed > 0]), set(symbols.TOKEN[signed < 0])
    assert not positive & negative
    np.testing.assert_array_equal(symbols.NBITS, symbols.TOKEN_NBITS[symbols.TOKEN])
    index = (symbols.TOKEN.astype(np.intp) << symbols.EXTRA_SHIFT) | symbols.EXTRA
    np.testing.assert_array_equal(symbols.SYMBOL[index], values)


def bit_string(values: np.ndarray, width: int) -> str:
    """Python's own binary formatting: the oracle for the packers."""
    return "".join(format(int(value), f"0{width}b") for value in values)


def test_extra_bits_grouped_by_width_round_trip():
    """pack_extras writes the extra bits grouped by width, most significant bit first."""
    rng = np.random.default_rng(6)
    coded = rng.integers(0, 256, 500).astype(np.uint8)
    packed = bitpack.pack_extras(coded)
    widths = symbols.NBITS[coded]
    expected = "".join(bit_string(symbols.EXTRA[coded[widths == width]], width)
                       for width in symbols.EXTRA_WIDTHS)
    padded = expected + "0" * (-len(expected) % 8)
    assert packed == int(padded, 2).to_bytes(len(padded) // 8, "big")
    np.testing.assert_array_equal(bitpack.read_extras(packed, widths), symbols.EXTRA[coded])
    with pytest.raises(InputError):
        bitpack.read_extras(packed + b"\0", widths)  # a byte more than the bits need


@pytest.mark.parametrize("width", symbols.EXTRA_WIDTHS)
def test_unpack_width_any_offset_and_count(width):
    """The decoder reads each width's group at any bit offset, any count (padding included)."""
    rng = np.random.default_rng(width)
    for start in range(9):
        for count in (0, 1, 7, 8, 9, 63, 200):
            values = rng.integers(0, 1 << width, count, dtype=np.uint8)
            bits = "".join(rng.choice(["0", "1"], start)) + bit_string(values, width)
            bits += "0" * (-len(bits) % 8)
            data = np.frombuffer(int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b"",
                                 np.uint8)
            np.testing.assert_array_equal(bitpack.unpack_width(data, start, count, width), values)


def test_fixed_width_and_quad_packing_against_python_bits():
    rng = np.random.default_rng(8)
    codes = rng.integers(0, 32, 77).astype(np.uint8)
    bits = bitpack.pack_fixed(codes, 5)
    assert "".join(map(str, bits)) == bit_string(codes, 5)
    np.testing.assert_array_equal(bitpack.unpack_fixed(bits, 5), codes)
    for size in (1, 4, 5, 11):
        flags = rng.random(size) < 0.5
        text = "".join("1" if flag else "0" for flag in flags) + "0" * (-size % 4)
        expected = [int(text[i:i + 4], 2) for i in range(0, len(text), 4)]
        assert bitpack.pack_quads(flags).tolist() == expected


@pytest.mark.parametrize("zeros", [0.0, 0.3, 0.6, 0.95])
def test_zero_flag_models_round_trip_and_match_the_estimate(zeros):
    """Models with P(0) >= SPLIT_ZERO code zero flags (rule f); the stream size is what
    `stream_bits` estimates (rule e (3) relies on it), within a few bytes."""
    from fmcompress.codec.tables import SPLIT_ZERO, table_probabilities

    rng = np.random.default_rng(int(zeros * 100))
    values = rng.integers(-40, 41, (1, 32, 24, 24))
    values[rng.random(values.shape) < zeros] = 0
    array = values.astype(np.int8)
    coding = encoder.analyse(array.reshape(32, -1).view(np.uint8))
    split = table_probabilities(coding.clustering.codes)[:, 0] >= SPLIT_ZERO
    assert split.any() == (zeros >= 0.6)
    for method in METHODS:
        stream = round_trip(array, method)
        estimate = encoder.stream_bits(coding, np.zeros((1, 32), np.int64), 0) / 8
        assert abs(len(stream) - estimate) < 48  # header, CRC, padding and ANS flush


def test_cluster_picks_k_and_refit_keeps_at_most_max_models():
    from fmcompress.codec.stream import MAX_MODELS
    from fmcompress.codec.tables import table_codes

    rng = np.random.default_rng(5)
    tables = rng.dirichlet(np.full(symbols.TOKENS, 0.3), size=70)
    histograms = np.stack([rng.multinomial(400, tables[i % 70]) for i in range(280)]).astype(float)
    found = clustering.cluster(histograms)
    assert 2 <= len(found.codes) <= MAX_MODELS
    assert found.bits == pytest.approx(clustering.finish(histograms, found.assign).bits)
    refit = clustering.refit(histograms, table_codes(histograms[:70]))  # 70 tables offered
    assert len(refit.codes) <= MAX_MODELS and refit.assign.max() < len(refit.codes)


def test_reference_screening(monkeypatch):
    """Many small planes: a subset is estimated first (REF_BUDGET); the rest only if the
    subset's references save REF_SCREEN of its bits."""
    planes = correlated_planes(channels=200, size=8)[0].reshape(200, -1).view(np.uint8)
    full = codec.choose_references(planes, 1, 200, 8)
    assert np.count_nonzero(full) > 150  # screened, found worth it, then all searched
    monkeypatch.setattr(references, "REF_SCREEN", 1.0)  # no subset can save all its bits
    assert not codec.choose_references(planes, 1, 200, 8).any()
    monkeypatch.setattr(references, "REF_BUDGET", 100.0)  # within budget: no screening
    np.testing.assert_array_equal(codec.choose_references(planes, 1, 200, 8), full)


def test_quantize_and_calibrate():
    x = np.array([-3.0, -0.5, 0.0, 0.26, 1.0, 2.0])
    scale = codec.calibrate_scale([x, x / 2])
    assert scale == pytest.approx(3.0 / 127)
    q = codec.quantize(x, scale)
    assert q.dtype == np.int8
    assert q[0] == -127 and q[2] == 0 and q[-1] == round(2.0 / scale)
    assert codec.quantize(np.array([1e9, -1e9]), 1.0).tolist() == [127, -127]  # clipped, never -128
    assert codec.quantize(np.array([0.5, 1.5, 2.5]), 1.0).tolist() == [0, 2, 2]  # halves to even
    assert codec.calibrate_scale([np.zeros((3, 3))]) == 1.0
    with pytest.raises(InputError):
        codec.calibrate_scale([np.array([np.nan])])
    with pytest.raises(InputError):
        codec.calibrate_scale([np.zeros(0)])
    with pytest.raises(InputError):
        codec.quantize(x, 0.0)


# magnitudes from 1e-30: a subnormal peak gives a scale that underflows to 0 (see the report)
MAGNITUDES = st.floats(1e-30, 1e6)


@given(arrays(np.float64, st.integers(1, 40),
              elements=st.one_of(st.just(0.0), MAGNITUDES, MAGNITUDES.map(lambda x: -x))))
def test_quantisation_error_is_at_most_half_a_step(values):
    """With the calibrated scale nothing clips: every value comes back within half a step."""
    scale = codec.calibrate_scale([values])
    q = codec.quantize(values, scale)
    assert np.abs(q.astype(np.float64) * scale - values).max() <= scale / 2 * (1 + 1e-9)
    assert q.min() >= -127
