"""QuantizePass: the verified float model in int8, by onnxruntime's own static quantization.

Rules:

a. The model runs through onnxruntime's `quant_pre_process` (its symbolic shape inference
   and basic optimisations) and `quantize_static`: QDQ format, int8 weights per output
   channel (symmetric, so onnxruntime's symmetric integer conv kernels apply), uint8
   activations, MinMax ranges calibrated on `ctx.calibration` (never on held-out samples).
   Nothing here quantizes by hand. `ForceQuantizeNoInputCheck` quantizes the input of
   data-movement ops too (Slice, MaxPool, Reshape...), so the band Slices of a tiled
   model read one uint8 copy of their start; without it onnxruntime moves each band's
   QuantizeLinear above its Slice and quantizes the whole start once per band (ResNet-18
   at 256KB: 14 copies of the input, a 2.0 MiB runtime peak instead of 278 KiB).
   A model below opset 13 is first converted to opset 17 (per-channel DequantizeLinear
   needs 13); where the symbolic shape inference gives up (PP-OCR's classifier: an assert
   on a Concat of shape values along axis -1; its recognizer: "Incomplete symbolic shape
   inference", after writing its partial model into the working directory, which is
   therefore a temporary folder), `quant_pre_process` runs on onnx's shape inference.
   A model onnxruntime's tools refuse is an InputError (exit 2).
a'. Calibration (`--calibrate`): onnxruntime's MinMax, Percentile (99.999th percentile of
   |x|) or Entropy calibrator, or `auto` (rule a'': the better of the first two). Ranges
   are collected one batch at a time (quantize_static's `CalibStridedMinMax`, which strides
   any calibrator; the histograms and ranges merge across batches), because each calibrator
   otherwise holds every intermediate output of every sample until the end (PP-OCR's
   recognizer, Percentile on 384 lines: out of this machine's 24 GB). Nodes whose output is
   empty (the Slice that orders tiled bands) are left unquantized and their tensors out of
   the histograms: they compute nothing, and onnxruntime's histogram collector fails on an
   empty tensor's second batch.
a''. `auto` (the default): the model is quantized with MinMax and with Percentile, each is
   scored against the float model on `ctx.held_out` (rule d), and the better one is kept
   (`calibration_score`: accuracy with labels, else the gates' agreement, then cosine;
   MinMax on a tie). Neither wins everywhere: Percentile takes PP-OCR's recognizer from
   60.0% to 81.3% and costs its classifier 1.3 points (docs/int8.md). The report gives each
   trial's fidelity in `calibration_trials`.
b. Only float32 models are quantized (float16 and bfloat16 ones are an InputError); with
   `--int8` every stored map is planned at one byte (`planned_act_bytes`), so an
   `--act-bytes` other than 1 contradicts it (InputError, before any work).
c. What still runs in float: onnxruntime optimises the int8 model at `level` and saves
   the graph it runs; one run on zeros sizes every tensor. A node is listed when it
   produces a float feature map (rank 3 or more) that is not a graph output: a
   DequantizeLinear that no integer kernel absorbed, or an op with no integer kernel
   (Exp, Tanh, Div, a ReduceSum of bands...); empty tensors (the zero that orders the
   bands, passes/tile_emit.py rule g) compute nothing and are not listed. Each entry:
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
   one) and sets `ctx.quantization` (and `result.data`): {"format", "level",
   "calibration", "calibration_trials", "float_nodes", "float_bytes", "integer_ops",
   "fidelity", "calibration_samples", "runtime_peak_bytes", "largest_allocation_bytes",
   "over_ceiling"} (the last three with rule g's check).
f. Ranks: `AlignRanksPass` (compile --int8, after planning, before the fit) rounds every
   planned rank k down to a multiple of 8 (ranks under 8 stay). The folded convs write and
   read k channels, and onnxruntime's symmetric int8 kernel needs k % 8 == 0 written and
   k % 4 == 0 read (passes/runtime.py rule e'); without it a conv allocates an int32 output
   and an im2col of its whole band (ResNet-18 at 64KB: k = 83 gave a 368 KiB im2col).
g. Ceiling (`ceiling_level` set: compile --int8 --runtime ort): the int8 graph's runtime view
   at that level, every tensor at its own dtype's size (uint8 maps at one byte, float ones
   at four, rule e' workspaces at theirs), against the plan's ceiling (passes/tile_bands.py
   plans the bands for it; passes/split_conv.py rules a' and b'' split the filters of a conv
   whose int32 output no band count brings under it, in parts MLAS's symmetric kernel
   takes). A map above it (graph inputs and outputs excepted) is a VerificationError (exit
   1, nothing written), except the uint8 copy of a graph input (its QuantizeLinear:
   onnxruntime's int8 model takes the float input and quantizes it whole). That copy and a
   workspace above the ceiling are named in `over_ceiling` and in a warning, not refused:
   where a map has fewer than 16 output positions, the float model VerifyPass checks needs
   parts of at most that many filters (split_conv rule a), too few for the symmetric kernel,
   so each part's im2col reads the whole input (VGG-16-BN at 32x32, 8KB: 18 KiB each).
h. Before any fitting, `QuantizablePass` runs rule a on the input model and one
   calibration batch: a refusal (rules a and b) costs seconds, not a training run.
i. The baseline: the pipeline's input (`ctx.original`) quantized by rule a on the same
   calibration part goes into `ctx.quantized_original`, so that MeasurePass gives the
   int8 model's accuracy and latency against what quantize_static alone makes of the
   original. Where that fails, a warning says so and the figures are left out.

Entry point: `QuantizePass(level=...).run(model, ctx)`; `quantize_report(ctx)` is the
report's "int8" section; `quantize_int8(model, batches)` is rule a alone;
`AlignRanksPass().run(model, ctx)` is rule f.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from dataclasses import replace
from typing import Any

import numpy as np
import onnx

from fmcompress.errors import InputError, VerificationError
from fmcompress.metrics import fidelity, gated_agreement
from fmcompress.onnxutil import constant_node_value
from fmcompress.ortrun import run_ort
from fmcompress.shapes import onnxruntime_tensor_infos, resolve_input_shapes, with_input_shapes

from .base import Pass, PassContext, PassResult
from .graph import Model
from .plan import PlannedMap
from .runtime import analyze_runtime, op_name, optimized_model

Batch = Mapping[str, np.ndarray]
FLOAT_TYPES = (np.float32, np.float16, np.float64)
QUANTIZE_OPTIONS = {"WeightSymmetric": True, "ActivationSymmetric": False, "ForceQuantizeNoInputCheck": True}
MAP_RANK = 3  # rule c: NCL, NCHW and beyond are feature maps; [N, classes] is not
RANK_ALIGN = 8  # rule f: MLAS's symmetric int8 conv wants output channels % 8 (input % 4)
CALIBRATIONS = ("auto", "minmax", "percentile", "entropy")  # rule a': onnxruntime's calibrators, by --calibrate
AUTO_TRIALS = ("minmax", "percentile")  # rule a'': what auto tries, in its order of preference on a tie
DEFAULT_CALIBRATION = "auto"


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
        self.ceiling_level = ceiling_level  # rule g: check the plan's ceiling at this level

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
        """Rules a', a'' and d: (calibration, int8 model, its fidelity, what auto's trials scored)."""
        trials: dict[str, tuple[onnx.ModelProto, dict[str, Any]]] = {}
        for method in AUTO_TRIALS if self.calibrate == "auto" else (self.calibrate,):
            quantized = quantize_int8(proto, _calibration_inputs(ctx, batch), calibrate=method)
            trials[method] = quantized, int8_fidelity(proto, quantized, ctx, batch)
        chosen = max(trials, key=lambda method: calibration_score(trials[method][1]))  # the first on a tie
        if len(trials) > 1:
            ctx.log("int8: calibration " + ", ".join(f"{m} {_figure(q)}" for m, (_, q) in trials.items())
                    + f" on the held-out part: {chosen}")
        scored = {m: q for m, (_, q) in trials.items()} if len(trials) > 1 else {}
        return chosen, *trials[chosen], scored

    @staticmethod
    def _baseline(ctx: PassContext, batch: int, calibration: str) -> onnx.ModelProto | None:
        """Rule i: the input quantized alike, or None (and a warning) where that fails."""
        if ctx.original is None:
            return None
        try:
            return quantize_int8(ctx.original, _calibration_inputs(ctx, batch), calibrate=calibration)
        except InputError as exc:
            ctx.warnings.append(f"int8: the original quantized alone is not compared: {exc}")
            return None


class QuantizablePass(Pass):
    """Rule h: rule a on the input model and one calibration batch, before any fitting, so
    that a model onnxruntime's tools refuse is refused in seconds, not after the training."""

    name = "quantizable"
    requires = ("calibration",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        proto = model.proto()
        check_float32(proto)
        first = next(iter(ctx.calibration.batches(ctx.batch_size or 1)))[0]
        quantize_int8(proto, [first])
        return PassResult(model, modified=False)


class AlignRanksPass(Pass):
    """Rule f: every planned rank a multiple of 8, for onnxruntime's symmetric int8 convs."""

    name = "align-ranks"
    requires = ("plan",)
    provides = ("plan",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        maps = [aligned_rank(m) for m in ctx.plan.maps]
        changed = [f"{m.name} {m.k}->{a.k}" for m, a in zip(ctx.plan.maps, maps, strict=True) if a.k != m.k]
        if changed:
            ctx.log(f"int8: {len(changed)} rank(s) rounded down to a multiple of {RANK_ALIGN}: "
                    f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}")
        ctx.plan = replace(ctx.plan, maps=maps)
        return PassResult(model, modified=False, data=maps)


def aligned_rank(planned: PlannedMap) -> PlannedMap:
    """Rule f for one map: k rounded down to a multiple of 8 (a rank under 8 stays)."""
    if planned.k < RANK_ALIGN or planned.k % RANK_ALIGN == 0:
        return planned
    k = planned.k - planned.k % RANK_ALIGN
    return replace(planned, k=k, bytes_after=planned.bytes_after // planned.k * k)


def own_dtypes(ctx: PassContext) -> PassContext:
    """The context for the runtime view of an int8 graph: `ctx`'s input shapes, every tensor at
    its own dtype's size (not at the one byte the plan counted)."""
    return PassContext(input_shapes=dict(ctx.input_shapes))


def check_int8_ceiling(quantized: onnx.ModelProto, ctx: PassContext, level: str, ceiling: int) -> dict[str, Any]:
    """Rule g: the int8 graph's allocations (at their own dtype sizes) against `ceiling`: a map
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


def check_float32(model: onnx.ModelProto) -> None:
    """Rule b: onnxruntime's static quantization takes float32 models."""
    types = {value.type.tensor_type.elem_type for value in [*model.graph.input, *model.graph.output]
             if value.type.HasField("tensor_type")}
    half = types & {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    if half:
        names = ", ".join(onnx.TensorProto.DataType.Name(t).lower() for t in sorted(half))
        raise InputError(f"--int8 quantizes float32 models; this one computes in {names}")


def calibration_reader(batches: Iterable[Batch]) -> Any:
    """onnxruntime's CalibrationDataReader over input batches (rule a). It also takes
    `set_range`, so that quantize_static's strided collection (rule a') reads it in slices."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: list[Batch] = list(batches)
            self.set_range(0, len(self.batches))

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending: Iterator[Batch] = iter(self.batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.pending, None)
            return None if batch is None else {name: np.ascontiguousarray(v) for name, v in batch.items()}

    return Reader()


def quantize_int8(model: onnx.ModelProto, batches: Iterable[Batch], *, calibrate: str = "minmax",
                  **overrides: Any) -> onnx.ModelProto:
    """Rule a: `quant_pre_process`, then `quantize_static` calibrated on `batches` by `calibrate`
    (rule a'); `overrides` are further `quantize_static` arguments (examples/rec_int8_recipes.py
    tries some)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration_method(calibrate) is None:
        raise ValueError("auto chooses between calibrations on held-out data (QuantizePass): name one here")
    reader = calibration_reader(batches)
    options = {**QUANTIZE_OPTIONS, "CalibStridedMinMax": 1, **overrides.pop("extra_options", {})}  # rule a'
    with tempfile.TemporaryDirectory(prefix="fmcompress-int8-") as folder:
        source, prepared, quantized = (os.path.join(folder, f"{n}.onnx") for n in ("float", "pre", "int8"))
        onnx.save_model(with_per_channel_opset(model), source)
        try:
            with _working_directory(folder):  # where symbolic shape inference drops its partial model
                try:
                    quant_pre_process(source, prepared)
                except Exception:  # noqa: BLE001 - rule a: its symbolic shape inference gave up; onnx's instead
                    quant_pre_process(source, prepared, skip_symbolic_shape=True)
            excluded = [*(overrides.pop("nodes_to_exclude", None) or []), *empty_producers(onnx.load(prepared))]
            with redirect_stdout(io.StringIO()), _quiet_root_logger(), _histograms_skip_empty_tensors():
                quantize_static(prepared, quantized, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                                calibrate_method=calibration_method(calibrate), extra_options=options,
                                nodes_to_exclude=excluded, **overrides)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's tools raise anything; said in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise InputError(f"onnxruntime's quantization refused the model ({type(exc).__name__}: {first})") from exc
        result = onnx.load(quantized)
    _keep_interface(model, result)
    return result


def empty_producers(model: onnx.ModelProto) -> list[str]:
    """Rule a': the named Slices whose constant starts equal their constant ends: their output is
    empty (the Slice that orders tiled bands, passes/tile_emit.py rule g, whose input's shape
    inference may not know). They compute nothing, so there is nothing to quantize, and
    onnxruntime's histogram calibrators fail on an empty tensor's second batch."""
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    constants.update({node.output[0]: constant_node_value(node) for node in model.graph.node
                      if node.op_type == "Constant"})

    def empty_slice(node: onnx.NodeProto) -> bool:
        bounds = [constants.get(name) for name in node.input[1:3]]
        return (node.op_type == "Slice" and len(bounds) == 2 and all(b is not None for b in bounds)
                and bounds[0].shape == bounds[1].shape and bool(np.all(bounds[0] == bounds[1])))

    return [node.name for node in model.graph.node if node.name and empty_slice(node)]


def _calibration_inputs(ctx: PassContext, batch: int) -> Iterator[Batch]:
    """The calibration part's input batches (rule a: never the held-out samples)."""
    return (inputs for inputs, _ in ctx.calibration.batches(batch))


def calibration_method(name: str) -> Any:
    """Rule a': onnxruntime's CalibrationMethod for a --calibrate name (auto: None, rule a'')."""
    from onnxruntime.quantization import CalibrationMethod

    methods = {"auto": None, "minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if name not in methods:
        raise InputError(f"unknown calibration {name!r}; known: {', '.join(CALIBRATIONS)}")
    return methods[name]


@contextmanager
def _histograms_skip_empty_tensors() -> Iterator[None]:
    """Rule a': onnxruntime's HistogramCollector (Percentile, Entropy) fails when it merges the
    second batch of an empty tensor (`np.nanmax` of nothing); while quantizing, empty tensors
    are left out of what it collects. Their producers are excluded from quantization
    (`empty_producers`), so no range is missing."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    original = HistogramCollector.collect

    def collect(self: Any, name_to_arr: dict[str, Any]) -> Any:
        return original(self, {name: arrays for name, arrays in name_to_arr.items()
                               if any(np.size(array) for array in (arrays if isinstance(arrays, list) else [arrays]))})

    HistogramCollector.collect = collect
    try:
        yield
    finally:
        HistogramCollector.collect = original


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer warns through the root logger, once per weight it cannot quantize
    per channel (PP-OCR's recognizer: 48 LayerNorm scales, which it quantizes per tensor instead):
    not the user's concern, so not on their terminal."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)


@contextmanager
def _working_directory(folder: str) -> Iterator[None]:
    """Rule a: onnxruntime's symbolic shape inference, when it gives up, saves its partial model as
    `sym_shape_infer_temp.onnx` in the working directory: that must be our temporary folder, never
    the user's."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def with_per_channel_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rule a: a model below opset 13 converted to fmcompress's target opset (per-channel
    DequantizeLinear needs 13), or `model` itself."""
    from fmcompress.normalize import MIN_PER_CHANNEL_OPSET, TARGET_OPSET, converted_to

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), TARGET_OPSET)
    if opset >= MIN_PER_CHANNEL_OPSET:
        return model
    converted = converted_to(model, TARGET_OPSET)
    if converted is model:
        raise InputError(f"--int8 needs opset {MIN_PER_CHANNEL_OPSET} or later (per-channel weights) and onnx's "
                         f"version converter cannot take this opset-{opset} model there")
    return converted


def _keep_interface(model: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """Rule e: the float model's input and output declarations (a dynamic batch stays
    dynamic) and its metadata."""
    for ours, theirs in ((model.graph.input, quantized.graph.input), (model.graph.output, quantized.graph.output)):
        declared = {value.name: value for value in ours}
        for value in theirs:
            if value.name in declared:
                value.CopyFrom(declared[value.name])
    kept = {p.key for p in quantized.metadata_props}
    quantized.metadata_props.extend(p for p in model.metadata_props if p.key not in kept)


def float_nodes(quantized: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                level: str = "extended") -> list[dict[str, Any]]:
    """Rule c: the nodes of onnxruntime's optimised graph that produce a float feature map."""
    optimized = optimized_model(with_input_shapes(quantized, shapes), level)
    outputs = {value.name for value in optimized.graph.output}
    names = [out for node in optimized.graph.node for out in node.output if out]
    infos = onnxruntime_tensor_infos(optimized, shapes, names)
    found = []
    for node in optimized.graph.node:
        for name in node.output:
            info = infos.get(name)
            if not name or name in outputs or info is None or len(info.shape) < MAP_RANK:
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
    return fidelity(reference, candidate, ctx.held_out.labels).to_dict()


def quantize_report(ctx: PassContext) -> dict[str, Any] | None:
    """The report's "int8" section: None when compile did not quantize. `original`: MeasurePass's
    figures of the original quantized alone (rule i), None where it was not compared."""
    if ctx.quantization is None:
        return None
    return {**ctx.quantization, "original": (ctx.measurement or {}).get("int8_original")}


def calibration_score(quality: Mapping[str, Any]) -> tuple[float, float, float]:
    """Rule a'': what auto ranks by: held-out accuracy (with labels), else the agreement the gates
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
