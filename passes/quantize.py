"""QuantizePass: the verified float model in int8, by onnxruntime's own static quantization.

The quantization itself is fmcompress/int8.py's (its rules a to d); rank alignment before the
fit is passes/align_ranks.py's, the early refusal passes/quantizable.py's. Rules:

a. The model is quantized by rule a of fmcompress/int8.py (`quant_pre_process`, then
   `quantize_static`: QDQ, int8 weights per output channel, uint8 activations), its ranges
   calibrated on `ctx.calibration` (never on held-out samples) by the `--calibrate` calibrator
   (rule b of fmcompress/int8.py), float32 models only (its rule c).
a'. `auto` (the default): the model is quantized with MinMax and with Percentile, each is
   scored against the float model on `ctx.held_out` (rule d), and the better one is kept
   (`calibration_score`: accuracy with labels, else the gates' agreement, then cosine;
   MinMax on a tie). Neither wins everywhere: Percentile takes PP-OCR's recognizer from
   60.0% to 81.3% and costs its classifier 1.3 points (docs/int8.md). The report gives each
   trial's fidelity in `calibration_trials`.
b. With `--int8` every stored map is planned at one byte (`planned_act_bytes`), so an
   `--act-bytes` other than 1 contradicts it (InputError, before any work).
c. What still runs in float: onnxruntime optimises the int8 model at `level` and saves
   the graph it runs; one run on zeros sizes every tensor. A node is listed when it
   produces a float feature map (rank 3 or more) that is not a graph output: a
   DequantizeLinear that no integer kernel absorbed, or an op with no integer kernel
   (Exp, Tanh, Div, a ReduceSum of bands...); empty tensors (the zero that orders the
   bands, passes/tile_emit.py rule g) compute nothing and are not listed, nor are a band's
   float rows of a graph input (its Gather, fmcompress/int8.py rule a'), which the band
   quantizes at once. Each entry:
   node, op, tensor, shape, bytes;
   `float_bytes` is their sum. The graph's own float outputs (logits, a detection head)
   are the caller's and are not listed.
d. Fidelity of the int8 model against the float model it came from, on `ctx.held_out`:
   onnxruntime on both, `fmcompress.metrics.fidelity` (top-1 agreement, cosine,
   relative error, accuracy with labels), as passes/measure.py computes it. The
   fidelity gates apply to the int8 model because compile runs MeasurePass after this
   pass (the int8 model against the original); VerifyPass, before it, checks the float
   rewrites exactly.
e. The pass returns the int8 model (graph inputs, outputs and metadata of the float
   one, rule d of fmcompress/int8.py) and sets `ctx.quantization` (and `result.data`):
   {"format", "level", "calibration", "calibration_trials", "float_nodes", "float_bytes",
   "integer_ops", "fidelity", "calibration_samples", "runtime_peak_bytes",
   "largest_allocation_bytes", "over_ceiling"} (the last three with rule f's check).
f. Ceiling (`ceiling_level` set: compile --int8 --runtime ort): the int8 graph's runtime view
   at that level, every tensor at its own dtype's size (uint8 maps at one byte, float ones
   at four, passes/runtime.py rule e' workspaces at theirs), against the plan's ceiling (passes/tile_bands.py
   plans the bands for it; passes/split_conv.py rules a' and b'' split the filters of a conv
   whose int32 output no band count brings under it, in parts MLAS's symmetric kernel
   takes). A map above it (graph inputs and outputs excepted) is a VerificationError (exit
   1, nothing written), except the uint8 copy of a graph input (its QuantizeLinear:
   onnxruntime's int8 model takes the float input and quantizes it whole). That copy and a
   workspace above the ceiling are named in `over_ceiling` and in a warning, not refused:
   where a map has fewer than 16 output positions, the float model VerifyPass checks needs
   parts of at most that many filters (split_conv rule a), too few for the symmetric kernel,
   so each part's im2col reads the whole input (VGG-16-BN at 32x32, 8KB: 18 KiB each).
g. The baseline: the pipeline's input (`ctx.original`) quantized by rule a on the same
   calibration part goes into `ctx.quantized_original`, so that MeasurePass gives the
   int8 model's accuracy and latency against what quantize_static alone makes of the
   original. Where that fails, a warning says so and the figures are left out.

Entry point: `QuantizePass(level=...).run(model, ctx)`; `quantize_report(ctx)` is the
report's "int8" section.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx

from fmcompress.errors import InputError, VerificationError
from fmcompress.int8 import (
    DEFAULT_CALIBRATION,
    Batch,
    calibration_method,
    check_float32,
    input_gathers,
    quantize_int8,
)
from fmcompress.metrics import fidelity, gated_agreement, space_classes
from fmcompress.ortrun import run_ort
from fmcompress.shapes import onnxruntime_tensor_infos, resolve_input_shapes, with_input_shapes

from .base import Pass, PassContext, PassResult
from .graph import Model
from .runtime import analyze_runtime, op_name, optimized_model

FLOAT_TYPES = (np.float32, np.float16, np.float64)
AUTO_TRIALS = ("minmax", "percentile")  # rule a': what auto tries, in its order of preference on a tie
MAP_RANK = 3  # rule c: NCL, NCHW and beyond are feature maps; [N, classes] is not


class QuantizePass(Pass):
    """Rule a's quantization, rule c's float-node list and rule d's fidelity."""

    name = "quantize"
    requires = ("calibration", "held_out")
    provides = ("quantization", "quantized_original")

    def __init__(self, level: str = "extended", *, act_bytes: int | None = None, batch_size: int | None = None,
                 ceiling_level: str | None = None, calibrate: str = DEFAULT_CALIBRATION):
        check_act_bytes(act_bytes)
        calibration_method(calibrate)  # an unknown name is refused here, before any work
        self.level = level
        self.calibrate = calibrate
        self.batch_size = batch_size
        self.ceiling_level = ceiling_level  # rule f: check the plan's ceiling at this level

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        proto = model.proto()
        check_float32(proto)
        batch = self.batch_size or ctx.batch_size or 16
        calibration, quantized, quality, trials = self._calibrated(proto, ctx, batch)
        shapes = resolve_input_shapes(proto, ctx.input_shapes)
        floats = float_nodes(quantized, shapes, self.level)
        ctx.quantization = {
            "format": "QDQ: int8 per-channel symmetric weights, uint8 activations (onnxruntime quantize_static)",
            "calibration": calibration, "calibration_trials": trials,
            "level": self.level, "float_nodes": floats, "float_bytes": sum(entry["bytes"] for entry in floats),
            "integer_ops": integer_ops(quantized, self.level), "fidelity": quality,
            "calibration_samples": len(ctx.calibration)}
        if self.ceiling_level is not None and ctx.plan is not None:
            ctx.quantization.update(check_int8_ceiling(quantized, ctx, self.ceiling_level, ctx.plan.ceiling_bytes))
        ctx.quantized_original = self._baseline(ctx, batch, calibration)
        what, agreement = gated_agreement(quality)
        ctx.log(f"int8: {len(floats)} node(s) left in float on feature maps ({ctx.quantization['float_bytes']} B); "
                f"{what} with the float model {_percent(agreement)}, cosine {quality['cosine_similarity']:.4f}")
        return PassResult(Model.of(quantized), modified=True, data=ctx.quantization)

    def _calibrated(self, proto: onnx.ModelProto, ctx: PassContext,
                    batch: int) -> tuple[str, onnx.ModelProto, dict[str, Any], dict[str, dict[str, Any]]]:
        """Rules a, a' and d: (calibration, int8 model, its fidelity, what auto's trials scored)."""
        trials: dict[str, tuple[onnx.ModelProto, dict[str, Any]]] = {}
        for method in AUTO_TRIALS if self.calibrate == "auto" else (self.calibrate,):
            quantized = quantize_int8(proto, _calibration_inputs(ctx, batch), calibrate=method,
                                      input_shapes=ctx.input_shapes)
            trials[method] = quantized, int8_fidelity(proto, quantized, ctx, batch)
        chosen = max(trials, key=lambda method: calibration_score(trials[method][1]))  # the first on a tie
        if len(trials) > 1:
            ctx.log("int8: calibration " + ", ".join(f"{m} {_figure(q)}" for m, (_, q) in trials.items())
                    + f" on the held-out part: {chosen}")
        scored = {m: q for m, (_, q) in trials.items()} if len(trials) > 1 else {}
        return chosen, *trials[chosen], scored

    @staticmethod
    def _baseline(ctx: PassContext, batch: int, calibration: str) -> onnx.ModelProto | None:
        """Rule g: the input quantized alike, or None (and a warning) where that fails."""
        if ctx.original is None:
            return None
        try:
            return quantize_int8(ctx.original, _calibration_inputs(ctx, batch), calibrate=calibration,
                                 input_shapes=ctx.input_shapes)
        except InputError as exc:
            ctx.warnings.append(f"int8: the original quantized alone is not compared: {exc}")
            return None


def own_dtypes(ctx: PassContext) -> PassContext:
    """The context for the runtime view of an int8 graph: `ctx`'s input shapes, every tensor at
    its own dtype's size (not at the one byte the plan counted)."""
    return PassContext(input_shapes=dict(ctx.input_shapes))


def check_int8_ceiling(quantized: onnx.ModelProto, ctx: PassContext, level: str, ceiling: int) -> dict[str, Any]:
    """Rule f: the int8 graph's allocations (at their own dtype sizes) against `ceiling`: a map
    above it is a VerificationError, workspaces above it are named (report and warning)."""
    view = analyze_runtime(quantized, own_dtypes(ctx), level, ceiling)
    over = sorted(view.over_ceiling(), key=lambda t: -t.bytes)
    inputs = {value.name for value in quantized.graph.input}
    copies = {out for node in quantized.graph.node if node.op_type == "QuantizeLinear" and node.input[0] in inputs
              for out in node.output}
    maps = [t for t in over if t.role != "workspace" and t.name not in copies]
    if maps:
        raise VerificationError(f"int8: {len(maps)} onnxruntime map(s) of the quantized model above the ceiling "
                                f"of {ceiling} B at level {level}: {_named(maps)}")
    if over:
        ctx.warnings.append(f"int8: {len(over)} allocation(s) of the quantized model above the ceiling of {ceiling} B "
                            f"at level {level} that neither band counts nor filter splits bring under it: "
                            f"{_named(over)}")
        ctx.log(ctx.warnings[-1])
    largest = max((t.bytes for t in view.tensors if t.role in ("map", "workspace")), default=0)
    return {"runtime_peak_bytes": view.peak_bytes, "largest_allocation_bytes": largest,
            "over_ceiling": [{"name": t.name, "op": t.producer_op, "bytes": t.bytes} for t in over]}


def _named(tensors: list) -> str:
    more = f" and {len(tensors) - 3} more" if len(tensors) > 3 else ""
    return ", ".join(f"{t.name} ({t.producer_op}, {t.bytes} B)" for t in tensors[:3]) + more


def check_act_bytes(act_bytes: int | None) -> None:
    """Rule b: --int8 plans every map at one byte."""
    if act_bytes is not None and act_bytes != 1:
        raise InputError(f"--int8 stores every feature map in one byte; --act-bytes {act_bytes} contradicts it "
                         "(drop it or give 1)")


def planned_act_bytes(int8: bool, act_bytes: int | None) -> int | None:
    """The bytes per element compile plans with: 1 under --int8 (rule b)."""
    if not int8:
        return act_bytes
    check_act_bytes(act_bytes)
    return 1


def _calibration_inputs(ctx: PassContext, batch: int) -> Iterator[Batch]:
    """The calibration part's input batches (rule a: never the held-out samples)."""
    return (inputs for inputs, _ in ctx.calibration.batches(batch))


def float_nodes(quantized: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                level: str = "extended") -> list[dict[str, Any]]:
    """Rule c: the nodes of onnxruntime's optimised graph that produce a float feature map."""
    optimized = optimized_model(with_input_shapes(quantized, shapes), level)
    outputs = {value.name for value in optimized.graph.output}
    input_rows = set(input_gathers(optimized))  # a band's float rows of the input (int8.py rule a')
    names = [out for node in optimized.graph.node for out in node.output if out]
    infos = onnxruntime_tensor_infos(optimized, shapes, names)
    found = []
    for node in optimized.graph.node:
        for name in node.output:
            info = infos.get(name)
            if not name or name in outputs or info is None or len(info.shape) < MAP_RANK:
                continue
            if node.name in input_rows:
                continue
            if np.dtype(info.dtype).type in FLOAT_TYPES and info.numel:  # an empty slice computes nothing
                found.append({"node": node.name or name, "op": op_name(node), "tensor": name,
                              "shape": list(info.shape), "bytes": info.numel * np.dtype(info.dtype).itemsize})
    return found


def integer_ops(quantized: onnx.ModelProto, level: str = "extended") -> dict[str, int]:
    """How many nodes of each op onnxruntime runs for the int8 model (QLinearConv: 20, ...)."""
    optimized = optimized_model(quantized, level)
    return dict(sorted(Counter(op_name(node) for node in optimized.graph.node).items()))


def int8_fidelity(float_model: onnx.ModelProto, quantized: onnx.ModelProto, ctx: PassContext,
                  batch_size: int) -> dict[str, Any]:
    """Rule d: the int8 model against the float one on the held-out samples."""
    reference = run_ort(float_model, ctx.held_out.batches(batch_size), batch_first=True)
    candidate = run_ort(quantized, ctx.held_out.batches(batch_size), batch_first=True)
    return fidelity(reference, candidate, ctx.held_out.labels, space_classes(ctx.original)).to_dict()


def quantize_report(ctx: PassContext) -> dict[str, Any] | None:
    """The report's "int8" section: None when compile did not quantize. `original`: MeasurePass's
    figures of the original quantized alone (rule g), None where it was not compared."""
    if ctx.quantization is None:
        return None
    return {**ctx.quantization, "original": (ctx.measurement or {}).get("int8_original")}


def calibration_score(quality: Mapping[str, Any]) -> tuple[float, float, float]:
    """Rule a': what auto ranks by: held-out accuracy (with labels), else the agreement the gates
    use (top-1, or greedy CTC decodings), then cosine; a figure that is absent counts as -1."""
    _, agreement = gated_agreement(quality)
    figures = (quality.get("accuracy_candidate"), agreement, quality.get("cosine_similarity"))
    return tuple(-1.0 if value is None else float(value) for value in figures)


def _figure(quality: Mapping[str, Any]) -> str:
    """The figure auto ranks by first, for the log."""
    if quality.get("accuracy_candidate") is not None:
        return f"accuracy {_percent(quality['accuracy_candidate'])}"
    what, agreement = gated_agreement(quality)
    return f"{what} {_percent(agreement)}" if agreement is not None else f"cosine {quality['cosine_similarity']:.4f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
