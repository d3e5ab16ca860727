"""Rule d: the shared token models of a stream's non-constant planes.

The planes are clustered into K models (K in 1, 2, 4, ... 32) by a few Lloyd steps on
their token histograms; K is the one with the fewest estimated bits, tables and model
indices included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stream import MAX_MODELS
from .symbols import TOKENS
from .tables import CODE_BITS, MILLER_MADOW, UNUSED_BITS, table_codes, table_cost

LLOYD_ROUNDS = 1

TOKEN_INDEX = np.arange(TOKENS, dtype=np.float64)
EMPTY_BITS = 1e9  # per token, under a model without planes: it never wins one


def entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Empirical code length (bits) of each row of whole-number counts, Miller-Madow
    corrected: n log2 n - sum c log2 c, the c log2 c from a table (no log per count)."""
    counts = np.asarray(counts, np.int64)
    totals = counts.sum(axis=-1)
    top = int(totals.max()) if totals.size else 0
    levels = np.arange(top + 1, dtype=np.float64)
    xlogx = levels * np.log2(np.maximum(levels, 1))
    used = np.count_nonzero(counts, axis=-1)
    bits = np.take(xlogx, totals) - np.take(xlogx, counts).sum(axis=-1)
    return bits + np.maximum(used - 1, 0) / (2 * np.log(2))


@dataclass
class Clustering:
    assign: np.ndarray  # per non-constant plane, its model
    codes: np.ndarray  # (K, TOKENS) table codes
    plane_bits: np.ndarray  # per non-constant plane, its tokens' estimated bits under its model
    bits: float  # estimated total: tokens, tables, indices

    @property
    def token_bits(self) -> float:
        """Estimated bits of all the tokens under the tables."""
        return float(self.plane_bits.sum())


def _model_costs(counts: np.ndarray) -> np.ndarray:
    """Bits per token of the unquantised models of `counts` (K, TOKENS), unused tokens at
    UNUSED_BITS; an empty model costs far more than any real one (it never wins a plane)."""
    totals = counts.sum(axis=1, keepdims=True)
    floor = totals * 2.0 ** -UNUSED_BITS + 1e-300
    costs = np.log2(np.maximum(totals, 1)) - np.log2(np.maximum(counts, floor))
    costs[totals[:, 0] == 0] = EMPTY_BITS
    return costs


def cluster(histograms: np.ndarray) -> Clustering:
    """Rule d: the K shared models (K = 1, 2, 4, ... 32) with the fewest estimated bits.

    All candidate K run at once: one (sum of K) x planes cost matrix per Lloyd step, so the
    number of numpy calls does not grow with the number of K tried. Each K starts from a
    split of the planes sorted by mean token into K runs of equal size, takes LLOYD_ROUNDS
    assignment steps under the unquantised models, then its written tables are built from
    the final assignment and every K is scored with them (tokens, tables, indices).
    """
    count = len(histograms)
    ks = 1 << np.arange(min(MAX_MODELS, count).bit_length())  # 1, 2, 4, ... <= planes
    starts = ks - 1  # the first slot of each K: slots 0 | 1 2 | 3 4 5 6 | ...
    slots = int(2 * ks[-1] - 1)
    sizes = histograms.sum(axis=1)
    means = histograms @ TOKEN_INDEX / np.maximum(sizes, 1)
    order = np.argsort(means, kind="stable")
    cumulative = np.cumsum(sizes[order]) / max(float(sizes.sum()), 1.0)
    slot = np.empty((len(ks), count), np.int64)
    slot[:, order] = np.minimum((cumulative * ks[:, None]).astype(np.int64), ks[:, None] - 1)
    slot += starts[:, None]
    columns = np.arange(count)
    transposed = histograms.T
    for _ in range(LLOYD_ROUNDS):
        models = _members(slot * count + columns, slots, count) @ histograms
        costs = _model_costs(models) @ transposed
        for level in range(1, len(ks)):  # K = 1 has nothing to choose
            first = int(starts[level])
            slot[level] = costs[first:first + int(ks[level])].argmin(axis=0) + first
    flat = slot * count + columns
    members = _members(flat, slots, count)
    codes = table_codes(members @ histograms)
    plane_bits = (table_cost(codes) @ transposed).take(flat)  # (levels, planes)
    sizes_by_level = np.zeros((len(ks), int(ks[-1])), np.int64)
    level_of_slot = np.repeat(np.arange(len(ks)), ks)
    sizes_by_level[level_of_slot, np.arange(slots) - starts[level_of_slot]] = members.sum(axis=1)
    used = np.count_nonzero(sizes_by_level, axis=1)
    total = plane_bits.sum(axis=1) + entropy_bits(sizes_by_level) + used * TOKENS * CODE_BITS
    best = int(total.argmin())
    first = int(starts[best])
    live = np.flatnonzero(sizes_by_level[best])
    renumber = np.zeros(int(ks[best]), np.int64)
    renumber[live] = np.arange(live.size)
    return Clustering(renumber[slot[best] - first], codes[first + live], plane_bits[best],
                       float(total[best]))


def _index_bits(sizes: np.ndarray) -> float:
    """`entropy_bits` of one row of positive counts (model sizes), without the tables."""
    total = float(sizes.sum())
    return float(total * np.log2(total) - sizes @ np.log2(sizes) + (sizes.size - 1) * MILLER_MADOW)


def _members(flat: np.ndarray, slots: int, count: int) -> np.ndarray:
    """(slots, planes) 0/1 membership from flat slot * planes + plane indices."""
    members = np.zeros(slots * count)
    members[flat] = 1.0
    return members.reshape(slots, count)


def refit(histograms: np.ndarray, codes: np.ndarray) -> Clustering:
    """One Lloyd step from given tables: each plane to its cheapest, then the models rebuilt.

    Where more than MAX_MODELS tables would be used, only the MAX_MODELS with the most
    planes are kept and the planes assigned again among them.
    """
    assign = (table_cost(codes) @ histograms.T).argmin(axis=0)
    sizes = np.bincount(assign, minlength=len(codes))
    if np.count_nonzero(sizes) > MAX_MODELS:
        codes = codes[np.sort(np.argsort(-sizes, kind="stable")[:MAX_MODELS])]
        assign = (table_cost(codes) @ histograms.T).argmin(axis=0)
    return finish(histograms, assign)


def finish(histograms: np.ndarray, assign: np.ndarray) -> Clustering:
    """The models of an assignment (unused ones dropped) and its estimated bits."""
    sizes = np.bincount(assign)
    live = np.flatnonzero(sizes)
    renumber = np.zeros(sizes.size, np.int64)
    renumber[live] = np.arange(live.size)
    assign = renumber[assign]
    count = len(assign)
    flat = assign * count + np.arange(count)
    codes = table_codes(_members(flat, live.size, count) @ histograms)
    plane_bits = (table_cost(codes) @ histograms.T).take(flat)
    index_bits = _index_bits(sizes[live])
    return Clustering(assign, codes, plane_bits,
                       float(plane_bits.sum()) + index_bits + codes.size * CODE_BITS)
