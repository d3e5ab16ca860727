"""The byte layout of a codec stream (docs/codec.md, "Stream format"), and bounded reads.

A stream is a header (magic, version, method, window, dtype, rank, dims), the section
sizes, the packed model tables, the extra bits, the ANS words and a CRC-32 of all before.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import InputError

MAGIC = b"FMCC"
VERSION = 3
METHODS = ("baseline", "dcac")
DTYPE_CODES = {1: np.dtype(np.int8)}
MAX_WINDOW = 255
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 34  # a header claiming more is refused before anything is allocated
HEADER = struct.Struct("<4sBBBBB")  # magic, version, method, window, dtype, ndim
SECTIONS = struct.Struct("<BII")  # models K, extras bytes, ANS words
CRC = struct.Struct("<I")

MAX_MODELS = 32
REFS_FLAG = 0x80  # in the models byte: the stream codes reference indices


class Reader:
    """Bounds-checked reads from a stream; every overrun is an InputError."""

    def __init__(self, data: bytes, end: int):
        self.data, self.pos, self.end = data, 0, end

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.pos + count > self.end:
            raise InputError(f"codec stream truncated or damaged: {what} runs past its end")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.take(layout.size, what))
