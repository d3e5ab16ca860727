"""The decoder: `decode` a stream back into the exact int8 array (rule g).

It checks the magic, the version and the CRC-32 first, then every count and bound it
reads, and raises InputError for anything wrong: a damaged stream never decodes into a
wrong array. The step after the ANS calls runs in the compiled kernels of
fmcompress.codec.jit where numba is installed, else with numpy; both give the same array.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import constriction
import numpy as np

from ..errors import InputError
from .bitpack import check_extras, scatter_extras, unpack_fixed
from .planes import plane_layout, reconstruct
from .stream import (
    CRC,
    DTYPE_CODES,
    HEADER,
    MAGIC,
    MAX_DIMS,
    MAX_ELEMENTS,
    MAX_MODELS,
    METHODS,
    REFS_FLAG,
    SECTIONS,
    VERSION,
    Reader,
)
from .symbols import BARE, EXTRA_SHIFT, QUAD_FLAGS, QUAD_ONES, SYMBOL, TOKEN_NBITS, TOKENS, VALUE
from .tables import CODE_BITS, table_model, token_models

LOOKUP_SLICE = 1 << 16  # elements per slice of the decoder's table lookups


def decode(data: bytes) -> np.ndarray:
    """The int8 array that `encode` coded into `data`; InputError if `data` is not such a stream."""
    data = bytes(data)
    if len(data) < HEADER.size + CRC.size or data[:4] != MAGIC:
        raise InputError("not an fmcompress codec stream (bad magic or too short)")
    if data[4] != VERSION:
        raise InputError(f"codec stream version {data[4]} is not supported "
                         f"(this build reads {VERSION})")
    (crc,) = CRC.unpack(data[-CRC.size:])
    if zlib.crc32(data[:-CRC.size]) != crc:
        raise InputError("codec stream damaged or truncated: checksum mismatch")
    try:
        return _decode_checked(data)
    except InputError:
        raise
    except (ValueError, IndexError, OverflowError, RuntimeError, struct.error) as exc:
        raise InputError(f"codec stream damaged: {type(exc).__name__}") from exc


def _decode_checked(data: bytes) -> np.ndarray:
    reader = Reader(data, len(data) - CRC.size)
    _, _, method, window, dtype, ndim = reader.unpack(HEADER, "the header")
    if method >= len(METHODS) or dtype not in DTYPE_CODES or ndim > MAX_DIMS:
        raise InputError("codec stream damaged: unknown method, dtype or rank in the header")
    if (METHODS[method] == "dcac") != (window > 0):
        raise InputError("codec stream damaged: the window does not match the method")
    shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim, "the shape"))
    if int(np.prod(shape, dtype=np.float64)) > MAX_ELEMENTS:
        raise InputError(f"codec stream claims {shape}: too many elements")
    groups, channels, width = plane_layout(shape)
    flags, extras_size, word_count = reader.unpack(SECTIONS, "the section sizes")
    k, coded_refs = flags & ~REFS_FLAG, bool(flags & REFS_FLAG)
    if coded_refs and not window:
        raise InputError("codec stream damaged: references in a baseline stream")
    window = window if coded_refs else 0
    if k > MAX_MODELS:
        raise InputError(f"codec stream damaged: {k} models (at most {MAX_MODELS})")
    code_count = (k + BARE) + (window + 1 if window else 0) + k * TOKENS
    side = reader.take(-(-code_count * CODE_BITS // 8), "the model tables")
    codes = unpack_fixed(np.unpackbits(np.frombuffer(side, np.uint8))[:code_count * CODE_BITS],
                          CODE_BITS).astype(np.uint8)
    extras = reader.take(extras_size, "the extra bits")
    words = np.frombuffer(reader.take(4 * word_count, "the coded symbols"), "<u4").astype(np.uint32)
    if reader.pos != reader.end:
        raise InputError("codec stream damaged: bytes left over after the coded symbols")
    planes = _decode_planes(codes, k, window, groups, channels, width, words, extras)
    return planes.reshape(-1).view(np.int8).reshape(shape)


def _decode_planes(codes: np.ndarray, k: int, window: int, groups: int, channels: int,
                   width: int, words: np.ndarray, extras: bytes) -> np.ndarray:
    count = groups * channels
    index_codes, rest = codes[:k + BARE], codes[k + BARE:]
    ref_codes, model_codes = (rest[:window + 1], rest[window + 1:]) if window else (None, rest)
    model_codes = model_codes.reshape(k, TOKENS)
    coder = constriction.stream.stack.AnsCoder(words)
    index = _decode_symbols(coder, index_codes, count) if count else np.zeros(0, np.int64)
    refs = np.zeros(count, np.int64)
    if window and count:
        refs = _decode_symbols(coder, ref_codes, count)
        if np.any(refs > np.tile(np.arange(channels), groups)):
            raise InputError("codec stream damaged: a plane refers to one before its run")
    sizes = np.bincount(index, minlength=k + BARE)[:k] * width
    if not model_codes.any(axis=1).all():
        raise InputError("codec stream damaged: an empty model table")
    models = token_models(model_codes)
    parts = [_decode_tokens(coder, models[model], model_codes[model], int(sizes[model]))
             for model in range(k)]
    if not coder.is_empty():
        raise InputError("codec stream damaged: coded symbols left over")
    planes = np.empty((count, width), np.uint8)
    constant = np.flatnonzero(index >= k)
    planes[constant] = np.take(VALUE, index[constant] - k)[:, None]
    order = np.argsort(index, kind="stable")[:count - constant.size]  # the coding order
    planes[order] = _values(parts, extras, int(sizes.sum())).reshape(order.size, width)
    return reconstruct(planes, refs.reshape(groups, channels)) if window else planes


def _decode_symbols(coder: Any, codes: np.ndarray, count: int) -> np.ndarray:
    if not codes.any():
        raise InputError("codec stream damaged: an empty model table")
    symbols = coder.decode(table_model(codes), count)
    if symbols.size and symbols.max() >= np.flatnonzero(codes).max() + 1:
        raise InputError("codec stream damaged: a symbol outside its model")
    return symbols


@dataclass
class _Part:
    """One model's decoded tokens (rule f): `count` elements; `quads` the zero flags four to
    a symbol (first flag in bit 3), or None where the model codes every token; `tokens`
    the tokens the flags leave (all `count` without flags), 0..31."""

    count: int
    quads: np.ndarray | None
    tokens: np.ndarray


def _decode_tokens(coder: Any, models: tuple[Any, Any], codes: np.ndarray, count: int) -> _Part:
    flag_model, token_model = models
    quads = None
    if flag_model is not None:
        quads = coder.decode(flag_model, -(-count // 4))
        padding = (1 << (-count % 4)) - 1  # the flags past `count` in the last quad are clear
        if quads.size and quads[-1] & padding:
            raise InputError("codec stream damaged: zero flags past the end of a model")
        tokens = coder.decode(token_model, int(np.take(QUAD_ONES, quads).sum()))
        tokens += 1
    else:
        tokens = coder.decode(token_model, count)
    if tokens.size and tokens.max() > np.flatnonzero(codes).max():
        raise InputError("codec stream damaged: a symbol outside its model")
    return _Part(count, quads, tokens)


def _values(parts: list[_Part], extras: bytes, size: int) -> np.ndarray:
    """The uint8 symbols (int8 bit patterns) of the decoded tokens, in coding order: in one
    compiled pass where numba is installed (fmcompress.codec.jit), else with numpy."""
    jit = compiled_kernels()
    if jit is None:
        return _values_numpy(parts, extras, size)
    counts = np.zeros(EXTRA_SHIFT + 1, np.int64)
    for part in parts:
        jit.width_counts(part.tokens, TOKEN_NBITS, counts)
    check_extras(extras, counts)
    widths = np.arange(counts.size)
    cursors = np.concatenate([[0], np.cumsum(widths * counts)[:-1]])  # each width group's start
    data = np.frombuffer(extras + bytes(2), np.uint8)  # the kernels read two bytes at a time
    out = np.empty(size, np.uint8)
    start = 0
    for part in parts:
        target = out[start:start + part.count]
        if part.quads is None:
            jit.fill_dense(part.tokens, data, cursors, TOKEN_NBITS, SYMBOL, EXTRA_SHIFT, target)
        else:
            jit.fill_flagged(part.quads, part.tokens, data, cursors, TOKEN_NBITS, SYMBOL,
                             EXTRA_SHIFT, target)
        start += part.count
    return out


_JIT_KERNELS: list[Any] = []  # [module or None] once tried


def compiled_kernels() -> Any:
    """fmcompress.codec.jit, or None where numba is not installed (then numpy decodes).

    The first call per process imports numba and compiles the kernels (or loads them from
    numba's cache) by decoding a small stream: `measure_model` and the benchmark call it
    before they time anything.
    """
    if not _JIT_KERNELS:
        try:
            from . import jit as kernels
        except ImportError:
            kernels = None
        _JIT_KERNELS.append(kernels)
        if kernels is not None:
            from .encoder import encode  # the encoder never needs the decoder: no cycle

            sample = np.arange(-64, 64, dtype=np.int8).reshape(1, 2, 8, 8)
            sample[:, 1] = 0
            sample[:, 1, 0, :3] = 1  # a mostly-zero plane: the zero-flag kernel too
            decode(encode(sample, method="baseline"))
    return _JIT_KERNELS[0]


def _values_numpy(parts: list[_Part], extras: bytes, size: int) -> np.ndarray:
    """`_values` with numpy only.

    Per explicit token its extra bits' width (one lookup), the extra bits scattered into
    a zeroed array, then one lookup SYMBOL[token << EXTRA_SHIFT | extra bits]; the zeros
    that flags stand for are filled in by one scatter of the explicit values over all
    models (none without flags: dense maps). The lookups run in slices, so that the intp
    indices numpy's lookups need stay in the cache; the tokens are checked to lie in
    their model (below TOKENS), so the lookups skip bounds checks.
    """
    tokens = parts[0].tokens if len(parts) == 1 else np.concatenate([np.zeros(0, np.int32)]
                                                                    + [p.tokens for p in parts])
    widths = np.empty(tokens.size, np.uint8)
    for start in range(0, tokens.size, LOOKUP_SLICE):
        stop = start + LOOKUP_SLICE
        np.take(TOKEN_NBITS, tokens[start:stop].astype(np.intp), out=widths[start:stop],
                mode="clip")
    extra = np.zeros(tokens.size, np.uint8)
    scatter_extras(extras, widths, extra)
    values = widths  # the widths are done with: their buffer takes the values
    for start in range(0, tokens.size, LOOKUP_SLICE):
        stop = start + LOOKUP_SLICE
        index = tokens[start:stop].astype(np.intp)
        index <<= EXTRA_SHIFT
        index |= extra[start:stop]
        np.take(SYMBOL, index, out=values[start:stop], mode="clip")
    if all(part.quads is None for part in parts):
        return values
    nonzero = np.concatenate([np.ones(part.count, np.uint8) if part.quads is None
                              else np.take(QUAD_FLAGS, part.quads, axis=0).ravel()[:part.count]
                              for part in parts])
    out = np.zeros(size, np.uint8)
    out[np.flatnonzero(nonzero.view(bool))] = values
    return out
