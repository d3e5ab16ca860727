"""The encoder: `encode` an int8 array into a stream (baseline or dcac).

Both methods share everything but the reference step (rule e): constant planes, shared
models (rule d) and the ANS coder (rule f). dcac estimates the stream with and without
its references and writes only the smaller one, so it never costs more than the
baseline but for the estimate's error.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import constriction
import numpy as np

from ..errors import InputError
from .bitpack import pack_extras, pack_fixed, pack_quads
from .clustering import Clustering, cluster, refit
from .planes import parent_indices, plane_layout, token_histograms
from .references import choose_references
from .stream import CRC, HEADER, MAGIC, MAX_DIMS, MAX_WINDOW, METHODS, REFS_FLAG, SECTIONS, VERSION
from .symbols import BARE, TOKEN, TOKEN_NBITS
from .tables import CODE_BITS, coded_bits, table_codes, table_cost, table_model, token_models


@dataclass
class Coding:
    """What one stream codes: every plane's symbols and how they are modelled (rule d)."""

    symbols: np.ndarray  # (P, HW) uint8: the planes, or residuals where a plane has a ref
    tokens: np.ndarray  # (P, HW) uint8 (rule c)
    histograms: np.ndarray  # (P, TOKENS) token counts
    varying: np.ndarray  # the indices of the non-constant planes
    first: np.ndarray  # per plane its most frequent token (a constant plane's only one)
    clustering: Clustering | None  # the shared models of the varying planes

    @property
    def models(self) -> int:
        return 0 if self.clustering is None else len(self.clustering.codes)

    def index(self) -> np.ndarray:
        """Model index per plane: 0..K-1 a shared model, K + t a constant plane of token t."""
        index = (self.models + self.first).astype(np.int64)
        if self.clustering is not None:
            index[self.varying] = self.clustering.assign
        return index


def plan_coding(symbols: np.ndarray, tokens: np.ndarray, histograms: np.ndarray,
                models: np.ndarray | None = None) -> Coding:
    """Constant planes, and shared models for the others: clustered afresh, or refitted
    from the table codes `models` by one assignment step."""
    first = histograms.argmax(axis=1)
    varying = np.flatnonzero((np.count_nonzero(histograms, axis=1) > 1) | (first >= BARE))
    clustering = None
    if varying.size:
        counts = histograms[varying].astype(np.float64)
        clustering = cluster(counts) if models is None else refit(counts, models)
    return Coding(symbols, tokens, histograms, varying, first, clustering)


def analyse(symbols: np.ndarray) -> Coding:
    tokens = np.take(TOKEN, symbols)
    return plan_coding(symbols, tokens, token_histograms(tokens))


def stream_bits(coding: Coding, refs: np.ndarray, window: int) -> float:
    """Rule e (3): the estimated size of a stream (tokens, tables, indices, extra bits),
    within a few bytes of the real one, so that dcac needs to write only one."""
    bits = coded_bits(np.bincount(coding.index(), minlength=coding.models + BARE))
    if refs.any():
        bits += coded_bits(np.bincount(refs.ravel(), minlength=window + 1))
    if coding.clustering is not None:
        bits += coding.clustering.token_bits + coding.clustering.codes.size * CODE_BITS
    return bits + float(coding.histograms.sum(axis=0) @ TOKEN_NBITS)


def encode(array: np.ndarray, *, method: str = "dcac", window: int = 8) -> bytes:
    """Code an int8 array losslessly; `decode` returns it exactly (fmcompress.codec, rules
    a to g)."""
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
    groups, channels, width = plane_layout(shape)
    planes = np.ascontiguousarray(array).view(np.uint8).reshape(groups * channels, width)
    stored_window = window if method == "dcac" else 0
    coding = analyse(planes)
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


def _with_references(planes: np.ndarray, refs: np.ndarray, plain: Coding,
                     window: int) -> tuple[Coding, np.ndarray]:
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
    residual = planes.take(rows, axis=0) - planes.take(parent_indices(refs)[rows], axis=0)  # rule b
    res_tokens = np.take(TOKEN, residual)
    res_counts = token_histograms(res_tokens)
    # the plain models and one fitted to all the residuals: a refit from them has both
    models = np.concatenate([plain.clustering.codes, table_codes(res_counts.sum(axis=0))[None]])
    mixed = plain.histograms.copy()
    mixed[rows] = res_counts
    fitted = plan_coding(planes, plain.tokens, mixed, models).clustering
    models = np.concatenate([models, fitted.codes])
    costs = table_cost(models).T + TOKEN_NBITS[:, None]  # tokens and extra bits
    keep = (res_counts @ costs).min(axis=1) < (plain.histograms[rows] @ costs).min(axis=1)
    if not keep.any():
        return plain, none
    rows = rows[keep]
    confirmed = np.zeros(refs.size, np.int64)
    confirmed[rows] = refs.ravel()[rows]
    confirmed = confirmed.reshape(refs.shape)
    symbols, tokens, counts = plain.symbols.copy(), plain.tokens.copy(), plain.histograms.copy()
    symbols[rows], tokens[rows], counts[rows] = residual[keep], res_tokens[keep], res_counts[keep]
    coding = plan_coding(symbols, tokens, counts, models)
    if stream_bits(plain, none, window) <= stream_bits(coding, confirmed, window):
        return plain, none
    return coding, confirmed


def _write(coding: Coding, refs: np.ndarray, window: int) -> bytes:
    """Everything after the header but the CRC (docs/codec.md, stream format)."""
    k = coding.models
    index = coding.index()
    index_codes = table_codes(np.bincount(index, minlength=k + BARE))
    code_parts = [index_codes]
    coded_refs = bool(window and refs.any())  # no references: neither table nor indices
    if coded_refs:
        ref_codes = table_codes(np.bincount(refs.ravel(), minlength=window + 1))
        code_parts.append(ref_codes)
    coder = constriction.stream.stack.AnsCoder()
    extras = b""
    if coding.clustering is not None:
        code_parts.append(coding.clustering.codes.ravel())
        extras = _write_tokens(coder, coding)
    if coded_refs:
        coder.encode_reverse(refs.ravel().astype(np.int32), table_model(ref_codes))
    if index.size:
        coder.encode_reverse(index.astype(np.int32), table_model(index_codes))
    words = coder.get_compressed().astype("<u4").tobytes()
    side = np.packbits(pack_fixed(np.concatenate(code_parts), CODE_BITS)).tobytes()
    sections = SECTIONS.pack(k | (REFS_FLAG if coded_refs else 0), len(extras), len(words) // 4)
    return sections + side + extras + words


def _write_tokens(coder: Any, coding: Coding) -> bytes:
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
    models = token_models(clustering.codes)
    for model in range(k - 1, -1, -1):  # ANS is last in, first out: the decoder reads 0..K-1
        start, cut = (int(ends[model - 1]), int(cuts[model - 1])) if model else (0, 0)
        flag_model, token_model = models[model]
        if flag_model is None:
            coder.encode_reverse(tokens[start:ends[model]].astype(np.int32), token_model)
            continue
        coder.encode_reverse(np.subtract(explicit[cut:cuts[model]], 1, dtype=np.int32), token_model)
        coder.encode_reverse(pack_quads(nonzero[start:ends[model]]), flag_model)
    return pack_extras(np.take(coding.symbols, order, axis=0).ravel().take(positions))
