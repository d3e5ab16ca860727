"""Lossless coding of int8 feature-map planes: a per-plane baseline and DC-AC.

DC-AC (ISCAS 2021, "Deep correlation-based adaptive compression of feature map
planes") codes each plane (one channel's H x W) as the residual from the most similar
of the previous W planes of the same map, or on its own. `encode`/`decode` implement it
and a baseline that differs only in that step; `measure_model` runs a model in
onnxruntime and reports the bits per element of its stored maps. docs/codec.md has the
stream format and how to read the figures.

Rules:

a. Planes. An int8 array of shape [..., C, H, W] holds G x C planes of H x W, G the
   product of the leading dims; references stay inside one run of C planes (one
   sample). A 2-D array [H, W] is one plane; a 1-D array [L] is one plane of one row;
   a 0-D array is one 1x1 plane. Any size is allowed, empty ones included.
b. Residuals wrap around: r = (x - x_ref) mod 256 on the int8 bit patterns, so the
   alphabet stays at 256 symbols and x = (r + x_ref) mod 256 is exact.
c. Symbols. A value v (int8, or a residual read as int8) becomes a token of a 32-letter
   alphabet plus raw extra bits, sign and magnitude m = |v| apart: v = 0 is token 0;
   0 < m < 8 is its own token (2m - 1, or 2m when negative); 8 <= m < 128 falls in one
   of 8 buckets (the exponent of m and the bit after its leading one) with the sign,
   tokens 15..30, and m's low e - 1 bits (2..5, e = floor(log2 m)) are stored verbatim;
   v = -128 is token 31. The small alphabet keeps a model at 32 entries and the range
   search of constriction's decoder short (256-letter tables decode under 50 MB/s); the
   sign sits in the token, so nonnegative (ReLU) maps waste no bit on it.
d. Models. Planes whose tokens are all one token without extra bits (all-zero planes) are
   "constant" and cost only their model index. The others are clustered into K shared
   token models (K in 1, 2, 4, ... 32, the one with the fewest total bits counting the
   tables and the indices). All K run at once: each starts from a split of the planes
   sorted by mean token, takes LLOYD_ROUNDS assignment steps (each plane to the model
   with the smallest cross-entropy, the models from their planes' histograms), and is
   scored with the tables built from its final assignment. A model is written as 32
   five-bit codes: 0 for an unused token, else 1..31 for a frequency of
   2^((code - 31) / 2) relative to the most frequent token.
e. Reference choice (dcac), three steps. (1) For each non-constant plane, among "none" and
   the non-constant planes of the previous W, the option with the smallest estimated code
   length: the empirical entropy of its tokens (Miller-Madow corrected) plus its extra
   bits, on evenly spaced sample positions (the same in every plane), all candidates in
   one bincount; a residual must beat "none" by REF_MARGIN. Where the candidates would
   hold more sampled tokens than REF_BUDGET of the map's elements (many small planes), an
   evenly spread subset within that budget is estimated first, and the map gets no
   reference unless those save REF_SCREEN of the subset's estimated bits. The L1 norm of
   the residual (or any per-symbol magnitude proxy) picks worse references: a sparse
   plane minus another sparse plane is less sparse, and a shifted residual costs no more
   than an unshifted one. (2) A reference is kept only where the residual (tokens and
   extra bits) costs less than the plane under the cheapest of: the plain planes' shared
   models, one model of all the chosen residuals, and those refitted (one Lloyd step) to
   the chosen symbols; the stream's models are refitted (one Lloyd step) from all of them
   to the kept symbols. (3) The stream with references is written only if its estimated
   size (token cross-entropy under the tables, tables, indices, extra bits: within a few
   bytes of the real one) is smaller than that of the stream without; only one stream is
   ever encoded. A stream that uses no reference carries neither the reference table nor
   the indices (REFS_FLAG), so dcac then costs exactly what the baseline costs.
f. Entropy coder: constriction's ANS coder with categorical models built from the
   written tables (perfect=False), one call per model over all its planes (coding order:
   by model, plane order within). A model whose table gives token 0 a probability p of at
   least SPLIT_ZERO codes zero flags, four to a symbol of a 16-letter model (the product
   p^zeros (1 - p)^ones: the bits of four single flags), then only the nonzero tokens
   under the table without token 0: the same information, but the decoder searches a
   16-letter table per four elements and the 32-letter one only for the nonzero ones.
   Extra bits are bit-packed grouped by width (2, 3, 4, 5), each group in coding order,
   so that each group is packed and read at a fixed width.
g. Decoding checks the magic, version and a CRC-32 of the whole stream first, then
   every count it reads, and raises InputError for anything wrong: a damaged stream is
   never decoded into a wrong array.
"""

from __future__ import annotations

import math
import os
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import constriction
import numpy as np
import onnx
import zstandard

from .errors import InputError, VerificationError

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

TOKENS = 32
DIRECT = 8  # magnitudes below this are their own token (with the sign)
BARE = 2 * DIRECT - 1  # tokens below this carry no extra bits; constant planes use them
CODE_BITS = 5
MAX_CODE = (1 << CODE_BITS) - 1
MAX_MODELS = 32
REFS_FLAG = 0x80  # in the models byte: the stream codes reference indices
LLOYD_ROUNDS = 1
REF_MARGIN = 0.01  # relative: a residual must be estimated 1% cheaper than the plane itself
REF_SAMPLE_SHARE = 1 / 8  # sampled positions per candidate, as a share of the elements
REF_MIN_SAMPLES = 64  # per plane (fewer saturate the entropy estimate)
REF_BUDGET = 0.25  # sampled candidate tokens, as a share of the elements, before screening
REF_SCREEN = 0.005  # the screened planes' references must save this share of their bits
LOOKUP_SLICE = 1 << 16  # elements per slice of the decoder's table lookups
SPLIT_ZERO = 0.5  # a model with P(token 0) at least this codes zero flags (rule f)
ZSTD_LEVEL = 3
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- symbols


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
TOKEN_INT32 = TOKEN.astype(np.int32)
TOKEN_NBITS_FLOAT = TOKEN_NBITS.astype(np.float64)
ONES_TOKENS = np.ones(TOKENS)
MILLER_MADOW = 1 / (2 * np.log(2))  # bits per used letter beyond the first
PLANE_OFFSETS = np.arange(0, 1 << 16, TOKENS, dtype=np.uint16)  # plane * TOKENS, for bincounts
SPARSE = 0.4  # below this share of nonzero tokens, histograms count only the nonzero ones
EXTRA_SHIFT = int(TOKEN_NBITS.max())  # SYMBOL's index: token << EXTRA_SHIFT | extra bits
SYMBOL = np.zeros(TOKENS << EXTRA_SHIFT, np.uint8)  # the decoder's one lookup (unused: 0)
SYMBOL[(TOKEN.astype(np.intp) << EXTRA_SHIFT) | EXTRA] = np.arange(256, dtype=np.uint8)
EXTRA_BITS = {width: ((EXTRA[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8)
              for width in EXTRA_WIDTHS}  # per width, per symbol: its low extra bits, MSB first
NIBBLES = np.stack([np.arange(256) >> 4, np.arange(256) & 15], axis=1).astype(np.int32)
QUAD_ONES = np.array([bin(q).count("1") for q in range(16)])  # nonzero flags in a quad symbol
QUAD_FLAGS = ((np.arange(16)[:, None] >> np.arange(3, -1, -1)) & 1).astype(np.uint8)


# ----------------------------------------------------------------------- quantisation


def calibrate_scale(arrays: Iterable[np.ndarray]) -> float:
    """The symmetric int8 scale max|x| / 127 over all `arrays` (1.0 when they are all zero)."""
    peak = 0.0
    seen = False
    for array in arrays:
        values = np.asarray(array)
        if values.size == 0:
            continue
        seen = True
        if not np.isfinite(values).all():
            raise InputError("cannot calibrate an int8 scale: the data holds NaN or infinite values")
        peak = max(peak, float(np.max(np.abs(values))))
    if not seen:
        raise InputError("cannot calibrate an int8 scale: no data")
    return peak / 127.0 if peak > 0 else 1.0


def quantize(array: np.ndarray, scale: float) -> np.ndarray:
    """int8 q = clip(rint(x / scale), -127, 127): symmetric, so -128 never occurs.

    np.rint rounds halves to even, as deployment runtimes do.
    """
    if not (np.isfinite(scale) and scale > 0):
        raise InputError(f"the quantisation scale must be positive and finite, got {scale}")
    values = np.asarray(array, dtype=np.float64)
    if not np.isfinite(values).all():
        raise InputError("cannot quantise NaN or infinite values")
    return np.clip(np.rint(values / scale), -127, 127).astype(np.int8)


# ----------------------------------------------------------------------------- planes


def _plane_layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(G, C, HW): G runs of C planes of HW elements (rule a)."""
    if len(shape) <= 2:
        return 1, 1, math.prod(shape)
    return math.prod(shape[:-3]), shape[-3], shape[-2] * shape[-1]


def _parents(refs: np.ndarray) -> np.ndarray:
    """Flat index of each plane's reference plane, or -1; refs is (G, C)."""
    groups, channels = refs.shape
    index = np.arange(groups * channels).reshape(groups, channels)
    return np.where(refs > 0, index - refs, -1).ravel()


def _residuals(planes: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Rule b: planes (P, HW) uint8 -> the coded symbols (residual where a plane has a ref)."""
    parents = _parents(refs)
    coded = planes.copy()
    rows = np.flatnonzero(parents >= 0)
    coded[rows] -= planes[parents[rows]]  # uint8 arithmetic wraps mod 256
    return coded


def _reconstruct(coded: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Undo `_residuals` by pointer jumping: log2(longest chain) vectorised rounds.

    Invariant: value[p] = sum of the coded planes from p down to (excluding) parent[p];
    each round adds the parent's partial sum and jumps the parent to its parent.
    """
    parents = _parents(refs)
    values = coded.copy()
    active = np.flatnonzero(parents >= 0)
    while active.size:
        above = parents[active]
        values[active] += values[above]  # the right side is gathered before any write
        parents[active] = parents[above]
        active = active[parents[active] >= 0]
    return values


def _token_histograms(tokens: np.ndarray) -> np.ndarray:
    """(P, TOKENS) counts of a (P, n) token array: one bincount over plane * TOKENS + token,
    as uint16 while that fits; over the nonzero tokens only where they are few (ReLU maps),
    the zeros then counted by difference."""
    planes, width = tokens.shape
    if tokens.size == 0:
        return np.zeros((planes, TOKENS), np.int64)
    if width >= 256 and np.count_nonzero(tokens) < SPARSE * tokens.size:
        positions = np.flatnonzero(tokens.ravel() != 0)
        index = positions // width * TOKENS + tokens.ravel().take(positions)
        counts = np.bincount(index, minlength=planes * TOKENS).reshape(planes, TOKENS)
        counts[:, 0] = width - counts.sum(axis=1)
        return counts
    if planes * TOKENS <= 1 << 16:
        index = np.add(tokens, PLANE_OFFSETS[:planes, None], dtype=np.uint16)
    else:
        index = tokens.astype(np.intp)
        index += (np.arange(planes, dtype=np.intp) * TOKENS)[:, None]
    return np.bincount(index.ravel(), minlength=planes * TOKENS).reshape(planes, TOKENS)


def _entropy_bits(counts: np.ndarray) -> np.ndarray:
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


def choose_references(planes: np.ndarray, groups: int, channels: int, window: int,
                      live: np.ndarray | None = None) -> np.ndarray:
    """Rule e (1): (G, C) reference distances, 0 for none, for planes (G*C, HW) uint8.

    Only `live` planes (default all; the encoder passes the non-constant ones) take or give
    a reference. All W + 1 candidates of the planes are estimated at once (one token
    lookup and one bincount). Where that would look at more sampled tokens than the map
    has elements (REF_BUDGET: many small planes), an evenly spread subset of the planes
    within that budget is estimated first, and the others only if the subset's references
    save at least REF_SCREEN of its estimated bits.
    """
    refs = np.zeros((groups, channels), np.int64)
    window = min(window, channels - 1)
    width = planes.shape[1]
    if window < 1 or width == 0:
        return refs
    count = groups * channels
    live = np.ones(count, bool) if live is None else live
    channel = np.tile(np.arange(channels), groups)
    distances = np.arange(1, window + 1)
    targets = np.flatnonzero(live & (channel > 0))
    sources = targets[:, None] - distances
    valid = (distances <= channel[targets, None]) & live[np.maximum(sources, 0)]
    usable = valid.any(axis=1)
    targets, sources, valid = targets[usable], np.maximum(sources[usable], 0), valid[usable]
    if not targets.size:
        return refs
    samples = min(width, max(REF_MIN_SAMPLES, int(width * REF_SAMPLE_SHARE / window)))
    sampled = planes  # evenly spaced positions, the same in every plane
    if samples < width:
        step = (width - 1) / (samples - 1)
        sampled = planes.take(np.rint(np.arange(samples) * step).astype(np.intp), axis=1)
    stride = -(-targets.size * (window + 1) * samples // max(int(REF_BUDGET * count * width), 1))
    parts = [np.arange(targets.size)]
    if stride > 1:  # screen every stride-th plane first
        screened = np.zeros(targets.size, bool)
        screened[::stride] = True
        parts = [np.flatnonzero(screened), np.flatnonzero(~screened)]
    for step, part in enumerate(parts):
        best, own, cost = _reference_costs(sampled, targets[part], sources[part], valid[part])
        chosen = cost < own * (1 - REF_MARGIN)
        refs.ravel()[targets[part[chosen]]] = best[chosen]
        if step == 0 and len(parts) > 1 and (own - cost)[chosen].sum() < REF_SCREEN * own.sum():
            return np.zeros_like(refs)  # the map is not worth the search
    return refs


def _reference_costs(sampled: np.ndarray, targets: np.ndarray, sources: np.ndarray,
                     valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per target: (best distance, estimated bits of the plane, of its best residual) on
    the sampled positions (rule e (1)); `sources` (T, W) the candidate planes."""
    own = sampled.take(targets, axis=0)
    residuals = own[:, None, :] - sampled.take(sources, axis=0)  # uint8 wraps (rule b)
    candidates = np.concatenate([own[:, None, :], residuals], axis=1)
    cost = _sample_bits(candidates.reshape(-1, sampled.shape[1])).reshape(candidates.shape[:2])
    cost[:, 1:][~valid] = np.inf
    best = cost[:, 1:].argmin(axis=1)  # ties go to the nearest plane
    return best + 1, cost[:, 0], cost[np.arange(len(best)), best + 1]


def _sample_bits(symbols: np.ndarray) -> np.ndarray:
    """Estimated code length of each row of symbols (R, S) uint8: the Miller-Madow
    corrected empirical entropy of its tokens, plus their extra bits."""
    rows, size = symbols.shape
    index = np.take(TOKEN_INT32, symbols)
    index += (np.arange(rows, dtype=np.int32) * TOKENS)[:, None]
    counts = np.bincount(index.ravel(), minlength=rows * TOKENS).reshape(rows, TOKENS)
    levels = np.arange(size + 1, dtype=np.float64)
    # -sum c log2 c, and (used bins - 1) / (2 ln 2), as one lookup per bin
    table = (levels > 0) * MILLER_MADOW - levels * np.log2(np.maximum(levels, 1))
    fixed = size * np.log2(max(size, 1)) - MILLER_MADOW
    return fixed + np.take(table, counts) @ ONES_TOKENS + counts @ TOKEN_NBITS_FLOAT


# ----------------------------------------------------------------------------- models


def _table_codes(counts: np.ndarray) -> np.ndarray:
    """Rule d: the five-bit codes of a frequency table (..., n)."""
    counts = np.asarray(counts, np.float64)
    peak = np.maximum(counts.max(axis=-1, keepdims=True), 1)
    # counts are whole numbers: the floor of 0.5 only keeps log2 off zero (masked below)
    codes = np.rint(MAX_CODE + 2 * np.log2(np.maximum(counts, 0.5) / peak))
    return np.where(counts > 0, np.clip(codes, 1, MAX_CODE), 0).astype(np.uint8)


CODE_LOG = (np.arange(MAX_CODE + 1) - MAX_CODE) / 2  # log2 of a code's weight
CODE_WEIGHT = np.where(np.arange(MAX_CODE + 1) > 0, np.exp2(CODE_LOG), 0.0)
UNUSED_BITS = 24.0  # constriction gives unused tokens about 2^-24
TOKEN_INDEX = np.arange(TOKENS, dtype=np.float64)
EMPTY_BITS = 1e9  # per token, under a model without planes: it never wins one


def _table_probabilities(codes: np.ndarray) -> np.ndarray:
    """The probabilities a table's codes stand for (rows sum to 1; all-zero rows stay 0)."""
    weights = np.take(CODE_WEIGHT, codes)
    totals = weights.sum(axis=-1, keepdims=True)
    return weights / np.where(totals > 0, totals, 1)


def _table_cost(codes: np.ndarray) -> np.ndarray:
    """Bits per token under each table (lookups: this runs in every Lloyd step)."""
    totals = np.take(CODE_WEIGHT, codes).sum(axis=-1, keepdims=True)
    used = np.log2(np.maximum(totals, 1e-300)) - np.take(CODE_LOG, codes)
    return np.where(codes > 0, used, UNUSED_BITS)


@dataclass
class _Clustering:
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
    costs = np.log2(np.maximum(totals, 1)) - np.log2(np.maximum(counts, totals * 2.0 ** -UNUSED_BITS + 1e-300))
    costs[totals[:, 0] == 0] = EMPTY_BITS
    return costs


def _cluster(histograms: np.ndarray) -> _Clustering:
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
        costs = _model_costs(_members(slot * count + columns, slots, count) @ histograms) @ transposed
        for level in range(1, len(ks)):  # K = 1 has nothing to choose
            first = int(starts[level])
            slot[level] = costs[first:first + int(ks[level])].argmin(axis=0) + first
    flat = slot * count + columns
    members = _members(flat, slots, count)
    codes = _table_codes(members @ histograms)
    plane_bits = (_table_cost(codes) @ transposed).take(flat)  # (levels, planes)
    sizes_by_level = np.zeros((len(ks), int(ks[-1])), np.int64)
    level_of_slot = np.repeat(np.arange(len(ks)), ks)
    sizes_by_level[level_of_slot, np.arange(slots) - starts[level_of_slot]] = members.sum(axis=1)
    used = np.count_nonzero(sizes_by_level, axis=1)
    total = plane_bits.sum(axis=1) + _entropy_bits(sizes_by_level) + used * TOKENS * CODE_BITS
    best = int(total.argmin())
    first = int(starts[best])
    live = np.flatnonzero(sizes_by_level[best])
    renumber = np.zeros(int(ks[best]), np.int64)
    renumber[live] = np.arange(live.size)
    return _Clustering(renumber[slot[best] - first], codes[first + live], plane_bits[best],
                       float(total[best]))


def _index_bits(sizes: np.ndarray) -> float:
    """`_entropy_bits` of one row of positive counts (model sizes), without the tables."""
    total = float(sizes.sum())
    return float(total * np.log2(total) - sizes @ np.log2(sizes) + (sizes.size - 1) * MILLER_MADOW)


def _members(flat: np.ndarray, slots: int, count: int) -> np.ndarray:
    """(slots, planes) 0/1 membership from flat slot * planes + plane indices."""
    members = np.zeros(slots * count)
    members[flat] = 1.0
    return members.reshape(slots, count)


def _refit(histograms: np.ndarray, codes: np.ndarray) -> _Clustering:
    """One Lloyd step from given tables: each plane to its cheapest, then the models rebuilt.

    Where more than MAX_MODELS tables would be used, only the MAX_MODELS with the most
    planes are kept and the planes assigned again among them.
    """
    assign = (_table_cost(codes) @ histograms.T).argmin(axis=0)
    sizes = np.bincount(assign, minlength=len(codes))
    if np.count_nonzero(sizes) > MAX_MODELS:
        codes = codes[np.sort(np.argsort(-sizes, kind="stable")[:MAX_MODELS])]
        assign = (_table_cost(codes) @ histograms.T).argmin(axis=0)
    return _finish(histograms, assign)


def _finish(histograms: np.ndarray, assign: np.ndarray) -> _Clustering:
    """The models of an assignment (unused ones dropped) and its estimated bits."""
    sizes = np.bincount(assign)
    live = np.flatnonzero(sizes)
    renumber = np.zeros(sizes.size, np.int64)
    renumber[live] = np.arange(live.size)
    assign = renumber[assign]
    count = len(assign)
    flat = assign * count + np.arange(count)
    codes = _table_codes(_members(flat, live.size, count) @ histograms)
    plane_bits = (_table_cost(codes) @ histograms.T).take(flat)
    index_bits = _index_bits(sizes[live])
    return _Clustering(assign, codes, plane_bits,
                       float(plane_bits.sum()) + index_bits + codes.size * CODE_BITS)


# ------------------------------------------------------------------------ bit packing


def _pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Bits of `values` (each `width` bits, most significant first), unpacked as 0/1 uint8."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint8)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8).ravel()


def _unpack_fixed(bits: np.ndarray, width: int) -> np.ndarray:
    weights = (1 << np.arange(width - 1, -1, -1)).astype(np.int64)
    return bits.reshape(-1, width).astype(np.int64) @ weights


# ---------------------------------------------------------------------------- streams


@dataclass
class _Coding:
    """What one stream codes: every plane's symbols and how they are modelled (rule d)."""

    symbols: np.ndarray  # (P, HW) uint8: the planes, or residuals where a plane has a ref
    tokens: np.ndarray  # (P, HW) uint8 (rule c)
    histograms: np.ndarray  # (P, TOKENS) token counts
    varying: np.ndarray  # the indices of the non-constant planes
    first: np.ndarray  # per plane its most frequent token (a constant plane's only one)
    clustering: _Clustering | None  # the shared models of the varying planes

    @property
    def models(self) -> int:
        return 0 if self.clustering is None else len(self.clustering.codes)

    def index(self) -> np.ndarray:
        """Model index per plane: 0..K-1 a shared model, K + t a constant plane of token t."""
        index = (self.models + self.first).astype(np.int64)
        if self.clustering is not None:
            index[self.varying] = self.clustering.assign
        return index


def _coding(symbols: np.ndarray, tokens: np.ndarray, histograms: np.ndarray,
            models: np.ndarray | None = None) -> _Coding:
    """Constant planes, and shared models for the others: clustered afresh, or refitted
    from the table codes `models` by one assignment step."""
    first = histograms.argmax(axis=1)
    varying = np.flatnonzero((np.count_nonzero(histograms, axis=1) > 1) | (first >= BARE))
    clustering = None
    if varying.size:
        counts = histograms[varying].astype(np.float64)
        clustering = _cluster(counts) if models is None else _refit(counts, models)
    return _Coding(symbols, tokens, histograms, varying, first, clustering)


def _analyse(symbols: np.ndarray) -> _Coding:
    tokens = np.take(TOKEN, symbols)
    return _coding(symbols, tokens, _token_histograms(tokens))


def _stream_bits(coding: _Coding, refs: np.ndarray, window: int) -> float:
    """Rule e (3): the estimated size of a stream (tokens, tables, indices, extra bits),
    within a few bytes of the real one, so that dcac needs to write only one."""
    bits = _coded_bits(np.bincount(coding.index(), minlength=coding.models + BARE))
    if refs.any():
        bits += _coded_bits(np.bincount(refs.ravel(), minlength=window + 1))
    if coding.clustering is not None:
        bits += coding.clustering.token_bits + coding.clustering.codes.size * CODE_BITS
    return bits + float(coding.histograms.sum(axis=0) @ TOKEN_NBITS)


def _coded_bits(counts: np.ndarray) -> float:
    """Bits of symbols with these counts under the table made from them, table included."""
    return float(counts @ _table_cost(_table_codes(counts))) + counts.size * CODE_BITS


def _categorical(probabilities: np.ndarray) -> Any:
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def _table_model(codes: np.ndarray) -> Any:
    """The model of a table as it is, for model indices and reference distances."""
    return _categorical(_table_probabilities(codes))


def _token_models(codes: np.ndarray) -> list[tuple[Any, Any]]:
    """Rule f: per table of `codes` (K, TOKENS), (zero-flag model or None, token model).

    A table with P(token 0) >= SPLIT_ZERO codes zero flags, four to a symbol of a 16-letter
    model (the product of the four flags' probabilities: the same bits as one flag at a
    time), then only the nonzero tokens (minus 1): the same information, but
    constriction's decoder searches a 16-letter table per four elements and the 31-letter
    one only for the nonzero ones. Encoder and decoder both build all K at once.
    """
    probabilities = _table_probabilities(codes)
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


def _quads(nonzero: np.ndarray) -> np.ndarray:
    """Zero flags (bool, 1 = nonzero token), four to a symbol, the first flag in bit 3; the
    last symbol is padded with zero flags."""
    return NIBBLES.take(np.packbits(nonzero), axis=0).ravel()[:-(-nonzero.size // 4)]


def encode(array: np.ndarray, *, method: str = "dcac", window: int = 8) -> bytes:
    """Code an int8 array losslessly; `decode` returns it exactly (see the rules above)."""
    return encode_with_refs(array, method=method, window=window)[0]


def encode_with_refs(array: np.ndarray, *, method: str = "dcac",
                     window: int = 8) -> tuple[bytes, np.ndarray]:
    """`encode`, and the reference distance of each plane, shape (G, C) (0: coded on its own)."""
    array = np.asarray(array)
    if array.dtype != np.int8:
        raise InputError(f"the codec takes int8 arrays, got {array.dtype}")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "dcac" and not 1 <= window <= MAX_WINDOW:
        raise InputError(f"the dcac window must be 1..{MAX_WINDOW}, got {window}")
    if array.ndim > MAX_DIMS:
        raise InputError(f"the codec takes at most {MAX_DIMS} dims, got {array.ndim}")
    shape = tuple(int(d) for d in array.shape)
    if any(d >= 1 << 32 for d in shape):
        raise InputError("a dimension of 2^32 or more cannot be coded")
    groups, channels, width = _plane_layout(shape)
    planes = np.ascontiguousarray(array).view(np.uint8).reshape(groups * channels, width)
    stored_window = window if method == "dcac" else 0
    coding = _analyse(planes)
    refs = np.zeros((groups, channels), np.int64)
    if method == "dcac":
        live = np.zeros(groups * channels, bool)
        live[coding.varying] = True
        refs = choose_references(planes, groups, channels, window, live)
        if refs.any():
            coding, refs = _with_references(planes, refs, coding, window)
    header = HEADER.pack(MAGIC, VERSION, METHODS.index(method), stored_window, 1, len(shape))
    header += struct.pack(f"<{len(shape)}I", *shape)
    stream = header + _write(coding, refs, stored_window)
    return stream + CRC.pack(zlib.crc32(stream)), refs


def _with_references(planes: np.ndarray, refs: np.ndarray, plain: _Coding,
                     window: int) -> tuple[_Coding, np.ndarray]:
    """Rule e (2) and (3): the coding with the confirmed references, or `plain` (no refs).

    A reference is kept only where the residual (tokens and extra bits) is cheaper than
    the plane under the plain planes' shared models (each under its cheapest): the
    estimate of `choose_references` knows nothing of the models the planes will share.
    The models are then refitted (one Lloyd step) to the symbols with those residuals.
    """
    none = np.zeros_like(refs)
    if plain.clustering is None:  # every plane constant: a residual cannot be cheaper
        return plain, none
    rows = np.flatnonzero(refs.ravel())
    residual = planes.take(rows, axis=0) - planes.take(_parents(refs)[rows], axis=0)  # rule b
    res_tokens = np.take(TOKEN, residual)
    res_counts = _token_histograms(res_tokens)
    # the plain models and one fitted to all the residuals: a refit from them has both
    models = np.concatenate([plain.clustering.codes, _table_codes(res_counts.sum(axis=0))[None]])
    mixed = plain.histograms.copy()
    mixed[rows] = res_counts
    fitted = _coding(planes, plain.tokens, mixed, models).clustering
    models = np.concatenate([models, fitted.codes])
    costs = _table_cost(models).T + TOKEN_NBITS[:, None]  # tokens and extra bits
    keep = (res_counts @ costs).min(axis=1) < (plain.histograms[rows] @ costs).min(axis=1)
    if not keep.any():
        return plain, none
    rows = rows[keep]
    confirmed = np.zeros(refs.size, np.int64)
    confirmed[rows] = refs.ravel()[rows]
    confirmed = confirmed.reshape(refs.shape)
    symbols, tokens, counts = plain.symbols.copy(), plain.tokens.copy(), plain.histograms.copy()
    symbols[rows], tokens[rows], counts[rows] = residual[keep], res_tokens[keep], res_counts[keep]
    coding = _coding(symbols, tokens, counts, models)
    if _stream_bits(plain, none, window) <= _stream_bits(coding, confirmed, window):
        return plain, none
    return coding, confirmed


def _write(coding: _Coding, refs: np.ndarray, window: int) -> bytes:
    """Everything after the header but the CRC (docs/codec.md, stream format)."""
    k = coding.models
    index = coding.index()
    index_codes = _table_codes(np.bincount(index, minlength=k + BARE))
    code_parts = [index_codes]
    coded_refs = bool(window and refs.any())  # no references: neither table nor indices
    if coded_refs:
        ref_codes = _table_codes(np.bincount(refs.ravel(), minlength=window + 1))
        code_parts.append(ref_codes)
    coder = constriction.stream.stack.AnsCoder()
    extras = b""
    if coding.clustering is not None:
        code_parts.append(coding.clustering.codes.ravel())
        extras = _write_tokens(coder, coding)
    if coded_refs:
        coder.encode_reverse(refs.ravel().astype(np.int32), _table_model(ref_codes))
    if index.size:
        coder.encode_reverse(index.astype(np.int32), _table_model(index_codes))
    words = coder.get_compressed().astype("<u4").tobytes()
    side = np.packbits(_pack_fixed(np.concatenate(code_parts), CODE_BITS)).tobytes()
    sections = SECTIONS.pack(k | (REFS_FLAG if coded_refs else 0), len(extras), len(words) // 4)
    return sections + side + extras + words


def _write_tokens(coder: Any, coding: _Coding) -> bytes:
    """Push the tokens of the varying planes, by model (rule f); return their extra bits.

    One pass over all the tokens finds the nonzero ones, sliced per model after.
    """
    clustering = coding.clustering
    k = len(clustering.codes)
    width = coding.tokens.shape[1]
    # coding order: the varying planes by model, in plane order within a model
    order = coding.varying[np.argsort(clustering.assign, kind="stable")]
    tokens = np.take(coding.tokens, order, axis=0).ravel()
    nonzero = tokens != 0
    positions = np.flatnonzero(nonzero)
    explicit = tokens.take(positions)
    ends = np.cumsum(np.bincount(clustering.assign, minlength=k)) * width
    cuts = np.searchsorted(positions, ends)
    models = _token_models(clustering.codes)
    for model in range(k - 1, -1, -1):  # ANS is last in, first out: the decoder reads 0..K-1
        start, cut = (int(ends[model - 1]), int(cuts[model - 1])) if model else (0, 0)
        flag_model, token_model = models[model]
        if flag_model is None:
            coder.encode_reverse(tokens[start:ends[model]].astype(np.int32), token_model)
            continue
        coder.encode_reverse(np.subtract(explicit[cut:cuts[model]], 1, dtype=np.int32), token_model)
        coder.encode_reverse(_quads(nonzero[start:ends[model]]), flag_model)
    return _pack_extras(np.take(coding.symbols, order, axis=0).ravel().take(positions))


def _pack_extras(symbols: np.ndarray) -> bytes:
    """The raw extra bits of `symbols` (uint8, those without extra bits skipped), grouped by
    width (2, 3, 4, 5 bits), each group in the symbols' order, most significant bit first."""
    widths = np.take(NBITS, symbols)
    parts = [np.take(EXTRA_BITS[width], np.compress(widths == width, symbols), axis=0).ravel()
             for width in EXTRA_WIDTHS]
    return np.packbits(np.concatenate(parts)).tobytes()


def _read_extras(extras: bytes, widths: np.ndarray) -> np.ndarray:
    """The values `_pack_extras` wrote, for symbols whose extra bits have these `widths`
    (0 for a symbol without extra bits: its value is 0)."""
    values = np.zeros(widths.size, np.uint8)
    _scatter_extras(extras, widths, values)
    return values


def _scatter_extras(extras: bytes, widths: np.ndarray, out: np.ndarray) -> None:
    """Write the extra bits `_pack_extras` wrote into `out` (uint8), at the symbols whose
    extra bits have these `widths` (0: none, left as they are): each width's group read
    at its fixed width straight from the bytes (`_unpack_width`), then one scatter."""
    mask = np.empty(widths.size, bool)  # one buffer for the four masks
    positions = [np.flatnonzero(np.equal(widths, width, out=mask)) for width in EXTRA_WIDTHS]
    counts = np.zeros(EXTRA_SHIFT + 1, np.int64)
    counts[list(EXTRA_WIDTHS)] = [where.size for where in positions]
    _check_extras(extras, counts)
    data = np.frombuffer(extras, np.uint8)
    start = 0
    for width, where in zip(EXTRA_WIDTHS, positions, strict=True):
        if where.size:
            out[where] = _unpack_width(data, start, where.size, width)
        start += width * where.size


UNPACK_SHIFTS = {width: np.arange(7, -1, -1, dtype=np.uint64 if width > 4 else np.uint32) * width
                 for width in EXTRA_WIDTHS}  # per width: where each of 8 values sits in w bytes


def _unpack_width(data: np.ndarray, start: int, count: int, width: int) -> np.ndarray:
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


def zstd_bits(array: np.ndarray, level: int = ZSTD_LEVEL) -> int:
    """Bits of the array's bytes compressed by zstandard (a general-purpose comparison)."""
    data = np.ascontiguousarray(array).tobytes()
    return 8 * len(zstandard.ZstdCompressor(level=level).compress(data))


# ---------------------------------------------------------------------------- decoding


class _Reader:
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


def decode(data: bytes) -> np.ndarray:
    """The int8 array that `encode` coded into `data`; InputError if `data` is not such a stream."""
    data = bytes(data)
    if len(data) < HEADER.size + CRC.size or data[:4] != MAGIC:
        raise InputError("not an fmcompress codec stream (bad magic or too short)")
    if data[4] != VERSION:
        raise InputError(f"codec stream version {data[4]} is not supported (this build reads {VERSION})")
    (crc,) = CRC.unpack(data[-CRC.size:])
    if zlib.crc32(data[:-CRC.size]) != crc:
        raise InputError("codec stream damaged or truncated: checksum mismatch")
    try:
        return _decode_checked(data)
    except InputError:
        raise
    except (ValueError, IndexError, OverflowError, RuntimeError, struct.error) as exc:
        raise InputError(f"codec stream damaged: {type(exc).__name__}") from None


def _decode_checked(data: bytes) -> np.ndarray:
    reader = _Reader(data, len(data) - CRC.size)
    _, _, method, window, dtype, ndim = reader.unpack(HEADER, "the header")
    if method >= len(METHODS) or dtype not in DTYPE_CODES or ndim > MAX_DIMS:
        raise InputError("codec stream damaged: unknown method, dtype or rank in the header")
    if (METHODS[method] == "dcac") != (window > 0):
        raise InputError("codec stream damaged: the window does not match the method")
    shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim, "the shape"))
    if int(np.prod(shape, dtype=np.float64)) > MAX_ELEMENTS:
        raise InputError(f"codec stream claims {shape}: too many elements")
    groups, channels, width = _plane_layout(shape)
    flags, extras_size, word_count = reader.unpack(SECTIONS, "the section sizes")
    k, coded_refs = flags & ~REFS_FLAG, bool(flags & REFS_FLAG)
    if coded_refs and not window:
        raise InputError("codec stream damaged: references in a baseline stream")
    window = window if coded_refs else 0
    if k > MAX_MODELS:
        raise InputError(f"codec stream damaged: {k} models (at most {MAX_MODELS})")
    code_count = (k + BARE) + (window + 1 if window else 0) + k * TOKENS
    side = reader.take(-(-code_count * CODE_BITS // 8), "the model tables")
    codes = _unpack_fixed(np.unpackbits(np.frombuffer(side, np.uint8))[:code_count * CODE_BITS],
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
    models = _token_models(model_codes)
    parts = [_decode_tokens(coder, models[model], model_codes[model], int(sizes[model]))
             for model in range(k)]
    if not coder.is_empty():
        raise InputError("codec stream damaged: coded symbols left over")
    planes = np.empty((count, width), np.uint8)
    constant = np.flatnonzero(index >= k)
    planes[constant] = np.take(VALUE, index[constant] - k)[:, None]
    order = np.argsort(index, kind="stable")[:count - constant.size]  # the coding order
    planes[order] = _values(parts, extras, int(sizes.sum())).reshape(order.size, width)
    return _reconstruct(planes, refs.reshape(groups, channels)) if window else planes


def _decode_symbols(coder: Any, codes: np.ndarray, count: int) -> np.ndarray:
    if not codes.any():
        raise InputError("codec stream damaged: an empty model table")
    symbols = coder.decode(_table_model(codes), count)
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


def _check_extras(extras: bytes, counts: np.ndarray) -> None:
    """The extra bits must fill `extras` but for the last byte's padding; counts[w] is the
    number of symbols with w extra bits."""
    total = int(counts @ np.arange(counts.size))
    if total > 8 * len(extras) or 8 * len(extras) - total >= 8:
        raise InputError("codec stream damaged: the extra bits do not match the symbols")


def _values(parts: list[_Part], extras: bytes, size: int) -> np.ndarray:
    """The uint8 symbols (int8 bit patterns) of the decoded tokens, in coding order: in one
    compiled pass where numba is installed (fmcompress.codec_jit), else with numpy."""
    jit = _jit_kernels()
    if jit is None:
        return _values_numpy(parts, extras, size)
    counts = np.zeros(EXTRA_SHIFT + 1, np.int64)
    for part in parts:
        jit.width_counts(part.tokens, TOKEN_NBITS, counts)
    _check_extras(extras, counts)
    widths = np.arange(counts.size)
    cursors = np.concatenate([[0], np.cumsum(widths * counts)[:-1]])  # each width group's start
    data = np.frombuffer(extras + bytes(2), np.uint8)  # codec_jit reads two bytes at a time
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


def _jit_kernels() -> Any:
    """fmcompress.codec_jit, or None where numba is not installed (then numpy decodes).

    The first call per process imports numba and compiles the kernels, or loads them from
    numba's cache (about 0.3 s; a few seconds the very first time), by decoding a small
    stream: `measure_model` and the benchmark call it before they time anything.
    """
    if not _JIT_KERNELS:
        try:
            from . import codec_jit
        except ImportError:
            codec_jit = None
        _JIT_KERNELS.append(codec_jit)
        if codec_jit is not None:
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
        np.take(TOKEN_NBITS, tokens[start:stop].astype(np.intp), out=widths[start:stop], mode="clip")
    extra = np.zeros(tokens.size, np.uint8)
    _scatter_extras(extras, widths, extra)
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


# ------------------------------------------------------------------ model measurement


@dataclass
class CodecRow:
    """One stored map: bits per element of each coding, over all samples."""

    name: str
    shape: list[int]  # as the model stores it, batch included
    samples: int
    elements: int  # over all samples
    scale: float  # the per-tensor int8 scale
    raw_bpe: float
    zstd_bpe: float
    baseline_bpe: float
    dcac_bpe: float
    residual_planes: float  # share of the planes dcac coded as a residual

    @property
    def gain_percent(self) -> float:
        """How many fewer bits dcac needs than the baseline, in percent."""
        return 100.0 * (1.0 - self.dcac_bpe / self.baseline_bpe) if self.baseline_bpe else 0.0


@dataclass
class CodecReport:
    """Bits per element of a model's stored int8 maps: raw, zstd, baseline, dcac."""

    source: str
    window: int
    samples: int
    rows: list[CodecRow]
    # seconds spent coding all maps, per method [encode, decode]: for MB/s, not for bits
    seconds: dict[str, list[float]] = field(default_factory=dict)
    # a compiled model's projected maps: stored name -> channels of the original map (C for k)
    projected: dict[str, int] = field(default_factory=dict)

    def stacked(self) -> dict[str, Any] | None:
        """Projection and lossless coding together, for a model `fmcompress compile` emitted:
        the original maps' elements (a map stored with k of C channels had C / k times as
        many), and how many times fewer bits DC-AC needs than the original maps in int8."""
        if not self.projected:
            return None
        stored = self.elements
        original = sum(row.elements * self.projected.get(row.name, row.shape[1]) / row.shape[1]
                       for row in self.rows)
        coded_bits = self.total_bpe("dcac") * stored
        return {"original_elements": int(round(original)), "stored_elements": stored,
                "projection_ratio": original / stored if stored else 1.0,
                "lossless_ratio": 8 * stored / coded_bits if coded_bits else 1.0,
                "total_ratio_vs_int8": 8 * original / coded_bits if coded_bits else 1.0}

    @property
    def elements(self) -> int:
        return sum(row.elements for row in self.rows)

    def total_bpe(self, coding: str) -> float:
        """Element-weighted bits per element of `coding` (raw, zstd, baseline or dcac)."""
        total = self.elements
        bits = sum(getattr(row, f"{coding}_bpe") * row.elements for row in self.rows)
        return bits / total if total else 0.0

    @property
    def gain_percent(self) -> float:
        baseline = self.total_bpe("baseline")
        return 100.0 * (1.0 - self.total_bpe("dcac") / baseline) if baseline else 0.0

    def megabytes_per_second(self, method: str) -> tuple[float, float]:
        """(encode, decode) MB/s of int8 map data (10^6 elements) for `method`."""
        encode_s, decode_s = self.seconds.get(method, (0.0, 0.0))
        mb = self.elements / 1e6
        return (mb / encode_s if encode_s else 0.0, mb / decode_s if decode_s else 0.0)

    def to_dict(self) -> dict[str, Any]:
        codings = ("raw", "zstd", "baseline", "dcac")
        return {
            "schema_version": SCHEMA_VERSION, "source": self.source, "window": self.window,
            "samples": self.samples,
            "maps": [{**asdict(row), "gain_percent": row.gain_percent} for row in self.rows],
            "total": {"elements": self.elements, **{f"{c}_bpe": self.total_bpe(c) for c in codings},
                      "gain_percent": self.gain_percent},
            "megabytes_per_second": {
                m: dict(zip(("encode", "decode"), self.megabytes_per_second(m), strict=True))
                for m in METHODS},
            "stacked": self.stacked(),
        }


def coded_maps(model: onnx.ModelProto | str | os.PathLike,
               input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None) -> list:
    """The stored maps the study codes (FeatureMaps): role "map", floating dtype, 3-D or 4-D."""
    from .api import analyze

    report = analyze(model, input_shapes=input_shapes)
    return [fmap for fmap in report.stored
            if fmap.role == "map" and fmap.floating and len(fmap.shape) in (3, 4)]


def measure_model(model: onnx.ModelProto | str | os.PathLike, batches: Iterable[Any], *,
                  window: int = 8,
                  input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
                  threads: int | None = None) -> CodecReport:
    """Code every stored map of `model` on `batches` with raw, zstd, baseline and dcac.

    `batches` are dicts of model inputs (or (dict, labels) pairs, as Dataset.batches gives).
    Each map gets one int8 scale from all batches (calibrate_scale); each sample's map is
    coded on its own, planes = channels (a 3-D map [N, C, L] gives C planes of 1 x L).
    Every stream is decoded and compared: a mismatch raises VerificationError.
    """
    from .metrics import ort_session, run_ort
    from .modelio import load_model

    proto = load_model(model)
    maps = coded_maps(proto, input_shapes)
    if not maps:
        raise InputError("the model stores no floating-point 3-D or 4-D feature map to code")
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {out.name for out in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=m.name) for m in maps if m.name not in present)
    session = ort_session(probe, threads)
    outputs = [out.name for out in session.get_outputs()]
    values = dict(zip(outputs, run_ort(session, batches), strict=True))
    seconds = {method: [0.0, 0.0] for method in METHODS}
    _jit_kernels()  # loaded once per process, before the timing
    rows = [_measure_map(fmap.name, fmap.shape, values[fmap.name], window, seconds) for fmap in maps]
    source = proto.graph.name or "model" if isinstance(model, onnx.ModelProto) else str(model)
    return CodecReport(source, window, len(values[maps[0].name]), rows, seconds,
                       projected=_projected_channels(proto, [m.name for m in maps]))


def _projected_channels(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """A compiled model's stored maps that are projections: `X/fmc_k<k>` with X in the plan
    that compile writes into the metadata (fmcompress.plan), mapped to X's channels."""
    import json

    meta = {prop.key: prop.value for prop in model.metadata_props}
    try:
        plan = {entry["name"]: int(entry["C"]) for entry in json.loads(meta.get("fmcompress.plan", "[]"))}
    except (ValueError, KeyError, TypeError):
        return {}
    found = {}
    for name in names:
        original, _, rank = name.rpartition("/fmc_k")
        if original in plan and rank.isdigit():
            found[name] = plan[original]
    return found


def _measure_map(name: str, shape: list[int], values: np.ndarray, window: int,
                 seconds: dict[str, list[float]]) -> CodecRow:
    scale = calibrate_scale([values])
    quantized = quantize(values, scale)
    if quantized.ndim == 3:  # [N, C, L]: C planes of one row each
        quantized = quantized[:, :, None, :]
    bits = {"zstd": 0, "baseline": 0, "dcac": 0}
    residual = 0
    for sample in quantized:
        bits["zstd"] += zstd_bits(sample)
        for method in METHODS:
            start = time.perf_counter()
            stream, refs = encode_with_refs(sample, method=method, window=window)
            middle = time.perf_counter()
            back = decode(stream)
            seconds[method][0] += middle - start
            seconds[method][1] += time.perf_counter() - middle
            if not np.array_equal(back, sample):
                raise VerificationError(f"{name}: the {method} stream did not decode to the map")
            bits[method] += 8 * len(stream)
        residual += int(np.count_nonzero(refs))
    elements = int(quantized.size)
    planes = quantized.shape[0] * quantized.shape[1]
    return CodecRow(name, list(shape), len(quantized), elements, scale, 8.0,
                    bits["zstd"] / elements, bits["baseline"] / elements, bits["dcac"] / elements,
                    residual / planes if planes else 0.0)
