"""The records that the passes, the backend and the reports share: feature maps and projections.

Kept free of onnxruntime, torch and graph libraries so that every layer can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def compressible(self) -> bool:
        """A floating-point map between groups, [N, C, H, W] or [N, C, L], with at least 2 channels."""
        return self.role == "map" and self.floating and len(self.shape) in (3, 4) and self.shape[1] >= 2

    @property
    def floating(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))

    @property
    def not_compressible_reason(self) -> str | None:
        """Why the tool never compresses this tensor (reported only), or None when it may.

        Graph inputs and outputs belong to the caller; an integer map is already
        quantized (projecting it would need requantization). Other maps that are not
        compressible (2-D, one channel) are left to the planner, which calls them infeasible.
        """
        if self.role != "map":
            return f"graph {self.role}"
        if self.floating:
            return None
        return "integer dtype" if self.dtype.startswith(("int", "uint")) else f"{self.dtype} dtype"


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
