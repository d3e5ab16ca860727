"""MeasurePass: what compression cost, measured on held-out data, and the fidelity gate.

Rules:

a. Fidelity: the original and the compressed model run in onnxruntime on the
   held-out samples (never used for fitting); top-1 agreement and accuracy (when
   labels exist) for classifier-shaped outputs; sequence agreement (equal
   greedy CTC decodings, `fmcompress.metrics.sequence_agreement`) for `[N, T,
   classes]` distributions such as CTC heads, leaving out the classes the model's own
   dictionary spells as a space (`fmcompress.metrics.space_classes`: PaddleOCR's
   recognizers read a crop's margins as spaces, and PaddleOCR's score ignores them; counted,
   they were half the held-out disagreement of PP-OCR's recognizer at 8x); cosine similarity and relative
   error overall and per output, per channel and channel group (box, scores) of a
   detection head's quantity axis (`fmcompress.metrics.fidelity`); for a YOLO-style
   detection output [N, 4 + classes, anchors], boxes after the model's own decoding
   matched at IoU 0.5 (`boxes`: counts, precision, recall, F1).
b. FLOPs before and after, from the graphs and their tensor shapes.
c. Latency: both models in onnxruntime with `threads` intra-op threads on one
   held-out sample, interleaved rounds, median and spread of each and of the ratio
   (`fmcompress.metrics.ort_latency`).
d. The gate: with `min_agreement`, top-1 agreement (sequence agreement for a
   sequence head) below it fails; with
   `max_accuracy_drop` (points), an accuracy drop above it fails, and the gate needs
   labels. The drop's standard error (`fmcompress.metrics.paired_drop`) is reported beside
   it, so that a user sees how many points the held-out part can tell apart: on 128 samples
   with 8 scored differently, about 2. A failure raises `VerificationError` (exit 1), so
   compile writes nothing. Without a gate, agreement under 90% is a warning.

e. With `--int8` (`ctx.quantized_original`, passes/quantize.py rule g): the original
   quantized alone, against the float original (its fidelity: what quantization alone
   costs), and the int8 model's latency against it (`int8_original`).

Shapes come from `ctx.before` (the original's analysis) and `ctx.verification["after"]`
(the emitted model's) when present; an int8 model (`ctx.quantization`, passes/quantize.py)
is analysed itself. The model is not changed; `ctx.measurement` (and
`result.data`) is `{"fidelity", "flops", "latency_ms", "gate", "warnings", "int8_original"}`.
"""

from __future__ import annotations

from typing import Any

import onnx

from fmcompress.data import Dataset
from fmcompress.errors import InputError, VerificationError
from fmcompress.metrics import (
    count_flops,
    fidelity,
    gated_agreement,
    ort_latency,
    output_figures,
    space_classes,
)
from fmcompress.ortrun import run_ort
from fmcompress.reports.analysis import AnalysisReport

from .base import PassContext, PassResult
from .graph import Model
from .memory import analyze_stored
from .prepare_data import HeldOutPass

LOW_AGREEMENT = 0.9


class MeasurePass(HeldOutPass):
    """Fidelity, FLOPs and latency of the model against `original`; enforces the fidelity gate."""

    name = "measure"
    provides = ("measurement",)

    def __init__(self, original: onnx.ModelProto | None = None, held_out: Dataset | None = None, *,
                 batch_size: int | None = None, threads: int = 1,
                 rounds: int = 5, repeats: int | None = None, min_agreement: float | None = None,
                 max_accuracy_drop: float | None = None):
        if min_agreement is not None and not 0 <= min_agreement <= 1:
            raise InputError(f"--min-agreement must be between 0 and 1, got {min_agreement}")
        if max_accuracy_drop is not None and not max_accuracy_drop >= 0:
            raise InputError(f"--max-accuracy-drop must be at least 0 points, got {max_accuracy_drop}")
        if max_accuracy_drop is not None and held_out is not None and held_out.labels is None:
            raise InputError("--max-accuracy-drop needs labelled data (an .npz with `labels` or class subfolders)")
        if threads < 1:
            raise InputError(f"--threads must be at least 1, got {threads}")
        self.original = original
        self.held_out = held_out
        self.batch_size = batch_size
        self.threads = threads
        self.rounds = rounds
        self.repeats = repeats
        self.min_agreement = min_agreement
        self.max_accuracy_drop = max_accuracy_drop

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        self._take_context(ctx)
        ctx.measurement = self._measure(model.proto(), ctx)
        ctx.warnings += ctx.measurement["warnings"]
        return PassResult(model, modified=False, data=ctx.measurement)

    def _take_context(self, ctx: PassContext) -> None:
        self._take_held_out(ctx)
        if self.max_accuracy_drop is not None and self.held_out.labels is None:
            raise InputError("--max-accuracy-drop needs labelled data (an .npz with `labels` or class subfolders)")

    def _measure(self, model: onnx.ModelProto, ctx: PassContext) -> dict[str, Any]:
        reference = run_ort(self.original, self.held_out.batches(self.batch_size), batch_first=True)
        candidate = run_ort(model, self.held_out.batches(self.batch_size), batch_first=True)
        ignore = space_classes(self.original)
        quality = fidelity(reference, candidate, self.held_out.labels, ignore).to_dict()
        quality["outputs"] = output_figures(reference, candidate, [out.name for out in self.original.graph.output])
        quality["boxes"] = _box_figures(reference, candidate)
        before = _analysis(self.original, ctx.before, ctx)
        verified = ctx.verification or {}  # the analysis of the model verified; not of its int8 version
        after = _analysis(model, verified.get("after") if ctx.quantization is None else None, ctx)
        flops = {"before": count_flops(self.original, before.tensor_shapes),
                 "after": count_flops(model, after.tensor_shapes)}
        flops["ratio"] = flops["after"] / flops["before"] if flops["before"] else None
        one = {name: array[:1] for name, array in self.held_out.inputs.items()}
        latency = ort_latency(self.original, model, one, rounds=self.rounds, repeats=self.repeats,
                              threads=self.threads).to_dict()
        gate, warnings = self._gate(quality)
        ctx.log(f"fidelity: {fidelity_line(quality)}; latency ratio {latency['ratio']:.2f} "
                f"({latency['spread']['ratio'][0]:.2f}-{latency['spread']['ratio'][1]:.2f})")
        baseline = self._against_quantized_original(model, reference, one, ignore, ctx)
        return {"fidelity": quality, "flops": flops, "latency_ms": latency, "gate": gate, "warnings": warnings,
                "int8_original": baseline}

    def _against_quantized_original(self, model: onnx.ModelProto, reference: list, one: dict,
                                    ignore: tuple[int, ...], ctx: PassContext) -> dict[str, Any] | None:
        """Rule e: the original quantized alone, against the float original, and the int8 model's
        latency against it."""
        if ctx.quantized_original is None:
            return None
        baseline = run_ort(ctx.quantized_original, self.held_out.batches(self.batch_size), batch_first=True)
        quality = fidelity(reference, baseline, self.held_out.labels, ignore).to_dict()
        latency = ort_latency(ctx.quantized_original, model, one, rounds=self.rounds, repeats=self.repeats,
                              threads=self.threads).to_dict("original_int8", "compressed")
        ctx.log(f"int8: the original quantized alone: {fidelity_line(quality)}; "
                f"latency ratio against it {latency['ratio']:.2f}")
        return {"fidelity": quality, "latency_ms": latency}

    def _gate(self, quality: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Rule d: raises VerificationError when the held-out fidelity misses the gate."""
        what, agreement = gated_agreement(quality)
        drop, error = _accuracy_drop_points(quality), quality.get("accuracy_drop_error")
        gate = {"min_agreement": self.min_agreement, "max_accuracy_drop": self.max_accuracy_drop,
                "accuracy_drop_points": drop, "accuracy_drop_se_points": None if error is None else 100.0 * error,
                "passed": True}
        failures = []
        if self.min_agreement is not None:
            if agreement is None:
                failures.append("no agreement to gate on (the first output is neither class scores nor a "
                                "sequence of class distributions)")
            elif agreement < self.min_agreement:
                failures.append(f"{what} {agreement:.2%} < {self.min_agreement:.2%}")
        if self.max_accuracy_drop is not None and drop is not None and drop > self.max_accuracy_drop:
            failures.append(f"accuracy drop {drop:.2f}{_plus_minus(error)} points > {self.max_accuracy_drop:g}")
        if failures:
            raise VerificationError(f"fidelity gate missed on {len(self.held_out)} held-out samples: "
                                    + "; ".join(failures) + "; nothing was written")
        warnings = []
        if self.min_agreement is None and self.max_accuracy_drop is None and agreement is not None \
                and agreement < LOW_AGREEMENT:
            warnings.append(f"{what} with the original is only {agreement:.1%} on held-out data "
                            "(below 90%); gate it with --min-agreement in CI")
        return gate, warnings


def _box_figures(reference: list, candidate: list) -> dict[str, Any] | None:
    """Rule a for detectors: a YOLO-style first output [N, 4 + classes, anchors] (anchors
    outnumbering rows) is decoded as the model's own post-processing does, and boxes are
    matched at IoU 0.5 between original and compressed (fmcompress.detection)."""
    head = reference[0]
    if head.ndim != 3 or not 5 <= head.shape[1] < head.shape[2]:
        return None
    from fmcompress.detection import box_agreement

    return box_agreement(reference, candidate, layout="channels_first")


def _analysis(model: onnx.ModelProto, known: AnalysisReport | None, ctx: PassContext) -> AnalysisReport:
    return known if isinstance(known, AnalysisReport) else analyze_stored(model, ctx)


def _accuracy_drop_points(quality: dict[str, Any]) -> float | None:
    before, after = quality.get("accuracy_reference"), quality.get("accuracy_candidate")
    return None if before is None or after is None else 100.0 * (before - after)


def _plus_minus(error: float | None, digits: int = 2) -> str:
    """` ± 1.10` for a standard error of 0.011 (a fraction), else nothing."""
    return "" if error is None else f" ± {100.0 * error:.{digits}f}"


def fidelity_line(quality: dict[str, Any]) -> str:
    parts = []
    what, agreement = gated_agreement(quality)
    if agreement is not None:
        parts.append(f"{what} {agreement:.1%}{' (spaces left out)' if quality.get('ignored_classes') else ''}")
    if quality.get("accuracy_candidate") is not None:
        reference, candidate = quality["accuracy_reference"], quality["accuracy_candidate"]
        error = quality.get("accuracy_drop_error")
        lost = "" if error is None else f" ({100 * (reference - candidate):.1f}{_plus_minus(error, 1)} points lost)"
        parts.append(f"accuracy {reference:.1%} -> {candidate:.1%}{lost}")
    parts.append(f"cosine {quality['cosine_similarity']:.4f}")
    parts.append(f"relative error {quality['relative_error']:.3g}")
    return ", ".join(parts)
