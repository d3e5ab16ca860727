"""Compiled kernels for the codec's decoder (numba, the optional `codec` extra).

The decoder's ANS step is constriction's; what follows it (extra bits read from their
width groups, token and extra bits turned into int8 patterns, zero flags expanded) takes
a handful of numpy passes over every element. These kernels do the same in one compiled
pass. fmcompress.codec.decoder uses them when numba imports and falls back to its numpy
path otherwise; both give the same array (tested).

The tables come from fmcompress.codec.symbols (passed in: one definition of the layout).
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = {"nogil": True, "cache": True, "boundscheck": False}


@numba.njit(**_JIT)
def width_counts(tokens: np.ndarray, token_nbits: np.ndarray, counts: np.ndarray) -> None:
    """Add, per extra-bit width, the number of `tokens` with that width to `counts`.

    Four interleaved tallies, summed at the end: consecutive tokens of one width would
    otherwise wait on each other's increment of the same counter.
    """
    tally = np.zeros((4, counts.size), np.int64)
    body = tokens.size - tokens.size % 4
    for i in range(0, body, 4):
        tally[0, token_nbits[tokens[i]]] += 1
        tally[1, token_nbits[tokens[i + 1]]] += 1
        tally[2, token_nbits[tokens[i + 2]]] += 1
        tally[3, token_nbits[tokens[i + 3]]] += 1
    for i in range(body, tokens.size):
        tally[0, token_nbits[tokens[i]]] += 1
    for width in range(counts.size):
        counts[width] += tally[0, width] + tally[1, width] + tally[2, width] + tally[3, width]


@numba.njit(**_JIT)
def _symbol(token: int, extras: np.ndarray, cursors: np.ndarray, token_nbits: np.ndarray,
            symbol: np.ndarray, shift: int) -> np.uint8:
    """The int8 pattern of `token` and its extra bits, read from the group of its width at
    cursors[width] (advanced by the width).

    Branch-free: which group a token reads is as good as random, so a branch on it would
    mispredict half the time; a token without extra bits reads 0 bits at cursors[0],
    which stays 0 (`extras` is padded with two zero bytes, so both bytes read exist).
    """
    width = np.uint32(token_nbits[token])
    cursor = cursors[width]
    cursors[width] = cursor + width
    byte = cursor >> 3
    window = (np.uint32(extras[byte]) << 8) | np.uint32(extras[byte + 1])
    extra = (window >> np.uint32(16 - (cursor & 7) - width)) & np.uint32((1 << width) - 1)
    return symbol[(np.uint32(token) << np.uint32(shift)) | extra]


@numba.njit(**_JIT)
def fill_dense(tokens: np.ndarray, extras: np.ndarray, cursors: np.ndarray,
               token_nbits: np.ndarray, symbol: np.ndarray, shift: int, out: np.ndarray) -> None:
    """out[i] = the int8 pattern of tokens[i] and its extra bits (`_symbol`)."""
    for i in range(tokens.size):
        out[i] = _symbol(tokens[i], extras, cursors, token_nbits, symbol, shift)


@numba.njit(**_JIT)
def fill_flagged(quads: np.ndarray, tokens: np.ndarray, extras: np.ndarray, cursors: np.ndarray,
                 token_nbits: np.ndarray, symbol: np.ndarray, shift: int, out: np.ndarray) -> None:
    """As fill_dense, for a model that codes zero flags four to a quad symbol (first flag
    in bit 3): a clear flag is a zero, a set one takes the next of `tokens`. (Such models
    are mostly zeros, so the branch on the flag predicts well.)"""
    next_token = 0
    for i in range(out.size):
        if (quads[i >> 2] >> (3 - (i & 3))) & 1:
            out[i] = _symbol(tokens[next_token], extras, cursors, token_nbits, symbol, shift)
            next_token += 1
        else:
            out[i] = 0
