"""The lossless int8 codec's streams, checked against oracles that do not come from its code.

Round trips (the decoded array is the input, through both decoders), sizes bounded by
the order-0 empirical entropy of the planes, the documented stream layout parsed with
struct and zlib, and damaged streams refused with InputError.
"""

from __future__ import annotations

import struct
import zlib
from contextlib import nullcontext

import numpy as np
import pytest
from codectools import (
    METHODS,
    correlated_planes,
    entropy_floor,
    int8_maps,
    laplace_map,
    numpy_decoder,
    plane_runs,
    round_trip,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmcompress import codec
from fmcompress.codec import decoder
from fmcompress.errors import InputError


def test_the_compiled_decoder_is_installed():
    """The test extra installs numba, so that the round trips run both decoders."""
    assert codec.compiled_kernels() is not None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 5, 7), (9, 9), (17,), (), (1, 1, 1, 1),
                                   (4, 1, 1), (3, 1, 12), (3, 12, 1), (2, 0, 4, 4), (0,),
                                   (2, 3, 2, 4, 5)])
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
    round_trip(correlated_planes(channels=6, size=8), method, window=codec.MAX_WINDOW)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(array=int8_maps(), method=st.sampled_from(METHODS), window=st.integers(1, 6))
def test_round_trip_property(array, method, window):
    round_trip(array, method, window)


def test_large_dense_map_round_trip_across_lookup_slices():
    """Dense maps (no zero flags) larger than one slice of the decoder's lookups."""
    rng = np.random.default_rng(11)
    values = np.clip(np.round(rng.laplace(0, 12, (1, 3, 200, 300))), -128, 127).astype(np.int8)
    assert values.size > 2 * decoder.LOOKUP_SLICE
    for method in METHODS:
        round_trip(values, method)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 8, 9, 31])
def test_zero_flag_quads_round_trip_any_length(size):
    """Flags go four to a symbol (rule f); the last symbol is padded, whatever the length."""
    rng = np.random.default_rng(size)
    values = rng.integers(-40, 41, (1, 8, 1, size))
    values[rng.random(values.shape) < 0.8] = 0
    values[0, 0, 0, 0] = 3  # no plane all zero by chance
    for method in METHODS:
        round_trip(values.astype(np.int8), method)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(array=int8_maps(), window=st.integers(1, 6))
def test_streams_are_never_below_the_entropy_of_their_planes(array, window):
    """Every plane is coded under one fixed model (on its own or as a residual): the
    stream cannot be shorter than the order-0 entropy of what it could have coded."""
    baseline = codec.encode(array, method="baseline")
    dcac = codec.encode(array, method="dcac", window=window)
    assert 8 * len(baseline) >= entropy_floor(array, None)
    assert 8 * len(dcac) >= entropy_floor(array, window)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("array", [laplace_map((1, 16, 32, 32), 10),
                                   laplace_map((2, 16, 28, 28), 10, 5), correlated_planes()],
                         ids=["laplace", "relu", "correlated"])
def test_stream_sizes_sit_just_above_the_entropy_floor(array, method):
    """On maps of a few thousand elements per plane the side information (tables, model
    indices, references) and the sharing of models cost a few percent over the planes'
    order-0 entropy; never less than it."""
    floor = entropy_floor(array, 8 if method == "dcac" else None)
    bits = 8 * len(round_trip(array, method))
    assert floor <= bits <= 1.06 * floor


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(array=int8_maps(), window=st.integers(1, 6))
def test_dcac_without_references_is_the_baseline_stream(array, window):
    """Rule e (3): where dcac keeps no reference it writes the baseline's stream (only the
    method and window bytes of the header, and so the CRC, differ); references stay
    inside their run and window."""
    baseline, none = codec.encode_with_refs(array, method="baseline")
    dcac, refs = codec.encode_with_refs(array, method="dcac", window=window)
    runs = plane_runs(array)
    assert refs.shape == none.shape == runs.shape[:2]
    assert not none.any()
    channel = np.arange(runs.shape[1])
    assert ((refs >= 0) & (refs <= np.minimum(channel, window))).all()
    if not refs.any():
        assert dcac[7:-4] == baseline[7:-4]
        assert (dcac[5], dcac[6]) == (1, window) and (baseline[5], baseline[6]) == (0, 0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7,), ()])
def test_stream_layout_matches_the_documented_format(method, shape):
    """docs/codec.md, "Stream format": magic, version 3, method, window, dtype, rank, the
    dims as uint32, and a CRC-32 of everything before it in the last four bytes."""
    array = np.random.default_rng(4).integers(-20, 20, shape).astype(np.int8)
    stream = codec.encode(array, method=method, window=5)
    magic, version, method_code, window, dtype, rank = struct.unpack_from("<4sBBBBB", stream)
    assert (magic, version, dtype, rank) == (b"FMCC", 3, 1, len(shape))
    assert (method_code, window) == ((0, 0) if method == "baseline" else (1, 5))
    assert struct.unpack_from(f"<{rank}I", stream, 9) == shape
    assert int.from_bytes(stream[-4:], "little") == zlib.crc32(stream[:-4])


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


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64, bool])
def test_encode_refuses_other_dtypes(dtype):
    with pytest.raises(InputError, match="int8"):
        codec.encode(np.zeros((2, 3), dtype))


def test_encode_refuses_bad_input():
    with pytest.raises(InputError, match="method"):
        codec.encode(np.zeros((2, 2), np.int8), method="lz")
    for window in (0, codec.MAX_WINDOW + 1):
        with pytest.raises(InputError, match="window"):
            codec.encode(np.zeros((2, 2), np.int8), window=window)
    with pytest.raises(InputError, match="dims"):
        codec.encode(np.zeros((1,) * 9, np.int8))


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


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(array=int8_maps(), method=st.sampled_from(METHODS), data=st.data())
def test_any_truncation_or_bit_flip_is_refused(array, method, data):
    """The CRC-32 catches every single-bit error and every truncation (rule g)."""
    stream = codec.encode(array, method=method)
    cut = data.draw(st.integers(0, len(stream) - 1))
    with pytest.raises(InputError, match="codec stream|not an fmcompress"):
        codec.decode(stream[:cut])
    bit = data.draw(st.integers(0, 8 * len(stream) - 1))
    damaged = bytearray(stream)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InputError):
        codec.decode(bytes(damaged))


@pytest.mark.parametrize("sparse", [False, True])
def test_damage_behind_a_valid_checksum_never_misreads_memory(sparse):
    """A stream damaged and given a matching CRC (a forgery, or a bug) goes past the
    checksum: each decoder then raises InputError or returns an array of the coded shape,
    never reads out of bounds (the compiled kernels skip bounds checks, so the checks
    before them must hold) and both decoders agree."""
    rng = np.random.default_rng(3)
    values = np.clip(np.round(rng.laplace(0, 20, (1, 6, 9, 11))), -128, 127)
    if sparse:
        values[rng.random(values.shape) < 0.8] = 0
    stream = codec.encode(values.astype(np.int8), method="dcac")
    # past the header and shape: a forged shape may legitimately decode to a huge array
    # (constant planes cost almost nothing), which is the checksum's business
    body = 9 + 4 * values.ndim
    for position in range(body, len(stream) - 4):
        for flip in (0x01, 0x80):
            damaged = bytearray(stream[:-4])
            damaged[position] ^= flip
            forged = bytes(damaged) + zlib.crc32(damaged).to_bytes(4, "little")
            results = []
            for decoding in (nullcontext, numpy_decoder):
                with decoding():
                    try:
                        results.append(codec.decode(forged))
                    except InputError:
                        results.append(None)
            if results[0] is not None and results[1] is not None:
                assert results[0].shape == results[1].shape
                np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("version", [1, 2, 99])
def test_decode_refuses_other_versions(version):
    """Versions 1 and 2 (older layouts) and unknown ones are refused, even with a valid CRC."""
    stream = bytearray(codec.encode(np.zeros((2, 2), np.int8)))
    stream[4] = version
    body = bytes(stream[:-4])
    with pytest.raises(InputError, match=f"version {version}"):
        codec.decode(body + zlib.crc32(body).to_bytes(4, "little"))
