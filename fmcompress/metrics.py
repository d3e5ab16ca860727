"""Fidelity and cost figures of the compile report (numpy and onnxruntime only).

* `fidelity`: how closely a compressed model's outputs follow the original's.
* `count_flops`: arithmetic cost from the graph and its tensor shapes.
* `ort_latency`: onnxruntime latency of a model pair, interleaved rounds, median and spread.
* `run_ort`: run a model over a dataset's batches, outputs stacked.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError, onnxruntime_errors

ModelLike = onnx.ModelProto | bytes | str | Path
PROBABILITY_TOLERANCE = 1e-3  # how far from 1 a softmax row may sum (float32 over thousands of classes)


# ---------------------------------------------------------------------- fidelity


@dataclass(frozen=True)
class Fidelity:
    """Agreement of a candidate model's outputs with the reference model's."""

    top1_agreement: float | None  # share of samples whose argmax class matches
    sequence_agreement: float | None  # [N, T, classes] distributions: share of equal greedy CTC decodings
    accuracy_reference: float | None
    accuracy_candidate: float | None
    cosine_similarity: float  # mean per-sample cosine, averaged over outputs
    relative_error: float  # ||candidate - reference|| / ||reference|| over all outputs
    max_abs_error: float

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def fidelity(reference_outputs: list[np.ndarray], candidate_outputs: list[np.ndarray],
             labels: np.ndarray | None = None) -> Fidelity:
    """Compare outputs sample by sample (axis 0 is the sample axis of every output)."""
    _check_pairs(reference_outputs, candidate_outputs)
    reference = [np.asarray(out, dtype=np.float64) for out in reference_outputs]
    candidate = [np.asarray(out, dtype=np.float64) for out in candidate_outputs]
    top1 = acc_ref = acc_cand = None
    ref_classes = _class_scores(reference[0])
    if ref_classes is not None:
        ref_pred = ref_classes.argmax(axis=1)
        cand_pred = _class_scores(candidate[0]).argmax(axis=1)
        top1 = float(np.mean(ref_pred == cand_pred))
        if labels is not None:
            truth = _checked_labels(labels, ref_classes.shape)
            acc_ref, acc_cand = float(np.mean(ref_pred == truth)), float(np.mean(cand_pred == truth))
    sequence = sequence_agreement(reference[0], candidate[0]) if is_sequence_head(reference[0]) else None
    cosine = float(np.mean([_mean_cosine(r, c) for r, c in zip(reference, candidate, strict=True)]))
    diff_sq = sum(float(np.sum((c - r) ** 2)) for r, c in zip(reference, candidate, strict=True))
    ref_sq = sum(float(np.sum(r**2)) for r in reference)
    relative = _ratio(np.sqrt(diff_sq), np.sqrt(ref_sq))
    max_abs = max(float(np.max(np.abs(c - r), initial=0.0)) for r, c in zip(reference, candidate, strict=True))
    return Fidelity(top1, sequence, acc_ref, acc_cand, cosine, relative, max_abs)


def rows_are_distributions(output: np.ndarray) -> bool:
    """Every row along the last axis is >= 0 and sums to 1 (a softmax output)."""
    sums = output.sum(axis=-1, dtype=np.float64)
    return bool((output >= 0).all()) and bool((np.abs(sums - 1) < PROBABILITY_TOLERANCE).all())


def is_sequence_head(output: np.ndarray) -> bool:
    """[N, T, classes] with a distribution per step: a CTC or other sequence head."""
    return output.ndim == 3 and output.shape[2] >= 2 and rows_are_distributions(output)


def sequence_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of samples whose greedy CTC decodings are equal: each step's argmax, repeats
    collapsed, the blank dropped. The blank is the class the reference predicts most often
    (CTC heads predict it at most steps; PP-OCR's is 0, others use the last class). Per-step
    agreement hides wrong strings among the blanks, and equal argmax at every step is far
    stricter than the strings (a character one step earlier or later decodes the same)."""
    reference_paths, candidate_paths = reference.argmax(-1), candidate.argmax(-1)
    blank = int(np.bincount(reference_paths.ravel()).argmax())
    same = [np.array_equal(ctc_labels(r, blank), ctc_labels(c, blank))
            for r, c in zip(reference_paths, candidate_paths, strict=True)]
    return float(np.mean(same))


def ctc_labels(path: np.ndarray, blank: int) -> np.ndarray:
    """One sample's argmax path [T] -> its labels: repeats collapsed, then blanks dropped."""
    kept = path[np.concatenate(([True], path[1:] != path[:-1]))]
    return kept[kept != blank]


def gated_agreement(quality: Mapping[str, Any]) -> tuple[str, float | None]:
    """The agreement figure a report leads with (and `--min-agreement` gates): top-1
    agreement for class scores, else sequence agreement; (name, value or None)."""
    if quality.get("top1_agreement") is not None:
        return "top-1 agreement", quality["top1_agreement"]
    return "sequence agreement", quality.get("sequence_agreement")


def _check_pairs(reference: list[np.ndarray], candidate: list[np.ndarray]) -> None:
    if not reference or len(reference) != len(candidate):
        raise InputError(f"cannot compare {len(reference)} reference output(s) with {len(candidate)} candidate output(s)")
    for index, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        if np.shape(ref) != np.shape(cand):
            raise InputError(f"output {index}: reference shape {list(np.shape(ref))} differs from candidate {list(np.shape(cand))}")
        if np.ndim(ref) == 0:
            raise InputError(f"output {index} is a scalar; outputs need a sample axis")


def _class_scores(output: np.ndarray) -> np.ndarray | None:
    """[N, classes] scores from a [N, classes] or [N, classes, 1, 1] output, else None."""
    if output.ndim == 2 or (output.ndim == 4 and output.shape[2:] == (1, 1)):
        return output.reshape(output.shape[0], output.shape[1])
    return None


def _checked_labels(labels: np.ndarray, scores_shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    samples, classes = scores_shape
    if len(labels) != samples:
        raise InputError(f"{len(labels)} labels for {samples} samples")
    if labels.dtype.kind not in "iu":
        raise InputError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise InputError(f"labels range over [{labels.min()}, {labels.max()}] but the model outputs {classes} classes")
    return labels


def _mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over samples of the cosine between flattened samples (two zero samples agree)."""
    ref = reference.reshape(len(reference), -1)
    cand = candidate.reshape(len(candidate), -1)
    dots = np.sum(ref * cand, axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    both_zero = ~ref.any(axis=1) & ~cand.any(axis=1)
    cosines = np.where(both_zero, 1.0, dots / np.where(norms > 0, norms, 1.0))
    return float(np.mean(cosines))


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return float(numerator / denominator)
    return 0.0 if numerator == 0 else float("inf")


# ------------------------------------------------------------------------- FLOPs


def count_flops(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """FLOPs of one forward pass: 2 x multiply-accumulates of Conv, ConvTranspose, Gemm, MatMul.

    Elementwise work (bias adds, activations, BatchNormalization, pooling, Add,
    ...) is ignored, as is the convention for CNN FLOP counts; so are nodes inside
    subgraphs (If/Loop). `shapes` maps tensor names to static shapes; initializer
    shapes are read from the model when missing.
    """
    known = {init.name: tuple(init.dims) for init in model.graph.initializer}
    known.update({name: tuple(shape) for name, shape in shapes.items()})
    return 2 * sum(_node_macs(node, known) for node in model.graph.node)


def _shape(shapes: Mapping[str, tuple[int, ...]], name: str, node: onnx.NodeProto) -> tuple[int, ...]:
    return _static(shapes.get(name), name, node)


def _static(shape: tuple[int, ...] | None, name: str, node: onnx.NodeProto) -> tuple[int, ...]:
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise InputError(f"{node.op_type} node {node.name!r}: no static shape for tensor {name!r} ({shape})")
    return tuple(int(d) for d in shape)


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    handler = _MAC_RULES.get(node.op_type)
    return handler(node, shapes) if handler else 0


def _conv_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    # Weight [M, C/group, *k]: each output element costs C/group * prod(k) MACs.
    weight = _shape(shapes, node.input[1], node)
    output = _shape(shapes, node.output[0], node)
    return int(np.prod(output)) * int(np.prod(weight[1:]))


def _conv_transpose_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    # Weight [C, M/group, *k]: each input element is scattered to M/group * prod(k) outputs.
    data = _shape(shapes, node.input[0], node)
    weight = _shape(shapes, node.input[1], node)
    return int(np.prod(data)) * int(np.prod(weight[1:]))


def _gemm_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    a = _shape(shapes, node.input[0], node)
    trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
    inner = a[0] if trans_a else a[1]
    return int(np.prod(_shape(shapes, node.output[0], node))) * inner


def _matmul_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    a = _shape(shapes, node.input[0], node)
    output = shapes.get(node.output[0])
    if output is None:  # numpy matmul semantics; 1-D operands add an axis of size 1
        b = _shape(shapes, node.input[1], node)
        a2, b2 = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
        output = (*np.broadcast_shapes(a2[:-2], b2[:-2]), a2[-2], b2[-1])
    return int(np.prod(_static(output, node.output[0], node))) * a[-1]


_MAC_RULES = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
}


# ---------------------------------------------------------------------- sessions


def ort_session(model: ModelLike, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with all graph optimizations on."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(source, Path):
        source = str(source)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except onnxruntime_errors() as exc:
        raise InputError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from exc


def _session_feeds(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [meta.name for meta in session.get_inputs()]
    missing = [name for name in names if name not in feeds]
    if missing:
        raise InputError(f"no data for model input(s) {', '.join(missing)} (have: {', '.join(feeds) or 'none'})")
    return {name: feeds[name] for name in names}


@dataclass(frozen=True)
class LatencyFigures:
    """Side-by-side onnxruntime latency of a (reference, candidate) pair.

    Each round times `repeats` runs of both models back to back (the order alternates
    between rounds) and keeps each model's median; the figures are the medians over
    rounds, the ratio is the median of the per-round ratios, and the spreads are the
    smallest and largest per-round values, so noise shows instead of hiding in one number.
    """

    reference_ms: float
    candidate_ms: float
    ratio: float
    reference_spread_ms: tuple[float, float]
    candidate_spread_ms: tuple[float, float]
    ratio_spread: tuple[float, float]
    rounds: int
    repeats: int
    threads: int | None

    def to_dict(self, reference: str = "original", candidate: str = "compressed") -> dict[str, Any]:
        return {reference: self.reference_ms, candidate: self.candidate_ms, "ratio": self.ratio,
                "spread": {reference: list(self.reference_spread_ms), candidate: list(self.candidate_spread_ms),
                           "ratio": list(self.ratio_spread)},
                "rounds": self.rounds, "repeats": self.repeats, "threads": self.threads}


def ort_latency(reference: ModelLike, candidate: ModelLike, feeds: Mapping[str, np.ndarray], *,
                rounds: int = 5, repeats: int = 20, warmup: int = 3, threads: int | None = 1) -> LatencyFigures:
    """Latency of `candidate` against `reference` on `feeds`, interleaved rounds (see LatencyFigures)."""
    if rounds < 1 or repeats < 1 or warmup < 0:
        raise InputError(f"need rounds >= 1, repeats >= 1 and warmup >= 0, got {rounds}, {repeats} and {warmup}")
    runs = [_runner(ort_session(model, threads), feeds) for model in (reference, candidate)]
    for run in runs:
        for _ in range(warmup):
            run()
    medians: list[list[float]] = [[], []]
    for round_ in range(rounds):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for which in order:
            medians[which].append(float(np.median(_time_runs(runs[which], repeats))))
    ratios = [c / r for r, c in zip(*medians, strict=True)]
    return LatencyFigures(
        reference_ms=float(np.median(medians[0])), candidate_ms=float(np.median(medians[1])),
        ratio=float(np.median(ratios)), reference_spread_ms=_spread(medians[0]),
        candidate_spread_ms=_spread(medians[1]), ratio_spread=_spread(ratios), rounds=rounds, repeats=repeats,
        threads=threads)


def _time_runs(run, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _spread(values: list[float]) -> tuple[float, float]:
    return float(min(values)), float(max(values))


def _runner(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]):
    session_feeds = _session_feeds(session, feeds)
    return lambda: session.run(None, session_feeds)


# ------------------------------------------------------------------ batched runs


def run_ort(model: ModelLike | ort.InferenceSession, dataset_batches: Iterable[Any],
            threads: int | None = None, *, batch_first: bool = False) -> list[np.ndarray]:
    """Run `model` over batches (dicts of inputs, or (dict, labels) pairs); outputs stacked.

    Each output is concatenated along its own batch axis (`output_batch_axes`: axis 1
    of a time-major [T, N, classes] output), in the model's layout, or with that axis
    moved first when `batch_first`. A model whose batch dimension is fixed (e.g. at 1)
    is run in chunks of that size; a short last chunk is padded by repeating its last
    sample and the padding's outputs are dropped.
    """
    session = model if isinstance(model, ort.InferenceSession) else ort_session(model, threads)
    fixed = _fixed_batch(session)
    collected: list[list[np.ndarray]] = []
    axes: list[int] | None = None
    for batch in dataset_batches:
        feeds = _session_feeds(session, batch[0] if isinstance(batch, tuple) else batch)
        axes = axes if axes is not None else output_batch_axes(session, feeds)
        for chunk, real in _chunks(feeds, fixed):
            outputs = session.run(None, chunk)
            if real < len(next(iter(chunk.values()))):  # drop the padding's outputs
                outputs = [_take(out, axis, real) for out, axis in zip(outputs, axes, strict=True)]
            collected.append(list(outputs))
    if not collected or axes is None:
        raise InputError("no data to run the model on")
    stacked = [np.concatenate(parts, axis=axis) for parts, axis in zip(zip(*collected, strict=True), axes,
                                                                         strict=True)]
    return batch_first_outputs(stacked, axes) if batch_first else stacked


def batch_first_outputs(outputs: list[np.ndarray], axes: list[int]) -> list[np.ndarray]:
    """Each output with its batch axis (`axes`, one per output) moved to axis 0."""
    return [np.moveaxis(out, axis, 0) if axis else out for out, axis in zip(outputs, axes, strict=True)]


def _take(output: np.ndarray, axis: int, count: int) -> np.ndarray:
    """The first `count` samples of `output` along its batch axis."""
    if np.ndim(output) == 0:
        return output
    index = [slice(None)] * output.ndim
    index[axis] = slice(0, count)
    return output[tuple(index)]


def output_batch_axes(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[int]:
    """The batch axis of each output of `session` (0 when it has none), decided in order:

    a. a batch the inputs fix at B: the first axis the output declares as B;
    b. a free batch: the one output axis declared with the inputs' batch symbol;
    c. otherwise the first axis whose size is 1 on one sample of `feeds` and 2 on two (the
       first sample repeated when there is one);
    d. otherwise 0: an output that does not grow that way (constant, or samples flattened
       together as in [N * T, C]), a model that runs only at batch 1 and declares nothing.
    """
    batch = _input_batch_dim(session)
    declared = [_declared_axis(meta.shape, batch) for meta in session.get_outputs()]
    if all(axis is not None for axis in declared) or isinstance(batch, int):
        return [0 if axis is None else axis for axis in declared]
    probed = _probed_axes(session, feeds)
    return [axis if axis is not None else probed[index] for index, axis in enumerate(declared)]


def _input_batch_dim(session: ort.InferenceSession) -> int | str | None:
    """The inputs' batch dim: the fixed size (`_fixed_batch`), else the first input's symbol."""
    fixed = _fixed_batch(session)
    if fixed is not None:
        return fixed
    first = [meta.shape[0] for meta in session.get_inputs() if meta.shape]
    return first[0] if first and isinstance(first[0], str) and first[0] else None


def _declared_axis(dims: list[Any] | None, batch: int | str | None) -> int | None:
    """The first declared output axis equal to the batch dim (a size or a symbol), if any."""
    if batch is None or not dims:
        return None
    return next((axis for axis, dim in enumerate(dims) if dim == batch), None)


def _probed_axes(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[int]:
    """Rules c and d: compare output shapes at 1 and 2 samples."""
    count = len(next(iter(feeds.values())))
    pair = {name: (array[:2] if count >= 2 else np.concatenate([array[:1]] * 2)) for name, array in feeds.items()}
    try:
        single = session.run(None, {name: array[:1] for name, array in pair.items()})
        double = session.run(None, pair)
    except onnxruntime_errors():  # runs only at batch 1: nothing to compare
        return [0] * len(session.get_outputs())
    return [next((axis for axis, (a, b) in enumerate(zip(np.shape(one), np.shape(two), strict=False))
                  if (a, b) == (1, 2)), 0) for one, two in zip(single, double, strict=True)]


def _fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size the model's inputs pin (a positive int first dim), if any."""
    sizes = {meta.shape[0] for meta in session.get_inputs() if meta.shape and isinstance(meta.shape[0], int)}
    sizes.discard(0)
    return min(sizes) if sizes else None


def _chunks(feeds: dict[str, np.ndarray], size: int | None):
    """(feeds, real sample count) chunks of exactly `size` samples (all at once when None)."""
    total = len(next(iter(feeds.values())))
    if size is None or size == total:
        yield feeds, total
        return
    for start in range(0, total, size):
        real = min(size, total - start)
        chunk = {}
        for name, array in feeds.items():
            part = array[start:start + real]
            if real < size:
                part = np.concatenate([part, np.repeat(part[-1:], size - real, axis=0)])
            chunk[name] = part
        yield chunk, real


def batch_is_free(model: ModelLike, specs: Iterable[Any]) -> bool:
    """Whether the model really runs at batch 2 (one onnxruntime trial on zeros).

    Graphs that fix the batch at 1 (a Reshape to [1, -1], a batch-1 anchor constant)
    either fail at batch 2 or return batch-1 outputs; `specs` are the inputs'
    InputSpecs (name, shape with the batch first, dtype).
    """
    session = ort_session(model, threads=1)
    specs = list(specs)
    if _fixed_batch(session) is not None:
        return False

    def outputs_at(batch: int) -> list[np.ndarray] | None:
        feeds = {spec.name: np.zeros((batch, *spec.shape[1:]), spec.dtype) for spec in specs}
        try:
            return session.run(None, feeds)
        except onnxruntime_errors():  # any failure means "not at this batch"
            return None

    single, double = outputs_at(1), outputs_at(2)
    if single is None:
        raise InputError("onnxruntime cannot run the model on zeros of its input shapes at batch 1")
    if double is None:
        return False
    return all(np.ndim(b) >= 1 and len(b) == 2 for a, b in zip(single, double, strict=True)
               if np.ndim(a) >= 1 and len(a) == 1)
