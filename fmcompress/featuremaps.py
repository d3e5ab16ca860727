"""The records that the passes, the backend and the reports share: feature maps and projections.

Kept free of onnxruntime, torch and graph libraries so that every layer can import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError


@dataclass
class FeatureMap:
    """One tensor of a view. `role` is input, map or output; only maps can be compressed."""

    name: str
    shape: list[int]
    dtype: str
    bytes: int
    role: str
    producer: str
    producer_op: str
    group: str
    consumers: list[str]
    step: int  # execution step of the view that produces it (0 for graph inputs)
    last_use: int  # step of the last reader (the last step for graph outputs; -1 if unread)
    over_ceiling: bool = False
    channels_last: bool = False  # a 4-D [N, H, W, C] map (memory.py `channels_last`)

    @property
    def compressible(self) -> bool:
        """Compile can project it: `not_compressible_reason` is None."""
        return self.not_compressible_reason is None

    @property
    def floating(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))

    @property
    def not_compressible_reason(self) -> str | None:
        """Why the tool never compresses this tensor (a one-line reason), or None when it may.

        The one definition of compressible, which the analysis (over the ceiling, the
        relative ceiling), the plan and the runtime plan share: graph inputs and outputs
        belong to the caller; an integer map is already quantized (projecting it would
        need requantization); the map's layout must be one a projection applies to
        (`layout_reason`, the rule `passes/insert.py validate_projections` enforces).
        """
        if self.role != "map":
            return f"graph {self.role}"
        if not self.floating:
            return "integer dtype" if self.dtype.startswith(("int", "uint")) else f"{self.dtype} dtype"
        return layout_reason(len(self.shape), self.shape[1] if len(self.shape) > 1 else None,
                             self.channels_last)


PROJECTABLE_RANKS = (3, 4)  # [N, C, L] and [N, C, H, W]: P and U are 1x1 convs over axis 1


def layout_reason(rank: int | None, channels: int | None, channels_last: bool = False) -> str | None:
    """Why a map of this rank and channel count (axis 1; None: unknown) cannot be projected,
    or None: only 4-D NCHW and 3-D NCL maps with at least 2 channels can. A 4-D map whose
    channels are on the last axis ([N, H, W, C], `channels_last`) cannot: P and U act on axis 1."""
    if channels_last:
        return "channel-last [N, H, W, C] map: P and U act on axis 1, its rows"
    if rank not in PROJECTABLE_RANKS:
        what = "map of unknown rank" if rank is None else f"{rank}-D map"
        return f"{what}, not a 4-D NCHW or 3-D NCL map"
    if channels is not None and channels < 2:
        return "one channel: nothing to project"
    return None


OpView = tuple[str, Mapping[str, Any]]  # a node's op_type and attributes


def channels_last(producer: OpView | None, readers: Iterable[tuple[str, Mapping[str, Any], int]]) -> bool:
    """Whether a 4-D map is laid out [N, H, W, C], judged from its producer and its readers
    (op_type, attributes, which input reads it): a Transpose moved axis 1 last to make it, a
    Transpose moves its last axis back to 1, or a MatMul (as its left operand) or a
    LayerNormalization over the last axis reads it (ConvNeXt's blocks, a detector head)."""
    if producer is not None and producer[0] == "Transpose" and list(producer[1].get("perm", []))[-1:] == [1]:
        return True
    for op, attrs, index in readers:
        if op == "Transpose" and list(attrs.get("perm", []))[1:2] == [3]:
            return True
        if (op == "MatMul" and index == 0) or (op == "LayerNormalization" and attrs.get("axis", -1) in (-1, 3)):
            return True
    return False


@dataclass
class Projection:
    """One feature map's learned projections: Z = P X is stored, consumers read U Z."""

    P: np.ndarray  # (k, C) float32
    U: np.ndarray  # (C, k) float32

    def __post_init__(self) -> None:
        self.P = np.asarray(self.P, dtype=np.float32)
        self.U = np.asarray(self.U, dtype=np.float32)
        if self.P.ndim != 2 or self.U.ndim != 2:
            raise InputError(f"projection P and U must be matrices, got shapes {self.P.shape} and {self.U.shape}")
        if self.U.shape != self.P.shape[::-1] or 0 in self.P.shape:
            raise InputError(f"projection shapes disagree: P is {self.P.shape}, U is {self.U.shape}; expected (k, C) and (C, k)")
        if not (np.isfinite(self.P).all() and np.isfinite(self.U).all()):
            raise InputError("projection P or U holds NaN or infinite values")

    @property
    def k(self) -> int:
        return int(self.P.shape[0])

    @property
    def C(self) -> int:  # noqa: N802 - the paper's name
        return int(self.P.shape[1])
