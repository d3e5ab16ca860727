"""Token models: their five-bit table codes (rule d), costs, and the entropy coder's models.

A table is 32 five-bit codes on a half-bit log scale relative to its most frequent token;
encoder and decoder both build constriction's categorical models from the codes alone,
so that both sides see exactly the same probabilities (rule f).
"""

from __future__ import annotations

from typing import Any

import constriction
import numpy as np

from ..errors import InputError
from .symbols import QUAD_ONES

CODE_BITS = 5
MAX_CODE = (1 << CODE_BITS) - 1

SPLIT_ZERO = 0.5  # a model with P(token 0) at least this codes zero flags (rule f)

MILLER_MADOW = 1 / (2 * np.log(2))  # bits per used letter beyond the first


def table_codes(counts: np.ndarray) -> np.ndarray:
    """Rule d: the five-bit codes of a frequency table (..., n)."""
    counts = np.asarray(counts, np.float64)
    peak = np.maximum(counts.max(axis=-1, keepdims=True), 1)
    # counts are whole numbers: the floor of 0.5 only keeps log2 off zero (masked below)
    codes = np.rint(MAX_CODE + 2 * np.log2(np.maximum(counts, 0.5) / peak))
    return np.where(counts > 0, np.clip(codes, 1, MAX_CODE), 0).astype(np.uint8)

CODE_LOG = (np.arange(MAX_CODE + 1) - MAX_CODE) / 2  # log2 of a code's weight
CODE_WEIGHT = np.where(np.arange(MAX_CODE + 1) > 0, np.exp2(CODE_LOG), 0.0)
UNUSED_BITS = 24.0  # constriction gives unused tokens about 2^-24


def table_probabilities(codes: np.ndarray) -> np.ndarray:
    """The probabilities a table's codes stand for (rows sum to 1; all-zero rows stay 0)."""
    weights = np.take(CODE_WEIGHT, codes)
    totals = weights.sum(axis=-1, keepdims=True)
    return weights / np.where(totals > 0, totals, 1)


def table_cost(codes: np.ndarray) -> np.ndarray:
    """Bits per token under each table (lookups: this runs in every Lloyd step)."""
    totals = np.take(CODE_WEIGHT, codes).sum(axis=-1, keepdims=True)
    used = np.log2(np.maximum(totals, 1e-300)) - np.take(CODE_LOG, codes)
    return np.where(codes > 0, used, UNUSED_BITS)


def coded_bits(counts: np.ndarray) -> float:
    """Bits of symbols with these counts under the table made from them, table included."""
    return float(counts @ table_cost(table_codes(counts))) + counts.size * CODE_BITS


def _categorical(probabilities: np.ndarray) -> Any:
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def table_model(codes: np.ndarray) -> Any:
    """The model of a table as it is, for model indices and reference distances."""
    return _categorical(table_probabilities(codes))


def token_models(codes: np.ndarray) -> list[tuple[Any, Any]]:
    """Rule f: per table of `codes` (K, TOKENS), (zero-flag model or None, token model).

    A table with P(token 0) >= SPLIT_ZERO codes zero flags, four to a symbol of a 16-letter
    model (the product of the four flags' probabilities: the same bits as one flag at a
    time), then only the nonzero tokens (minus 1): the same information, but
    constriction's decoder searches a 16-letter table per four elements and the 31-letter
    one only for the nonzero ones. Encoder and decoder both build all K at once.
    """
    probabilities = table_probabilities(codes)
    zero = probabilities[:, :1]
    rest = probabilities[:, 1:].sum(axis=1, keepdims=True)
    quads = np.power(rest, QUAD_ONES) * np.power(zero, 4 - QUAD_ONES)
    tokens = probabilities[:, 1:] / np.where(rest > 0, rest, 1)
    models = []
    for row, split in enumerate(zero[:, 0] >= SPLIT_ZERO):
        if not split:
            models.append((None, _categorical(probabilities[row])))
        elif rest[row, 0] <= 0:
            raise InputError("codec stream damaged: an empty model table")
        else:
            models.append((_categorical(quads[row]), _categorical(tokens[row])))
    return models
