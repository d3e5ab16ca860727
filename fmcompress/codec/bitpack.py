"""Bit packing: five-bit table codes, zero flags four to a symbol, extra bits by width.

The extra bits (rule f) are grouped by width (2, 3, 4, 5), each group in coding order,
so that the decoder reads every group at a fixed width straight from the bytes.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .symbols import EXTRA_BITS, EXTRA_SHIFT, EXTRA_WIDTHS, NBITS, NIBBLES


def pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Bits of `values` (each `width` bits, most significant first), unpacked as 0/1 uint8."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint8)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8).ravel()


def unpack_fixed(bits: np.ndarray, width: int) -> np.ndarray:
    weights = (1 << np.arange(width - 1, -1, -1)).astype(np.int64)
    return bits.reshape(-1, width).astype(np.int64) @ weights


def pack_quads(nonzero: np.ndarray) -> np.ndarray:
    """Zero flags (bool, 1 = nonzero token), four to a symbol, the first flag in bit 3; the
    last symbol is padded with zero flags."""
    return NIBBLES.take(np.packbits(nonzero), axis=0).ravel()[:-(-nonzero.size // 4)]


def pack_extras(symbols: np.ndarray) -> bytes:
    """The raw extra bits of `symbols` (uint8, those without extra bits skipped), grouped by
    width (2, 3, 4, 5 bits), each group in the symbols' order, most significant bit first."""
    widths = np.take(NBITS, symbols)
    parts = [np.take(EXTRA_BITS[width], np.compress(widths == width, symbols), axis=0).ravel()
             for width in EXTRA_WIDTHS]
    return np.packbits(np.concatenate(parts)).tobytes()


def read_extras(extras: bytes, widths: np.ndarray) -> np.ndarray:
    """The values `pack_extras` wrote, for symbols whose extra bits have these `widths`
    (0 for a symbol without extra bits: its value is 0)."""
    values = np.zeros(widths.size, np.uint8)
    scatter_extras(extras, widths, values)
    return values


def scatter_extras(extras: bytes, widths: np.ndarray, out: np.ndarray) -> None:
    """Write the extra bits `pack_extras` wrote into `out` (uint8), at the symbols whose
    extra bits have these `widths` (0: none, left as they are): each width's group read
    at its fixed width straight from the bytes (`unpack_width`), then one scatter."""
    mask = np.empty(widths.size, bool)  # one buffer for the four masks
    positions = [np.flatnonzero(np.equal(widths, width, out=mask)) for width in EXTRA_WIDTHS]
    counts = np.zeros(EXTRA_SHIFT + 1, np.int64)
    counts[list(EXTRA_WIDTHS)] = [where.size for where in positions]
    check_extras(extras, counts)
    data = np.frombuffer(extras, np.uint8)
    start = 0
    for width, where in zip(EXTRA_WIDTHS, positions, strict=True):
        if where.size:
            out[where] = unpack_width(data, start, where.size, width)
        start += width * where.size

UNPACK_SHIFTS = {width: np.arange(7, -1, -1, dtype=np.uint64 if width > 4 else np.uint32) * width
                 for width in EXTRA_WIDTHS}  # per width: where each of 8 values sits in w bytes


def unpack_width(data: np.ndarray, start: int, count: int, width: int) -> np.ndarray:
    """`count` values of `width` bits (most significant first) from bit `start` of `data`,
    as uint8: the bytes realigned to `start`, then 8 // width values from each byte, or
    eight values from each `width` bytes (widths that do not divide 8)."""
    size = -(-count * width // 8)
    first, shift = divmod(start, 8)
    rows = -(-count // 8)
    aligned = np.zeros(rows * width, np.uint8)
    chunk = data[first:first + size + 1]
    if shift:
        aligned[:size] = chunk[:size] << shift
        aligned[:chunk.size - 1] |= chunk[1:] >> (8 - shift)
    else:
        aligned[:size] = chunk[:size]
    if 8 % width == 0:
        values = aligned[:, None] >> np.arange(8 - width, -1, -width, dtype=np.uint8)
    else:
        shifts = UNPACK_SHIFTS[width]
        grouped = aligned.reshape(rows, width)
        packed = grouped[:, 0].astype(shifts.dtype)
        for column in range(1, width):
            packed <<= 8
            packed |= grouped[:, column]
        values = (packed[:, None] >> shifts).astype(np.uint8)  # the cast keeps the low 8 bits
    values &= (1 << width) - 1
    return values.reshape(-1)[:count]


def check_extras(extras: bytes, counts: np.ndarray) -> None:
    """The extra bits must fill `extras` but for the last byte's padding; counts[w] is the
    number of symbols with w extra bits."""
    total = int(counts @ np.arange(counts.size))
    if total > 8 * len(extras) or 8 * len(extras) - total >= 8:
        raise InputError("codec stream damaged: the extra bits do not match the symbols")
