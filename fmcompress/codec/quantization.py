"""Symmetric per-tensor int8 quantisation of float feature maps, before lossless coding."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import InputError


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
            raise InputError("cannot calibrate an int8 scale: "
                             "the data holds NaN or infinite values")
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
