"""Rule e (1): which of the previous W planes, if any, each plane is coded against.

Candidates are compared by the estimated code length of the symbols they would code,
on a sample of positions shared by all planes; docs/codec.md explains why magnitude
proxies such as the L1 norm of the residual pick worse references.
"""

from __future__ import annotations

import numpy as np

from .symbols import TOKEN, TOKEN_NBITS, TOKENS
from .tables import MILLER_MADOW

REF_MARGIN = 0.01  # relative: a residual must be estimated 1% cheaper than the plane itself
REF_SAMPLE_SHARE = 1 / 8  # sampled positions per candidate, as a share of the elements
REF_MIN_SAMPLES = 64  # per plane (fewer saturate the entropy estimate)
REF_BUDGET = 0.25  # sampled candidate tokens, as a share of the elements, before screening
REF_SCREEN = 0.005  # the screened planes' references must save this share of their bits

TOKEN_INT32 = TOKEN.astype(np.int32)
TOKEN_NBITS_FLOAT = TOKEN_NBITS.astype(np.float64)
ONES_TOKENS = np.ones(TOKENS)


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
