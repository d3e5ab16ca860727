"""How an array is cut into planes (rule a), and residuals between planes (rule b).

Also the per-plane token histograms that the models and the stream estimate are built on.
"""

from __future__ import annotations

import math

import numpy as np

from .symbols import TOKENS

PLANE_OFFSETS = np.arange(0, 1 << 16, TOKENS, dtype=np.uint16)  # plane * TOKENS, for bincounts
SPARSE = 0.4  # below this share of nonzero tokens, histograms count only the nonzero ones


def plane_layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(G, C, HW): G runs of C planes of HW elements (rule a)."""
    if len(shape) <= 2:
        return 1, 1, math.prod(shape)
    return math.prod(shape[:-3]), shape[-3], shape[-2] * shape[-1]


def parent_indices(refs: np.ndarray) -> np.ndarray:
    """Flat index of each plane's reference plane, or -1; refs is (G, C)."""
    groups, channels = refs.shape
    index = np.arange(groups * channels).reshape(groups, channels)
    return np.where(refs > 0, index - refs, -1).ravel()


def residuals(planes: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Rule b: planes (P, HW) uint8 -> the coded symbols (residual where a plane has a ref)."""
    parents = parent_indices(refs)
    coded = planes.copy()
    rows = np.flatnonzero(parents >= 0)
    coded[rows] -= planes[parents[rows]]  # uint8 arithmetic wraps mod 256
    return coded


def reconstruct(coded: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Undo `residuals` by pointer jumping: log2(longest chain) vectorised rounds.

    Invariant: value[p] = sum of the coded planes from p down to (excluding) parent[p];
    each round adds the parent's partial sum and jumps the parent to its parent.
    """
    parents = parent_indices(refs)
    values = coded.copy()
    active = np.flatnonzero(parents >= 0)
    while active.size:
        above = parents[active]
        values[active] += values[above]  # the right side is gathered before any write
        parents[active] = parents[above]
        active = active[parents[active] >= 0]
    return values


def token_histograms(tokens: np.ndarray) -> np.ndarray:
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
