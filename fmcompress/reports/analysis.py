"""Typed reports of the memory analysis; their JSON is their serialisation.

Data only: the tables, plots and markdown that draw them are in the sibling modules
(terminal, plot, markdown), so importing this module pulls in neither rich nor matplotlib.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..featuremaps import FeatureMap
from ..modelio import write_bytes_atomic
from ..units import Ceiling

SCHEMA_VERSION = 1
# onnxruntime graph optimisation levels of the runtime view (passes/runtime.py); extended is
# what it does on every machine, all adds the x86-only NCHWc layout and is onnxruntime's default
ORT_LEVELS = ("extended", "all", "basic", "none")
REPORT_ORT_LEVEL = "all"  # compile's reported runtime figures: a session a user opens runs this
PLAN_ORT_LEVEL = "extended"  # compile --runtime ort plans, tiles and verifies at this (bands round alike)
DEFAULT_ORT_LEVEL = PLAN_ORT_LEVEL  # analyze --mode runtime and the runtime pass, when no level is named


@dataclass
class LivePoint:
    step: int
    node: str
    bytes: int


def live_curve(maps: list[FeatureMap], labels: list[str]) -> list[LivePoint]:
    """Summed bytes of the maps alive at each step (producer's step to last reader's step): the
    curve of the stored view (passes/memory.py) and of the runtime view (passes/runtime.py)."""
    delta = np.zeros(len(labels) + 2, dtype=np.int64)
    for fmap in maps:
        end = max(fmap.last_use, fmap.step)
        delta[fmap.step] += fmap.bytes
        delta[end + 1] -= fmap.bytes
    live = np.cumsum(delta)[: len(labels)]
    return [LivePoint(step=i, node=label, bytes=int(v)) for i, (label, v) in enumerate(zip(labels, live, strict=True))]


@dataclass
class ViewSummary:
    largest_bytes: int
    largest_name: str
    live_peak_bytes: int
    live_peak_step: int
    count: int


@dataclass
class RuntimeView:
    """What onnxruntime allocates (passes/runtime.py): its tensors in execution order and their
    live curve. Graph inputs are listed (role "input") but belong to the caller: never counted."""

    level: str  # onnxruntime's graph optimisation level
    tensors: list[FeatureMap]
    live: list[LivePoint]
    peak_bytes: int
    peak_step: int
    largest_bytes: int
    largest_name: str
    ceiling_bytes: int | None = None
    measured_peak_bytes: int | None = None  # process peak growth of one run (fmcompress.memprobe)
    # what the live curve sums: each buffer as the tensor that holds it at a step (rule g), and
    # the workspaces; not in to_dict (the curve and the tensors are)
    allocations: list[FeatureMap] = field(default_factory=list)

    @classmethod
    def build(cls, *, level: str, tensors: list[FeatureMap], live: list[LivePoint],
              ceiling_bytes: int | None = None, allocations: list[FeatureMap] | None = None) -> RuntimeView:
        counted = [t for t in tensors if t.role != "input"]
        largest = max(counted, key=lambda t: t.bytes, default=None)
        peak = max(live, key=lambda p: p.bytes, default=None)
        return cls(level=level, tensors=tensors, live=live, peak_bytes=peak.bytes if peak else 0,
                   peak_step=peak.step if peak else -1, largest_bytes=largest.bytes if largest else 0,
                   largest_name=largest.name if largest else "", ceiling_bytes=ceiling_bytes,
                   allocations=list(allocations or []))

    def over_ceiling(self) -> list[FeatureMap]:
        return [t for t in self.tensors if t.over_ceiling]

    def alive_at(self, step: int) -> list[FeatureMap]:
        """What is allocated at `step`: a shared buffer once, named by the tensor it holds then
        (so the bytes sum to the live curve's); without allocations, the tensors alive."""
        pool = self.allocations or [t for t in self.tensors if t.role != "input"]
        return [t for t in pool if t.bytes and t.step <= step <= max(t.last_use, t.step)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("allocations")
        data["over_ceiling"] = [t.name for t in self.over_ceiling()]
        return data


@dataclass
class AnalysisReport:
    """What the memory analysis pass found. `stored` is the paper's view; see docs/design.md.

    A relative ceiling (`4x`) is resolved on the largest compressible stored map
    (FeatureMap.compressible: what compile can project): graph inputs, graph outputs,
    integer maps and maps of other layouts (2-D, 5-D, one channel) are reported against
    the ceiling with their reason but never set it.
    """

    source: str
    input_shapes: dict[str, list[int]]
    act_bytes: int | None
    ceiling: str | None
    ceiling_bytes: int | None
    stored: list[FeatureMap]
    strict: list[FeatureMap]
    live: list[LivePoint]
    strict_live: list[LivePoint]
    summary: dict[str, ViewSummary] = field(default_factory=dict)
    runtime: RuntimeView | None = None  # onnxruntime's allocations, when asked for (analyze --mode runtime)
    # not serialised: every tensor's static shape (weights included), for FLOPs and later passes;
    # the ceiling as parsed and a key of the analysed graph, to tell whether the report can be reused
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    ceiling_spec: Ceiling | None = field(default=None, repr=False)
    graph_key: str = field(default="", repr=False)

    @classmethod
    def build(cls, *, source: str, input_shapes: dict[str, tuple[int, ...]], act_bytes: int | None,
              ceiling: Ceiling | None, stored: list[FeatureMap], strict: list[FeatureMap],
              live: list[LivePoint], strict_live: list[LivePoint],
              tensor_shapes: dict[str, tuple[int, ...]] | None = None, graph_key: str = "") -> AnalysisReport:
        ceiling_bytes = None if ceiling is None else _resolve_ceiling(ceiling, stored)
        for fmap in stored:
            fmap.over_ceiling = ceiling_bytes is not None and fmap.bytes > ceiling_bytes
        report = cls(source=source, input_shapes={k: list(v) for k, v in input_shapes.items()},
                     act_bytes=act_bytes, ceiling=str(ceiling) if ceiling else None,
                     ceiling_bytes=ceiling_bytes, stored=stored, strict=strict, live=live,
                     strict_live=strict_live, tensor_shapes=dict(tensor_shapes or {}), ceiling_spec=ceiling,
                     graph_key=graph_key)
        stored_summary = _summarise(stored, live)  # the live view lists the same maps
        report.summary = {"stored": stored_summary, "live": stored_summary,
                          "strict": _summarise(strict, strict_live)}
        return report

    @property
    def peaks(self) -> dict[str, int]:
        """The headline figure of each view: largest stored map, live peak, largest tensor."""
        peaks = {"stored": self.summary["stored"].largest_bytes,
                 "live": self.summary["live"].live_peak_bytes,
                 "strict": self.summary["strict"].largest_bytes}
        if self.runtime is not None:
            peaks["runtime"] = self.runtime.peak_bytes
        return peaks

    def over_ceiling(self, include_inputs: bool = False) -> list[FeatureMap]:
        """Stored maps above the ceiling; those never compressed (graph inputs and outputs,
        integer maps, other layouts: FeatureMap.not_compressible_reason) only when asked."""
        return [m for m in self.stored
                if m.over_ceiling and (include_inputs or m.not_compressible_reason is None)]

    def not_compressible_over_ceiling(self) -> list[FeatureMap]:
        return [m for m in self.stored if m.over_ceiling and m.not_compressible_reason is not None]

    def alive_at(self, step: int, view: str = "stored") -> list[FeatureMap]:
        """The maps of `view` (stored or strict) alive at `step`: from their producer's step to their last reader's."""
        maps = self.strict if view == "strict" else self.stored
        return [m for m in maps if m.step <= step <= max(m.last_use, m.step)]

    def to_dict(self) -> dict[str, Any]:
        data = {name: value for name, value in asdict(self).items()
                if name not in ("tensor_shapes", "ceiling_spec", "graph_key", "runtime")}
        if self.runtime is not None:
            data["runtime"] = self.runtime.to_dict()
        data["schema_version"] = SCHEMA_VERSION
        data["peaks"] = self.peaks
        data["over_ceiling"] = [m.name for m in self.over_ceiling()]
        data["not_compressible_over_ceiling"] = [m.name for m in self.not_compressible_over_ceiling()]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_json(self, path: str | os.PathLike) -> None:
        write_bytes_atomic(self.to_json().encode(), Path(path))


def _resolve_ceiling(ceiling: Ceiling, stored: list[FeatureMap]) -> int:
    """Bytes of the ceiling; a relative one divides the largest compressible stored map."""
    if not ceiling.is_relative:
        return ceiling.resolve(0)
    largest = max((m.bytes for m in stored if m.compressible), default=None)
    if largest is None:
        raise InputError(f"ceiling {ceiling}: a relative ceiling divides the largest compressible stored map, "
                         "and this model has none; give the ceiling in bytes (e.g. 256KB)")
    return ceiling.resolve(largest)


def _summarise(maps: list[FeatureMap], live: list[LivePoint]) -> ViewSummary:
    largest = max(maps, key=lambda m: m.bytes, default=None)
    peak = max(live, key=lambda p: p.bytes, default=None)
    return ViewSummary(largest_bytes=largest.bytes if largest else 0, largest_name=largest.name if largest else "",
                       live_peak_bytes=peak.bytes if peak else 0, live_peak_step=peak.step if peak else -1,
                       count=len(maps))
