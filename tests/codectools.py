"""Helpers of the codec tests: round trips through both decoders, an order-0 entropy
floor computed from the raw planes, and generators of int8 maps."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fmcompress import codec
from fmcompress.codec import decoder

METHODS = ("baseline", "dcac")


@contextmanager
def numpy_decoder():
    """Decode with the numpy path, as where numba is not installed."""
    saved = list(decoder._JIT_KERNELS)
    decoder._JIT_KERNELS[:] = [None]
    try:
        yield
    finally:
        decoder._JIT_KERNELS[:] = saved


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


def plane_runs(array: np.ndarray) -> np.ndarray:
    """The planes of the documented layout (rule a), as (G, C, HW) uint8: [..., C, H, W] is
    G runs of C planes of H x W; a 0-, 1- or 2-D array is one plane."""
    if array.ndim <= 2:
        return array.reshape(1, 1, -1).view(np.uint8)
    channels, height, width = array.shape[-3:]
    return array.reshape(math.prod(array.shape[:-3]), channels, height * width).view(np.uint8)


def order0_bits(symbols: np.ndarray) -> float:
    """n times the empirical entropy of the symbols (bits): no code with one fixed model
    per plane can code them in fewer."""
    if symbols.size == 0:
        return 0.0
    counts = np.unique(symbols, return_counts=True)[1]
    return float(-(counts * np.log2(counts / symbols.size)).sum())


def entropy_floor(array: np.ndarray, window: int | None) -> float:
    """A lower bound on the coded bits: per plane, the order-0 entropy of the plane, or
    (with a window) the smallest of that and of its residuals (mod 256) from each of the
    previous `window` planes of its run, whichever the encoder could have coded."""
    total = 0.0
    for run in plane_runs(array):
        for channel, plane in enumerate(run):
            options = [plane]
            if window:
                start = max(0, channel - window)
                options += [plane - reference for reference in run[start:channel]]
            total += min(order0_bits(option) for option in options)
    return total


def correlated_planes(channels: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    """Each plane is the previous one shifted by a pixel, plus a little noise (a smooth field)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (size, size))
    for _ in range(24):  # smooth it, so that a one-pixel shift changes little
        shifted = np.roll(base, 1, 0) + np.roll(base, 1, 1) + np.roll(base, (1, 1), (0, 1))
        base = (base + shifted) / 4
    base *= 100 / np.abs(base).max()
    planes = []
    for c in range(channels):
        noise = rng.integers(-2, 3, (size, size))
        planes.append(np.clip(np.roll(base, c, axis=1) + noise, -127, 127))
    return np.stack(planes).astype(np.int8)[None]


def laplace_map(shape: tuple[int, ...], spread: float, shift: float = 0.0) -> np.ndarray:
    values = np.random.default_rng(0).laplace(0, spread, shape) - shift
    return np.clip(np.round(values), -128 if shift == 0 else 0, 127).astype(np.int8)


ELEMENT_KINDS = (
    st.integers(-128, 127),  # anything
    st.integers(-3, 3),  # small values: tokens without extra bits
    st.sampled_from([-128, -127, 0, 127]),  # extremes
    st.integers(0, 40),  # nonnegative, as after a ReLU
)


@st.composite
def int8_maps(draw: st.DrawFn) -> np.ndarray:
    """int8 arrays of rank 0 to 5 (empty ones included), of mixed value ranges, some with
    constant planes."""
    rank = draw(st.integers(0, 5))
    shape = tuple(draw(st.integers(0, 6)) for _ in range(rank))
    array = draw(arrays(np.int8, shape, elements=draw(st.sampled_from(ELEMENT_KINDS))))
    if rank >= 3 and array.size and draw(st.booleans()):
        fill = draw(st.sampled_from([0, 1, -1, 7, -128, 127]))
        array[..., ::2, :, :] = fill  # every other plane constant
    return array
