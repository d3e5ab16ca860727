"""Sizes and ceilings: parsing `256KB`, `0.25MB`, `262144`, `4x`, and printing bytes.

KB = KiB = 1024 bytes, MB = MiB = 1024**2 (the memory convention of SRAM sizes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import InputError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_RATIO_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*[xX]\s*$")


@dataclass(frozen=True)
class Ceiling:
    """A memory ceiling: absolute bytes, or the largest compressible stored map divided by `ratio`.

    Which map is the largest compressible one is the analysis's call (AnalysisReport):
    graph inputs, graph outputs and integer maps never set a relative ceiling.
    """

    bytes: int | None = None
    ratio: float | None = None
    text: str = ""

    @property
    def is_relative(self) -> bool:
        return self.ratio is not None

    def resolve(self, largest_map_bytes: int) -> int:
        """Absolute ceiling in bytes; a relative one is floor(largest compressible map / ratio)."""
        if self.bytes is not None:
            return self.bytes
        assert self.ratio is not None
        return int(math.floor(largest_map_bytes / self.ratio))

    def __str__(self) -> str:
        return self.text or (f"{self.ratio:g}x" if self.ratio else format_bytes(self.bytes or 0))


def parse_size(text: str) -> int:
    """Parse an absolute size such as `256KB`, `256KiB`, `0.25MB` or `262144` into bytes."""
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InputError(f"invalid size {text!r}: use bytes (262144) or a unit: 256KB, 256KiB, 0.25MB")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise InputError(f"invalid size {text!r}: must be at least 1 byte")
    return int(value)


def parse_ceiling(text: str) -> Ceiling:
    """Parse a ceiling: an absolute size, or `Nx` (largest compressible stored map / N, N > 1)."""
    text = str(text).strip()
    if text.startswith("-"):
        raise InputError(f"invalid ceiling {text!r}: must be positive")
    ratio = _RATIO_RE.match(text)
    if ratio:
        value = float(ratio.group(1))
        if not value > 1:
            raise InputError(f"invalid ceiling {text!r}: a relative ceiling needs a factor above 1, e.g. 4x")
        return Ceiling(ratio=value, text=text)
    try:
        return Ceiling(bytes=parse_size(text), text=text)
    except InputError:
        raise InputError(
            f"invalid ceiling {text!r}: use a size (256KB, 256KiB, 0.25MB, 262144) or a ratio (4x)"
        ) from None


def format_bytes(n: float) -> str:
    """Human-readable bytes in KiB-based units (`196.0 KiB`)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
