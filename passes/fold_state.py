"""The fold pass's walk state: what stands for U T (Pending) and what was done (FoldState).

Shared by passes/fold.py and the modules of its rules (fold_push.py, fold_concat.py); the
rules themselves are specified in fold.py's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from fmcompress.featuremaps import Projection

from .graphutil import Namer
from .insert import MapInfo


@dataclass
class Pending:
    """A tensor of the original graph that now stands for U @ stored (channel mixing per pixel)."""

    stored: gs.Tensor
    U: np.ndarray
    origins: list[str]  # the projected maps it comes from (for the report)
    rank: int = 4  # of both the original and the stored tensor

    @property
    def channel_axes(self) -> tuple[int, int]:
        return channel_axes(self.rank)


def channel_axes(rank: int) -> tuple[int, int]:
    """The channel axis of an N, C, spatial... tensor, positive and negative."""
    return 1, 1 - rank


@dataclass
class FoldState:
    """The graph being rewritten, the tensors pending, and what the report says was done."""

    graph: gs.Graph
    namer: Namer
    projections: dict[str, Projection]
    infos: dict[str, MapInfo]
    pending: dict[str, Pending] = field(default_factory=dict)
    data: dict[str, dict] = field(default_factory=dict)
    shared_u: dict[str, gs.Variable] = field(default_factory=dict)  # rule h': one U for converging readers

    def record(self, origins: list[str], where: str, action: str) -> None:
        for origin in origins:
            self.data[origin]["consumers"][where] = action


def node_label(node: gs.Node) -> str:
    """The node's name for the report; unnamed nodes are named by their first output."""
    return node.name or f"{node.op}->{node.outputs[0].name if node.outputs else '?'}"
