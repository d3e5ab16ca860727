"""Fidelity and cost figures of the compile report (numpy and onnxruntime only).

* `fidelity`: how closely a compressed model's outputs follow the original's, overall and
  per output (`output_figures`), per channel and group of a detection head's quantity axis.
* `count_flops`: arithmetic cost from the graph and its tensor shapes.
* `ort_latency`: onnxruntime latency of a model pair, interleaved rounds, median and spread.
* `paired_drop`: how much a per-sample score falls from one model to another on the same
  samples, with the standard error that says how far a figure from that many samples can be
  trusted.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError
from .ortrun import ModelLike, ort_session, session_feeds

PROBABILITY_TOLERANCE = 1e-3  # how far from 1 a softmax row may sum (float32 over thousands of classes)
BOX_CHANNELS = 4  # a detection head's first quantities: box coordinates; the rest are scores
MAX_HEAD_CHANNELS = 260  # 4 box coordinates + up to 256 scores
ANCHORS_PER_CHANNEL = 4  # a detection head has at least this many anchors per quantity
DICTIONARY_KEY = "character"  # PaddleOCR's recognizers name their CTC classes in this metadata entry
SPACE = " "


# ---------------------------------------------------------------------- fidelity


@dataclass(frozen=True)
class Fidelity:
    """Agreement of a candidate model's outputs with the reference model's."""

    top1_agreement: float | None  # share of samples whose argmax class matches
    sequence_agreement: float | None  # [N, T, classes] distributions: share of equal greedy CTC decodings
    accuracy_reference: float | None
    accuracy_candidate: float | None
    accuracy_drop_error: float | None  # the standard error of reference minus candidate accuracy (`paired_drop`)
    cosine_similarity: float  # mean per-sample cosine, averaged over outputs
    relative_error: float  # ||candidate - reference|| / ||reference|| over all outputs
    max_abs_error: float
    ignored_classes: tuple[int, ...] = ()  # classes sequence agreement leaves out (`space_classes`)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def fidelity(reference_outputs: list[np.ndarray], candidate_outputs: list[np.ndarray],
             labels: np.ndarray | None = None, ignore: Sequence[int] = ()) -> Fidelity:
    """Compare outputs sample by sample (axis 0 is the sample axis of every output); the
    figures per output are `output_figures`; `ignore`: as `sequence_agreement`'s."""
    agreement = agreement_figures(reference_outputs, candidate_outputs, labels, ignore)
    reference = [np.asarray(out, dtype=np.float64) for out in reference_outputs]
    candidate = [np.asarray(out, dtype=np.float64) for out in candidate_outputs]
    cosine = mean_cosine(reference, candidate)
    diff_sq = sum(float(np.sum((c - r) ** 2)) for r, c in zip(reference, candidate, strict=True))
    ref_sq = sum(float(np.sum(r**2)) for r in reference)
    relative = _ratio(np.sqrt(diff_sq), np.sqrt(ref_sq))
    max_abs = max(float(np.max(np.abs(c - r), initial=0.0)) for r, c in zip(reference, candidate, strict=True))
    return Fidelity(agreement["top1_agreement"], agreement["sequence_agreement"], agreement["accuracy_reference"],
                    agreement["accuracy_candidate"], agreement["accuracy_drop_error"], cosine, relative, max_abs,
                    tuple(int(c) for c in ignore) if agreement["sequence_agreement"] is not None else ())


def agreement_figures(reference: list[np.ndarray], candidate: list[np.ndarray],
                      labels: np.ndarray | None = None, ignore: Sequence[int] = ()) -> dict[str, float | None]:
    """`fidelity`'s figures that compare predictions (first output): `top1_agreement`,
    `sequence_agreement` (leaving out the classes in `ignore`), `accuracy_reference`,
    `accuracy_candidate` and `accuracy_drop_error` (None where they do not apply). Argmaxes only: the outputs stay in their own precision
    (float64 copies of a recognizer's [64, 40, 6625] outputs cost more than the figures)."""
    _check_pairs(reference, candidate)
    figures: dict[str, float | None] = dict.fromkeys(
        ("top1_agreement", "sequence_agreement", "accuracy_reference", "accuracy_candidate", "accuracy_drop_error"))
    first_ref, first_cand = np.asarray(reference[0]), np.asarray(candidate[0])
    ref_classes = _class_scores(first_ref)
    if ref_classes is not None:
        ref_pred = ref_classes.argmax(axis=1)
        cand_pred = _class_scores(first_cand).argmax(axis=1)
        figures["top1_agreement"] = float(np.mean(ref_pred == cand_pred))
        if labels is not None:
            truth = _checked_labels(labels, ref_classes.shape)
            ref_hits, cand_hits = ref_pred == truth, cand_pred == truth
            figures["accuracy_reference"], figures["accuracy_candidate"] = float(ref_hits.mean()), float(cand_hits.mean())
            figures["accuracy_drop_error"] = paired_drop(ref_hits, cand_hits)[1]
    if is_sequence_head(first_ref):
        figures["sequence_agreement"] = sequence_agreement(first_ref, first_cand, ignore)
    return figures


def mean_cosine(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """`fidelity`'s cosine similarity: the mean per-sample cosine, averaged over outputs."""
    return float(np.mean([_mean_cosine(np.asarray(r, dtype=np.float64), np.asarray(c, dtype=np.float64))
                          for r, c in zip(reference, candidate, strict=True)]))


def output_figures(reference: list[np.ndarray], candidate: list[np.ndarray],
                   names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per output (named by `names`, else `output{i}`; axis 0 the samples): `name`, `shape`
    (as measured), `cosine_similarity` (mean per-sample cosine), `relative_error`,
    `max_abs_error`, and `channels`: the `channel_figures` of a detection head
    (`head_axis`), else None. The overall `fidelity` figures are not changed by these."""
    _check_pairs(reference, candidate)
    figures = []
    for index, (ref_out, cand_out) in enumerate(zip(reference, candidate, strict=True)):
        ref, cand = np.asarray(ref_out, dtype=np.float64), np.asarray(cand_out, dtype=np.float64)
        name = names[index] if names is not None and index < len(names) else f"output{index}"
        axis = head_axis(ref)
        figures.append({"name": name, "shape": [int(d) for d in ref.shape], **_error_figures(ref, cand),
                        "channels": None if axis is None else channel_figures(ref, cand, axis)})
    return figures


def head_axis(output: np.ndarray) -> int | None:
    """The quantity axis of a detection head [N, K, anchors] (1) or [N, anchors, K] (2): the
    shorter trailing axis, with 4 < K <= 260 and at least 4 anchors per quantity; None for
    anything else, sequence heads (a distribution per step) included."""
    if output.ndim != 3 or is_sequence_head(output):
        return None
    axis = 1 if output.shape[1] <= output.shape[2] else 2
    quantities, anchors = output.shape[axis], output.shape[3 - axis]
    ok = BOX_CHANNELS < quantities <= MAX_HEAD_CHANNELS and anchors >= ANCHORS_PER_CHANNEL * quantities
    return axis if ok else None


def channel_figures(reference: np.ndarray, candidate: np.ndarray, axis: int) -> dict[str, Any]:
    """Figures per channel of the quantity `axis` and per group (`box`: the first 4,
    `scores`: the rest): `cosine_similarity` (mean per-sample cosine over the anchors and the
    group's channels), `relative_error`, `max_abs_error`, `correlation` (Pearson over every
    sample and anchor, None where either side is constant)."""
    ref, cand = np.moveaxis(reference, axis, 1), np.moveaxis(candidate, axis, 1)  # [N, K, anchors]
    channels = [{"index": k, "group": "box" if k < BOX_CHANNELS else "scores",
                 **_error_figures(ref[:, k], cand[:, k]), "correlation": correlation(ref[:, k], cand[:, k])}
                for k in range(ref.shape[1])]
    groups = [{"name": name, "channels": [start, stop], **_error_figures(ref[:, start:stop], cand[:, start:stop]),
               "correlation": correlation(ref[:, start:stop], cand[:, start:stop])}
              for name, start, stop in (("box", 0, BOX_CHANNELS), ("scores", BOX_CHANNELS, ref.shape[1]))]
    return {"axis": axis, "layout": "channels_first" if axis == 1 else "channels_last",
            "groups": groups, "channels": channels}


def correlation(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Pearson correlation of all elements; None when either side is constant."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cand = np.asarray(candidate, dtype=np.float64).ravel()
    ref, cand = ref - ref.mean(), cand - cand.mean()
    norms = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    return float(np.dot(ref, cand) / norms) if norms > 0 else None


def _error_figures(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    diff = candidate - reference
    return {"cosine_similarity": _mean_cosine(reference, candidate),
            "relative_error": _ratio(float(np.linalg.norm(diff)), float(np.linalg.norm(reference))),
            "max_abs_error": float(np.max(np.abs(diff), initial=0.0))}


def rows_are_distributions(output: np.ndarray) -> bool:
    """Every row along the last axis is >= 0 and sums to 1 (a softmax output)."""
    sums = output.sum(axis=-1, dtype=np.float64)
    return bool((output >= 0).all()) and bool((np.abs(sums - 1) < PROBABILITY_TOLERANCE).all())


def is_sequence_head(output: np.ndarray) -> bool:
    """[N, T, classes] with a distribution per step: a CTC or other sequence head."""
    return output.ndim == 3 and output.shape[2] >= 2 and rows_are_distributions(output)


def sequence_agreement(reference: np.ndarray, candidate: np.ndarray, ignore: Sequence[int] = ()) -> float:
    """Share of samples whose greedy CTC decodings are equal: each step's argmax, repeats
    collapsed, the blank and the classes in `ignore` dropped. The blank is the class the
    reference predicts most often (CTC heads predict it at most steps; PP-OCR's is 0, others
    use the last class). Per-step agreement hides wrong strings among the blanks, and equal
    argmax at every step is far stricter than the strings (a character one step earlier or
    later decodes the same). `ignore` is for classes a user's score leaves out: a
    recognizer's space (`space_classes`), which PP-OCR reads at a crop's margins."""
    reference_paths, candidate_paths = reference.argmax(-1), candidate.argmax(-1)
    blank = int(np.bincount(reference_paths.ravel()).argmax())
    same = [np.array_equal(ctc_labels(r, blank, ignore), ctc_labels(c, blank, ignore))
            for r, c in zip(reference_paths, candidate_paths, strict=True)]
    return float(np.mean(same))


def ctc_labels(path: np.ndarray, blank: int, ignore: Sequence[int] = ()) -> np.ndarray:
    """One sample's argmax path [T] -> its labels: repeats collapsed, then the blank (and
    any class in `ignore`) dropped: "a", space, "a" stays two labels, as the text does."""
    kept = path[np.concatenate(([True], path[1:] != path[:-1]))]
    return kept[~np.isin(kept, [blank, *ignore])]


def ctc_dictionary(model: onnx.ModelProto) -> list[str] | None:
    """A CTC recognizer's classes where its metadata names them as PaddleOCR's models do (a
    `character` entry, one class a line): the blank, those entries, then a space; else None."""
    entries = {prop.key: prop.value for prop in model.metadata_props}.get(DICTIONARY_KEY)
    return None if entries is None else ["blank", *entries.splitlines(), SPACE]


def space_classes(model: onnx.ModelProto | None) -> tuple[int, ...]:
    """The classes of a recognizer's dictionary (`ctc_dictionary`) that are a space: what
    PaddleOCR's own score ignores (its RecMetric compares texts with spaces removed). () where
    there is no model, it names no dictionary, or one whose size is not its first output's
    class count."""
    if model is None:
        return ()
    dictionary = ctc_dictionary(model)
    if dictionary is None or not model.graph.output:
        return ()
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value != len(dictionary):
        return ()
    return tuple(index for index, entry in enumerate(dictionary) if entry == SPACE)


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


def paired_drop(reference_hits: Sequence[bool] | np.ndarray, candidate_hits: Sequence[bool] | np.ndarray
                ) -> tuple[float, float | None]:
    """The mean of reference minus candidate over the same samples (a drop in accuracy when
    the hits are per-sample correctness), and its standard error: the per-sample differences'
    standard deviation over the square root of their count (None under two samples). Paired,
    so only the samples the two models score differently carry uncertainty: on 300 lines
    with 15 of them flipped either way the drop is known to about 1.3 points."""
    reference, candidate = np.asarray(reference_hits, dtype=float), np.asarray(candidate_hits, dtype=float)
    if reference.shape != candidate.shape or reference.ndim != 1 or not len(reference):
        raise InputError(f"paired scores need two equal non-empty 1-D sets, got shapes {list(reference.shape)} "
                         f"and {list(candidate.shape)}")
    differences = reference - candidate
    error = float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else None
    return float(differences.mean()), error


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


ROUND_BUDGET_MS = 100.0  # automatic repeats: about this long per model and round (as timeit's autorange)
MAX_REPEATS, MIN_REPEATS = 20, 3


def ort_latency(reference: ModelLike, candidate: ModelLike, feeds: Mapping[str, np.ndarray], *,
                rounds: int = 5, repeats: int | None = None, warmup: int = 3,
                threads: int | None = 1) -> LatencyFigures:
    """Latency of `candidate` against `reference` on `feeds`, interleaved rounds (see LatencyFigures).

    `repeats` None: as many runs a round as take about ROUND_BUDGET_MS for the slower model,
    from MIN_REPEATS to MAX_REPEATS (a 25 ms model: 4 runs, a 1 ms one: 20), so measuring a
    large model costs a second or two, not 200 of its runs."""
    if rounds < 1 or (repeats is not None and repeats < 1) or warmup < 0:
        raise InputError(f"need rounds >= 1, repeats >= 1 and warmup >= 0, got {rounds}, {repeats} and {warmup}")
    runs = [_runner(ort_session(model, threads), feeds) for model in (reference, candidate)]
    # automatic repeats time the last warm-up run (one at least)
    warm = [_time_runs(run, max(warmup, int(repeats is None))) for run in runs]
    if repeats is None:
        slowest = max(times[-1] for times in warm)
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(ROUND_BUDGET_MS / max(slowest, 1e-3))))
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
    named = session_feeds(session, feeds)
    return lambda: session.run(None, named)
