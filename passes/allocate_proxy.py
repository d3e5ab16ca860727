"""The greedy allocation's per-map proxy (passes/allocate.py's rules c, d and f): MapProxy,
its spectrum and sensitivities measured on calibration data, the estimated cost of a rank,
and the explicit projection convs a map will need, predicted from fold.py's rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from fmcompress.data import Dataset
from fmcompress.reports.analysis import AnalysisReport

from .ops import FOLD_PUSH_OPS

STEPS_PER_MAP = 16  # a cut step is max(1, C // 16) channels


@dataclass
class MapProxy:
    """What the greedy knows about one candidate map (rules c, d, f)."""

    name: str
    shape: list[int]
    plane_bytes: int
    k_max: int  # the upper bound: C, or the ceiling's rank
    producer: str
    step: int
    energy_lost: list[float]  # e(k) for k = 0..C
    probes: list[tuple[int, float]] = field(default_factory=list)  # (k, measured output relative error)
    explicit_p: bool = False  # predicted: P needs its own 1x1 conv
    explicit_u: int = 0  # predicted: readers that need their own U conv
    macs_per_rank: int = 0  # of those explicit convs, per channel of k
    latency_penalty: float = 0.0  # L: their MACs at the uniform rank / the model's MACs

    @property
    def channels(self) -> int:
        return self.shape[1]

    def step_size(self) -> int:
        return max(1, self.channels // STEPS_PER_MAP)

    def fidelity_cost(self, k: int) -> float:
        """Rule d: the squared output relative error estimated for this map alone at rank k."""
        lost = self.energy_lost[k]
        if not self.probes:
            return lost  # nothing measured: the energy itself
        xs, ys = [0.0], [0.0]
        for probe_k, error in sorted(self.probes, key=lambda probe: self.energy_lost[probe[0]]):
            if self.energy_lost[probe_k] > xs[-1]:
                xs.append(self.energy_lost[probe_k])
                ys.append(max(ys[-1], error**2))
        if lost <= xs[-1]:
            return float(np.interp(lost, xs, ys))
        slope = max(ys[-1] / xs[-1], (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])) if len(xs) > 1 else 0.0
        return ys[-1] + slope * (lost - xs[-1])

    def latency_cost(self, k: int) -> float:
        return 0.0 if k >= self.channels else self.latency_penalty


# ---------------------------------------------------------------- measurements (rule c)

def measure_proxies(model: onnx.ModelProto, proxies: list[MapProxy], probe_ranks: dict[str, int],
                    data: Dataset, batch_size: int, seed: int = 0) -> None:
    """Spectra (one pass) and sensitivities (one pass per map) on `data`, in place."""
    import torch

    from fmcompress.backend.projection import (
        ChannelProjection,
        SecondMomentRecorder,
        pca_projection,
    )

    from .fit import torch_executor

    executor = torch_executor(model)
    names = list(executor.input_names)
    recorders = {p.name: SecondMomentRecorder(p.channels, seed=seed + i, stop=False) for i, p in enumerate(proxies)}
    for name, recorder in recorders.items():
        executor.set_transform(name, recorder)
    with torch.no_grad():
        reference = [executor(*inputs) for inputs in data.torch_batches(batch_size, names)]
    executor.clear_transforms()
    for proxy in proxies:
        moment = recorders[proxy.name].mean_moment()
        proxy.energy_lost = _energy_lost(moment)
        proxy.probes = []
        for k in _probe_ranks(proxy, probe_ranks[proxy.name]):
            projection = pca_projection(moment, k)
            executor.set_transform(proxy.name, ChannelProjection(projection.P, projection.U))
            proxy.probes.append((k, _relative_error(executor, data, batch_size, names, reference)))
            executor.clear_transforms()


def _energy_lost(moment) -> list[float]:
    """e(k) = the share of the trace beyond the top k eigenvalues, k = 0..C."""
    import torch

    values = torch.linalg.eigvalsh(moment).flip(0).clamp(min=0).numpy()
    total = float(values.sum())
    if total <= 0:
        return [0.0] * (len(values) + 1)
    kept = np.concatenate([[0.0], np.cumsum(values)]) / total
    return [float(max(0.0, 1.0 - share)) for share in kept]


def _probe_ranks(proxy: MapProxy, uniform_k: int) -> list[int]:
    """k_u, k_u/2, k_u/4 (distinct, 1 <= k < C): where the uniform allocation and deeper cuts land."""
    top = min(proxy.channels - 1, proxy.k_max, max(1, uniform_k))
    return sorted({max(1, top // divisor) for divisor in (1, 2, 4)}, reverse=True)


def _relative_error(executor, data: Dataset, batch_size: int, names: list[str], reference: list) -> float:
    """||y - y_ref|| / ||y_ref|| over every output of every batch (fidelity's relative_error)."""
    import torch

    diff = norm = 0.0
    with torch.no_grad():
        for inputs, ref in zip(data.torch_batches(batch_size, names), reference, strict=True):
            for out, expected in zip(executor(*inputs), ref, strict=True):
                diff += float(torch.sum((out.double() - expected.double()) ** 2))
                norm += float(torch.sum(expected.double() ** 2))
    return math.sqrt(diff / norm) if norm > 0 else 0.0


def measured_error(model: onnx.ModelProto, maps: list[tuple[str, int, int]], data: Dataset,
                   batch_size: int) -> float:
    """Rule c's check: the outputs' relative error with every cut map's PCA at its rank, fitted in
    network order with the earlier ones in place (as the fit pass does), on `data`.
    `maps`: (name, C, k) in network order."""
    import torch

    from fmcompress.backend.projection import fit_pca, install_projections

    from .fit import torch_executor

    executor = torch_executor(model)
    names = list(executor.input_names)
    with torch.no_grad():
        reference = [executor(*inputs) for inputs in data.torch_batches(batch_size, names)]
    projections = fit_pca(executor, maps, lambda: data.torch_batches(batch_size, names))
    install_projections(executor, projections)
    try:
        return _relative_error(executor, data, batch_size, names, reference)
    finally:
        executor.clear_transforms()


# ---------------------------------------------------------------- folding prediction (rule f)

class _Graph:
    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):
                self.consumers.setdefault(name, []).append(node)
        self.constants = {init.name for init in graph.initializer}
        self.constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
        self.outputs = {out.name for out in graph.output}


def predict_folding(model: onnx.ModelProto, proxies: list[MapProxy], report: AnalysisReport,
                    uniform: dict[str, int], model_macs: int) -> None:
    """Rule f: explicit P and U convs each candidate's projection will need, and what they cost."""
    graph = _Graph(model)
    compressible = {m.name for m in report.stored if m.compressible}
    for proxy in proxies:
        proxy.explicit_p = not _p_folds(graph, proxy.name)
        proxy.explicit_u = _explicit_readers(graph, proxy.name, compressible, depth=0)
        positions = math.prod(proxy.shape) // proxy.channels  # N * H * W (or N * L)
        proxy.macs_per_rank = positions * proxy.channels * (int(proxy.explicit_p) + proxy.explicit_u)
        proxy.latency_penalty = proxy.macs_per_rank * uniform[proxy.name] / max(model_macs, 1)


def _group_one_conv(graph: _Graph, node: onnx.NodeProto) -> bool:
    group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
    return node.op_type in ("Conv", "ConvTranspose") and group == 1 and len(node.input) > 1 \
        and node.input[1] in graph.constants


def _p_folds(graph: _Graph, name: str) -> bool:
    producer = graph.producer.get(name)
    if producer is not None and producer.op_type == "BatchNormalization":  # folded into its conv first
        source = producer.input[0]
        if len(graph.consumers.get(source, [])) != 1:
            return False
        producer = graph.producer.get(source)
    return producer is not None and _group_one_conv(graph, producer)


def _explicit_readers(graph: _Graph, name: str, compressible: set[str], depth: int) -> int:
    explicit = int(name in graph.outputs)
    for reader in graph.consumers.get(name, []):
        explicit += _reader_needs_u(graph, reader, name, compressible, depth)
    return explicit


def _reader_needs_u(graph: _Graph, reader: onnx.NodeProto, name: str, compressible: set[str], depth: int) -> int:
    if _group_one_conv(graph, reader) and reader.input[0] == name and name not in reader.input[1:]:
        return 0  # rule b
    if reader.op_type in ("Shape", "Size"):
        return 0  # rule f
    if reader.op_type == "Add" and reader.output[0] in compressible:
        return 0  # rule g: the linear residual stream, when its sum is projected too
    if reader.op_type in FOLD_PUSH_OPS and reader.input[0] == name and depth < 4:
        # rules c, d: U moves on; what its readers need decides (at most one U per reader)
        return min(1, sum(_explicit_readers(graph, out, compressible, depth + 1) for out in reader.output if out))
    return 1  # rule h
