"""The codec's alphabet (rule c): int8 bit patterns to 32 tokens plus raw extra bits, and back.

A value v (int8, or a residual read as int8) keeps its sign in the token and its
magnitude split between the token and up to five raw extra bits. Encoder, decoder and
the compiled kernels (fmcompress.codec.jit) all read the tables defined here, so the
symbol layout has one definition.
"""

from __future__ import annotations

import numpy as np

TOKENS = 32
DIRECT = 8  # magnitudes below this are their own token (with the sign)
BARE = 2 * DIRECT - 1  # tokens below this carry no extra bits; constant planes use them


def _symbol_tables() -> tuple[np.ndarray, ...]:
    """Lookup tables from an int8 bit pattern (as uint8) to token and extra bits, and back.

    Decoding goes through a code: the patterns ordered by (token, extra), so that a
    token's patterns are TOKEN_BASE[token] + extra and UNCODE maps a code to its pattern.
    """
    values = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.int64)
    magnitude, negative = np.abs(values), (values < 0).astype(np.int64)
    exponent = np.floor(np.log2(np.maximum(magnitude, 1))).astype(np.int64)
    token = np.zeros(256, np.int64)
    nbits = np.zeros(256, np.int64)
    direct = (magnitude > 0) & (magnitude < DIRECT)
    token[direct] = 2 * magnitude[direct] - 1 + negative[direct]
    escaped = (magnitude >= DIRECT) & (magnitude < 128)
    half = (magnitude >> np.maximum(exponent - 1, 0)) & 1  # the bit after the leading one
    bucket = 2 * (exponent - DIRECT.bit_length() + 1) + half
    token[escaped] = 2 * DIRECT - 1 + 2 * bucket[escaped] + negative[escaped]
    nbits[escaped] = exponent[escaped] - 1
    token[magnitude == 128] = TOKENS - 1
    extra = magnitude & ((1 << nbits) - 1)
    token_bits = np.zeros(TOKENS, np.int64)
    token_bits[token] = nbits
    token_base = np.concatenate([[0], np.cumsum(1 << token_bits)[:-1]])
    uncode = np.empty(256, np.uint8)
    uncode[token_base[token] + extra] = np.arange(256, dtype=np.uint8)
    return (token.astype(np.uint8), nbits.astype(np.uint8), extra.astype(np.uint8),
            token_base.astype(np.uint8), token_bits.astype(np.uint8), uncode)

TOKEN, NBITS, EXTRA, TOKEN_BASE, TOKEN_NBITS, UNCODE = _symbol_tables()
EXTRA_WIDTHS = tuple(int(w) for w in np.unique(TOKEN_NBITS) if w)
VALUE = UNCODE[TOKEN_BASE]  # per token, its symbol with extra bits 0 (a bare token's symbol)

EXTRA_SHIFT = int(TOKEN_NBITS.max())  # SYMBOL's index: token << EXTRA_SHIFT | extra bits
SYMBOL = np.zeros(TOKENS << EXTRA_SHIFT, np.uint8)  # the decoder's one lookup (unused: 0)
SYMBOL[(TOKEN.astype(np.intp) << EXTRA_SHIFT) | EXTRA] = np.arange(256, dtype=np.uint8)
EXTRA_BITS = {width: ((EXTRA[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8)
              for width in EXTRA_WIDTHS}  # per width, per symbol: its low extra bits, MSB first
NIBBLES = np.stack([np.arange(256) >> 4, np.arange(256) & 15], axis=1).astype(np.int32)
QUAD_ONES = np.array([bin(q).count("1") for q in range(16)])  # nonzero flags in a quad symbol
QUAD_FLAGS = ((np.arange(16)[:, None] >> np.arange(3, -1, -1)) & 1).astype(np.uint8)
