"""The lossless int8 codec: round trips, damaged streams, dcac against the baseline, the study."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fmcompress import codec
from fmcompress.errors import InputError

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits_resnet.onnx"
METHODS = ("baseline", "dcac")


@contextmanager
def numpy_decoder():
    """Decode with the numpy path, as where numba is not installed."""
    saved = list(codec._JIT_KERNELS)
    codec._JIT_KERNELS[:] = [None]
    try:
        yield
    finally:
        codec._JIT_KERNELS[:] = saved


def round_trip(array: np.ndarray, method: str, window: int = 8) -> bytes:
    """Encode, then decode with the compiled kernels and with numpy: both give `array`."""
    stream = codec.encode(array, method=method, window=window)
    with numpy_decoder():
        by_numpy = codec.decode(stream)
    for back in (codec.decode(stream), by_numpy):
        assert back.dtype == np.int8
        assert back.shape == array.shape
        np.testing.assert_array_equal(back, array)
    return stream


def test_the_compiled_decoder_is_installed():
    """The test extra installs numba, so that the tests above run both decoders."""
    assert codec._jit_kernels() is not None


def correlated_planes(channels: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    """Each plane is the previous one shifted by a pixel, plus a little noise (a smooth field)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (size, size))
    for _ in range(24):  # smooth it, so that a one-pixel shift changes little
        base = (base + np.roll(base, 1, 0) + np.roll(base, 1, 1) + np.roll(base, (1, 1), (0, 1))) / 4
    base *= 100 / np.abs(base).max()
    planes = []
    for c in range(channels):
        noise = rng.integers(-2, 3, (size, size))
        planes.append(np.clip(np.roll(base, c, axis=1) + noise, -127, 127))
    return np.stack(planes).astype(np.int8)[None]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 5, 7), (9, 9), (17,), (), (1, 1, 1, 1), (4, 1, 1),
                                   (3, 1, 12), (3, 12, 1), (2, 0, 4, 4), (0,)])
def test_round_trip_shapes(method, shape):
    rng = np.random.default_rng(len(shape))
    round_trip(rng.integers(-128, 128, shape).astype(np.int8), method)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_special_values(method):
    shape = (2, 6, 5, 5)
    zeros = np.zeros(shape, np.int8)
    assert len(round_trip(zeros, method)) < 64  # constant planes cost only their model index
    round_trip(np.full(shape, -128, np.int8), method)
    round_trip(np.full(shape, 127, np.int8), method)
    constants = np.arange(12, dtype=np.int8).reshape(2, 6, 1, 1) * np.ones(shape, np.int8)
    round_trip(constants, method)
    extremes = np.where(np.random.default_rng(1).random(shape) < 0.5, -128, 127).astype(np.int8)
    round_trip(extremes, method)
    every_value = np.arange(-128, 128, dtype=np.int8).reshape(1, 4, 8, 8)
    round_trip(every_value, method)
    round_trip(correlated_planes(), method, window=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(array=st.integers(2, 4).flatmap(lambda rank: arrays(np.int8, st.tuples(
           *[st.integers(0 if axis == 0 else 1, 5) for axis in range(rank)]))),
       method=st.sampled_from(METHODS), window=st.integers(1, 6))
def test_round_trip_property(array, method, window):
    round_trip(array, method, window)


def test_dcac_beats_baseline_on_correlated_planes():
    maps = correlated_planes()
    baseline = len(codec.encode(maps, method="baseline"))
    dcac, refs = codec.encode_with_refs(maps, method="dcac")
    assert len(dcac) < 0.85 * baseline
    assert refs[0, 1:].all()  # every plane but the first refers to another


def test_dcac_on_noise_costs_at_most_the_reference_indices():
    noise = np.random.default_rng(2).integers(-128, 128, (1, 64, 16, 16)).astype(np.int8)
    baseline = len(codec.encode(noise, method="baseline"))
    dcac, refs = codec.encode_with_refs(noise, method="dcac")
    assert np.count_nonzero(refs) < 16  # a residual of noise is noise: few planes take one
    # the refs table (9 five-bit codes) and 64 reference indices, mostly 0
    assert len(dcac) <= baseline + 32


def test_encode_refuses_bad_input():
    with pytest.raises(InputError, match="int8"):
        codec.encode(np.zeros((2, 2), np.float32))
    with pytest.raises(InputError, match="method"):
        codec.encode(np.zeros((2, 2), np.int8), method="lz")
    with pytest.raises(InputError, match="window"):
        codec.encode(np.zeros((2, 2), np.int8), window=0)


def test_damaged_streams_raise_input_error():
    array = correlated_planes(channels=6, size=8)
    for method in METHODS:
        stream = codec.encode(array, method=method)
        for cut in range(len(stream)):
            with pytest.raises(InputError):
                codec.decode(stream[:cut])
        for position in range(0, len(stream), 3):
            damaged = bytearray(stream)
            damaged[position] ^= 0x5A
            with pytest.raises(InputError):
                codec.decode(bytes(damaged))
        with pytest.raises(InputError):
            codec.decode(stream + b"\0")
    with pytest.raises(InputError, match="not an fmcompress"):
        codec.decode(b"hello world, not a stream")


@pytest.mark.parametrize("sparse", [False, True])
def test_damage_behind_a_valid_checksum_never_misreads_memory(sparse):
    """A stream damaged and given a matching CRC (a forgery, or a bug) goes past the
    checksum: each decoder then raises InputError or returns an array of the coded shape,
    never reads out of bounds (the compiled kernels skip bounds checks, so the checks
    before them must hold) and both decoders agree."""
    import zlib

    rng = np.random.default_rng(3)
    values = np.clip(np.round(rng.laplace(0, 20, (1, 6, 9, 11))), -128, 127)
    if sparse:
        values[rng.random(values.shape) < 0.8] = 0
    stream = codec.encode(values.astype(np.int8), method="dcac")
    # past the header and shape: a forged shape may legitimately decode to a huge array
    # (constant planes cost almost nothing), which is the checksum's business
    body = codec.HEADER.size + 4 * values.ndim
    for position in range(body, len(stream) - 4):
        for flip in (0x01, 0x80):
            damaged = bytearray(stream[:-4])
            damaged[position] ^= flip
            forged = bytes(damaged) + zlib.crc32(damaged).to_bytes(4, "little")
            results = []
            for decoder in (nullcontext, numpy_decoder):
                with decoder():
                    try:
                        results.append(codec.decode(forged))
                    except InputError:
                        results.append(None)
            if results[0] is not None and results[1] is not None:
                assert results[0].shape == results[1].shape
                np.testing.assert_array_equal(results[0], results[1])


def test_decode_rejects_a_consistent_but_unknown_version():
    import zlib

    stream = bytearray(codec.encode(np.zeros((2, 2), np.int8)))
    stream[4] = 99
    body = bytes(stream[:-4])
    with pytest.raises(InputError, match="version 99"):
        codec.decode(body + zlib.crc32(body).to_bytes(4, "little"))


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
        codec.quantize(x, 0.0)


def test_zstd_bits_counts_compressed_bytes():
    assert codec.zstd_bits(np.zeros(100_000, np.int8)) < 8 * 200
    noise = np.random.default_rng(3).integers(-128, 128, 10_000).astype(np.int8)
    assert codec.zstd_bits(noise) > 8 * 9_900


@pytest.fixture(scope="module")
def digits_report():
    from fmcompress.data import input_specs, load_dataset
    from fmcompress.modelio import load_model

    dataset = load_dataset("mnist", input_specs(load_model(DIGITS)), num_samples=6)
    return codec.measure_model(DIGITS, dataset.batches(2), window=4)


def test_measure_model_on_digits(digits_report):
    report = digits_report
    names = [row.name for row in report.rows]
    assert len(names) == 8 and all("Relu" in name for name in names)  # the Flatten is 2-D
    assert report.samples == 6
    for row in report.rows:
        assert row.elements == 6 * int(np.prod(row.shape[1:]))
        assert row.raw_bpe == 8.0
        assert 0 < row.baseline_bpe < 8 and 0 < row.zstd_bpe < 8
        # dcac only keeps references the shared models confirm: at worst the index overhead
        assert row.dcac_bpe <= row.baseline_bpe + 0.02
        assert row.gain_percent == pytest.approx(100 * (1 - row.dcac_bpe / row.baseline_bpe))
    weights = np.array([row.elements for row in report.rows])
    for coding in ("zstd", "baseline", "dcac"):
        per_row = np.array([getattr(row, f"{coding}_bpe") for row in report.rows])
        assert report.total_bpe(coding) == pytest.approx(float(per_row @ weights / weights.sum()))
    data = report.to_dict()
    assert data["schema_version"] == codec.SCHEMA_VERSION
    assert data["total"]["elements"] == weights.sum()
    assert data["total"]["gain_percent"] == pytest.approx(report.gain_percent)
    assert all(rate > 0 for rate in report.megabytes_per_second("dcac"))


def test_measure_model_on_a_compressed_model():
    from fmcompress import api
    from fmcompress.data import input_specs, load_dataset
    from fmcompress.modelio import load_model

    result = api.compile(DIGITS, ceiling="4x", method="pca", data="mnist", num_samples=64)
    dataset = load_dataset("mnist", input_specs(load_model(DIGITS)), num_samples=3)
    report = codec.measure_model(result.model, dataset.batches(3))
    channels = {row.shape[1] for row in report.rows if row.shape[2:] == [28, 28]}
    assert 4 in channels  # the projected 28x28 maps keep 4 of their 16 channels
    assert all(row.dcac_bpe <= row.baseline_bpe + 0.05 for row in report.rows)


def test_cli_codec_table_and_json(tmp_path):
    import json

    from click.testing import CliRunner

    from fmcompress.cli import main

    report = tmp_path / "codec.json"
    result = CliRunner().invoke(main, ["codec", "models/digits_resnet.onnx", "--data", "mnist", "--num-samples", "2",
                                       "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["schema_version"] == 1 and data["samples"] == 2 and data["maps"]
    assert f"DC-AC {data['total']['dcac_bpe']:.3f}" in result.output
    assert data["total"]["dcac_bpe"] <= data["total"]["baseline_bpe"] < 8.0
    missing = CliRunner().invoke(main, ["codec", str(tmp_path / "absent.onnx")])
    assert missing.exit_code == 2 and missing.output.startswith("error: ")


@pytest.mark.parametrize("zeros", [0.0, 0.3, 0.6, 0.95])
def test_zero_flag_models_round_trip_and_match_the_estimate(zeros):
    """Models with P(0) >= SPLIT_ZERO code zero flags (rule f); the stream size is what
    `_stream_bits` estimates (rule e (3) relies on it), within a few bytes."""
    rng = np.random.default_rng(int(zeros * 100))
    values = rng.integers(-40, 41, (1, 32, 24, 24))
    values[rng.random(values.shape) < zeros] = 0
    array = values.astype(np.int8)
    split = codec._table_probabilities(codec._analyse(
        array.reshape(32, -1).view(np.uint8)).clustering.codes)[:, 0] >= codec.SPLIT_ZERO
    assert split.any() == (zeros >= 0.6)
    for method in METHODS:
        stream = round_trip(array, method)
        coding = codec._analyse(array.reshape(32, -1).view(np.uint8))
        estimate = codec._stream_bits(coding, np.zeros((1, 32), np.int64), 0) / 8
        assert abs(len(stream) - estimate) < 48  # header, CRC, padding and ANS flush


def test_decode_refuses_version_2_streams():
    import zlib

    stream = bytearray(codec.encode(np.zeros((2, 2), np.int8)))
    assert stream[4] == codec.VERSION == 3  # zero flags in quads, extra bits by width
    stream[4] = 2
    body = bytes(stream[:-4])
    with pytest.raises(InputError, match="version 2"):
        codec.decode(body + zlib.crc32(body).to_bytes(4, "little"))


@pytest.mark.parametrize("size", [1, 3, 4, 5, 8, 9, 31])
def test_zero_flag_quads_round_trip_any_length(size):
    """Flags go four to a symbol (rule f); the last symbol is padded, whatever the length."""
    rng = np.random.default_rng(size)
    values = rng.integers(-40, 41, (1, 8, 1, size))
    values[rng.random(values.shape) < 0.8] = 0
    values[0, 0, 0, 0] = 3  # no plane all zero by chance
    for method in METHODS:
        round_trip(values.astype(np.int8), method)


def test_extra_bits_grouped_by_width_round_trip():
    symbols = np.arange(256, dtype=np.uint8)
    packed = codec._pack_extras(symbols)
    widths = codec.NBITS[symbols]
    escaped = widths > 0
    assert len(packed) == -(-int(widths.sum()) // 8)
    np.testing.assert_array_equal(codec._read_extras(packed, widths[escaped]), codec.EXTRA[escaped])
    # symbols without extra bits among them (width 0) read as 0
    np.testing.assert_array_equal(codec._read_extras(packed, widths), codec.EXTRA)


@pytest.mark.parametrize("width", codec.EXTRA_WIDTHS)
def test_unpack_width_any_offset_and_count(width):
    """The decoder reads each width's group at any bit offset, any count (padding included)."""
    rng = np.random.default_rng(width)
    for start in range(9):
        for count in (0, 1, 7, 8, 9, 63, 200):
            values = rng.integers(0, 1 << width, count, dtype=np.uint8)
            bits = np.concatenate([rng.integers(0, 2, start, dtype=np.uint8),
                                   codec._pack_fixed(values, width)])
            data = np.packbits(bits)
            np.testing.assert_array_equal(codec._unpack_width(data, start, count, width), values)


def test_symbol_lookup_inverts_tokens_and_extra_bits():
    symbols = np.arange(256, dtype=np.uint8)
    index = (codec.TOKEN.astype(np.intp) << codec.EXTRA_SHIFT) | codec.EXTRA
    np.testing.assert_array_equal(codec.SYMBOL[index], symbols)


def test_large_dense_map_round_trip_across_lookup_slices():
    """Dense maps (no zero flags) larger than one slice of the decoder's lookups."""
    rng = np.random.default_rng(11)
    values = np.clip(np.round(rng.laplace(0, 12, (1, 3, 200, 300))), -128, 127).astype(np.int8)
    assert values.size > 2 * codec.LOOKUP_SLICE
    for method in METHODS:
        round_trip(values, method)


def test_cluster_picks_k_and_refit_keeps_at_most_max_models():
    rng = np.random.default_rng(5)
    tables = rng.dirichlet(np.full(codec.TOKENS, 0.3), size=70)
    histograms = np.stack([rng.multinomial(400, tables[i % 70]) for i in range(280)]).astype(float)
    clustering = codec._cluster(histograms)
    assert 2 <= len(clustering.codes) <= codec.MAX_MODELS
    assert clustering.bits == pytest.approx(codec._finish(histograms, clustering.assign).bits)
    codes = codec._table_codes(histograms[:70])  # 70 distinct tables offered
    refit = codec._refit(histograms, codes)
    assert len(refit.codes) <= codec.MAX_MODELS and refit.assign.max() < len(refit.codes)


def test_reference_screening(monkeypatch):
    """Many small planes: a subset is estimated first (REF_BUDGET); the rest only if the
    subset's references save REF_SCREEN of its bits."""
    planes = correlated_planes(channels=200, size=8)[0].reshape(200, -1).view(np.uint8)
    full = codec.choose_references(planes, 1, 200, 8)
    assert np.count_nonzero(full) > 150  # screened, found worth it, then all searched
    monkeypatch.setattr(codec, "REF_SCREEN", 1.0)  # no subset can save all its bits
    assert not codec.choose_references(planes, 1, 200, 8).any()
    monkeypatch.setattr(codec, "REF_BUDGET", 100.0)  # within budget: no screening
    np.testing.assert_array_equal(codec.choose_references(planes, 1, 200, 8), full)


def test_compiled_model_stacks_projection_and_coding(tmp_path):
    """On a model compile emitted, the report knows the original maps' size (from the plan in
    the metadata) and stacks projection and lossless coding."""
    from fmcompress import api
    from fmcompress.data import input_specs, load_dataset
    from fmcompress.modelio import load_model

    original = load_model("models/digits_resnet.onnx")
    compiled = api.compile(original, ceiling="4x", method="pca", data="mnist", num_samples=64,
                           latency_rounds=1, latency_repeats=1).model
    dataset = load_dataset("mnist", input_specs(original, {}), num_samples=2)
    before = codec.measure_model(original, dataset.batches(1))
    after = codec.measure_model(compiled, dataset.batches(1))
    stacked = after.stacked()
    assert before.stacked() is None and stacked is not None
    assert stacked["original_elements"] == before.elements  # every projected map found by name
    assert stacked["projection_ratio"] > 1.5 and stacked["lossless_ratio"] > 1.0
    assert stacked["total_ratio_vs_int8"] == pytest.approx(stacked["projection_ratio"] * stacked["lossless_ratio"])
