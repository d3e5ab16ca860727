"""onnxruntime's static quantization of a float model to int8, and its calibration helpers.

The flow compile --int8 quantizes with (passes/quantize.py's QuantizePass, passes/quantizable.py's
QuantizablePass, passes/peak_plan.py's probes). Rules:

a. The model runs through onnxruntime's `quant_pre_process` (its symbolic shape inference
   and basic optimisations) and `quantize_static`: QDQ format, int8 weights per output
   channel (symmetric, so onnxruntime's symmetric integer conv kernels apply), uint8
   activations, ranges calibrated on the batches given (rule b; MinMax unless another is
   named). Nothing here quantizes by hand. `ForceQuantizeNoInputCheck` quantizes the input
   of data-movement ops too (Slice, MaxPool, Reshape...), so the band Slices of a tiled
   model read one uint8 copy of their start; without it onnxruntime moves each band's
   QuantizeLinear above its Slice and quantizes the whole start once per band (ResNet-18
   at 256KB: 14 copies of the input, a 2.0 MiB runtime peak instead of 278 KiB).
   A model below opset 13 is first converted to opset 17 (per-channel DequantizeLinear
   needs 13); where the symbolic shape inference gives up (PP-OCR's classifier: an assert
   on a Concat of shape values along axis -1; its recognizer: "Incomplete symbolic shape
   inference", after writing its partial model into the working directory, which is
   therefore a temporary folder), `quant_pre_process` runs on onnx's shape inference.
   A model onnxruntime's tools refuse is an InputError (exit 2).
a'. Gathers of a float graph input stay float (`input_gathers`): a tiled region takes each
   band's rows of the input by Gather (passes/tile_emit.py rule f''), and each band then
   quantizes its own rows instead of reading one uint8 copy of the whole input.
a''. Before quantizing (`integer_friendly`), exact rewrites give onnxruntime integer
   kernels where it has none: a division by a constant becomes a multiplication by its
   reciprocal (passes/div_to_mul.py: an inlined HardSwish ends in a Div by 6, which otherwise
   keeps two float copies of its map; PP-OCR's detector at 640x640: 1.2 MiB each, its
   recognizer: 28 Divs); HardSigmoid and HardSwish become the Mul, Add and Clip they are made
   of (passes/hard_activations.py: MobileNetV3-Small at 224x224 kept 54 float maps, 3.1 MiB);
   and a ConvTranspose whose kernel is its stride becomes a 1x1 Conv and a rearrangement
   (passes/conv_transpose_as_conv.py: the CPU provider has no integer ConvTranspose; PP-OCR's
   detector head: float maps of 9.4 MiB).
b. Calibration (`--calibrate`): onnxruntime's MinMax, Percentile (99.999th percentile of
   |x|) or Entropy calibrator, or `auto` (passes/quantize.py rule a': the better of the
   first two, chosen on held-out data; `quantize_int8` itself takes a named one). Ranges
   are collected one batch at a time (quantize_static's `CalibStridedMinMax`, which strides
   any calibrator; the histograms and ranges merge across batches), because each calibrator
   otherwise holds every intermediate output of every sample until the end (PP-OCR's
   recognizer, Percentile on 384 lines: out of this machine's 24 GB). Nodes whose output is
   empty (the Slice that orders tiled bands) are left unquantized and their tensors out of
   the histograms: they compute nothing, and onnxruntime's histogram collector fails on an
   empty tensor's second batch.
c. Only float32 models are quantized (float16 and bfloat16 ones are an InputError).
d. The int8 model keeps the float model's input and output declarations (a dynamic batch
   stays dynamic) and its metadata.

e. The int8 graph alone (`quantized_layout`, for sizing: passes/peak_plan.py rule g): rule a's
   flow with a placeholder range (0 to 1) for every tensor, handed to `quantize_static` as
   its calibration cache (`calibration_cache_path`), so that no calibration runs. Its nodes,
   dtypes and shapes are those `quantize_int8` makes of the model; its scales are not.
   onnxruntime's calibration runs the whole model with every tensor an output, which on a
   tiled graph of thousands of nodes was half of the quantization's time (MobileNetV2-224
   tiled at a 48 KiB ceiling, 3995 nodes: 30 s -> 16 s, the same runtime peak).

Entry points: `quantize_int8(model, batches, calibrate=...)` is rules a to d,
`quantized_layout(model)` rule e; `check_float32(model)` is rule c alone,
`calibration_method(name)` resolves a --calibrate name.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from typing import Any

import numpy as np
import onnx

from .errors import InputError
from .onnxutil import constant_node_value

Batch = Mapping[str, np.ndarray]
QUANTIZE_OPTIONS = {"WeightSymmetric": True, "ActivationSymmetric": False, "ForceQuantizeNoInputCheck": True}
CALIBRATIONS = ("auto", "minmax", "percentile", "entropy")  # rule b: onnxruntime's calibrators, by --calibrate
DEFAULT_CALIBRATION = "auto"


def check_float32(model: onnx.ModelProto) -> None:
    """Rule c: onnxruntime's static quantization takes float32 models."""
    types = {value.type.tensor_type.elem_type for value in [*model.graph.input, *model.graph.output]
             if value.type.HasField("tensor_type")}
    half = types & {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    if half:
        names = ", ".join(onnx.TensorProto.DataType.Name(t).lower() for t in sorted(half))
        raise InputError(f"--int8 quantizes float32 models; this one computes in {names}")


def calibration_reader(batches: Iterable[Batch]) -> Any:
    """onnxruntime's CalibrationDataReader over input batches (rule a). It also takes
    `set_range`, so that quantize_static's strided collection (rule b) reads it in slices."""
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
                  input_shapes: Mapping[str, tuple[int, ...]] | None = None, **overrides: Any) -> onnx.ModelProto:
    """Rule a: `quant_pre_process`, then `quantize_static` calibrated on `batches` by `calibrate`
    (rule b); `input_shapes` pins inputs the model leaves symbolic, for rule a''; `overrides` are
    further `quantize_static` arguments (examples/rec_int8_recipes.py tries some)."""
    if calibration_method(calibrate) is None:
        raise ValueError("auto chooses between calibrations on held-out data (QuantizePass): name one here")
    return _quantize(integer_friendly(model, input_shapes), calibration_reader(batches),
                     calibration_method(calibrate), overrides)


def quantized_layout(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
                     ) -> onnx.ModelProto:
    """Rule e: the graph `quantize_int8` makes of `model`, with placeholder ranges and no calibration."""
    return _quantize(integer_friendly(model, input_shapes), None, calibration_method("minmax"), {})


def _quantize(model: onnx.ModelProto, reader: Any, method: Any, overrides: dict[str, Any]) -> onnx.ModelProto:
    """Rule a's flow; with no `reader`, rule e's placeholder ranges as the calibration cache."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    options = {**QUANTIZE_OPTIONS, "CalibStridedMinMax": 1, **overrides.pop("extra_options", {})}  # rule b
    with tempfile.TemporaryDirectory(prefix="fmcompress-int8-") as folder:
        source, prepared, quantized, cache = (os.path.join(folder, name) for name in
                                              ("float.onnx", "pre.onnx", "int8.onnx", "ranges.json"))
        onnx.save_model(model, source)  # at a per-channel opset already (rule a'')
        try:
            with _working_directory(folder):  # where symbolic shape inference drops its partial model
                try:
                    quant_pre_process(source, prepared)
                except Exception:  # noqa: BLE001 - rule a: its symbolic shape inference gave up; onnx's instead
                    quant_pre_process(source, prepared, skip_symbolic_shape=True)
            prepared_model = onnx.load(prepared)
            if reader is None:
                _save_placeholder_ranges(prepared_model, method, cache)
            excluded = [*(overrides.pop("nodes_to_exclude", None) or []), *empty_producers(prepared_model),
                        *input_gathers(prepared_model)]
            with redirect_stdout(io.StringIO()), _quiet_root_logger(), _histograms_skip_empty_tensors():
                quantize_static(prepared, quantized, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                                calibrate_method=method, extra_options=options, nodes_to_exclude=excluded,
                                calibration_cache_path=None if reader is not None else cache, **overrides)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's tools raise anything; said in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise InputError(f"onnxruntime's quantization refused the model ({type(exc).__name__}: {first})") from exc
        result = onnx.load(quantized)
    _keep_interface(model, result)
    return result


def integer_friendly(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
                     ) -> onnx.ModelProto:
    """Rule a'': the model at a per-channel opset, then rewritten where onnxruntime has no
    integer kernel: divisions by constants (passes/div_to_mul.py), HardSigmoid and HardSwish
    (passes/hard_activations.py), ConvTransposes whose kernel is their stride
    (passes/conv_transpose_as_conv.py); `model` itself is left as it was."""
    # imported here: the passes import this module
    from .passes.base import PassContext
    from .passes.conv_transpose_as_conv import ConvTransposeAsConvPass
    from .passes.div_to_mul import DivToMulPass
    from .passes.graph import Model
    from .passes.hard_activations import HardActivationsPass

    # one graph for the three rewrites: this runs on every quantization, --peak's probes included
    rewritten, context = Model.of(with_per_channel_opset(model)), PassContext(input_shapes=dict(input_shapes or {}))
    for rewrite in (DivToMulPass(), HardActivationsPass(), ConvTransposeAsConvPass()):
        rewritten = rewrite.run(rewritten, context).model
    return rewritten.proto()


def _save_placeholder_ranges(model: onnx.ModelProto, method: Any, path: str) -> None:
    """Rule e: a range of 0 to 1 for every graph input and node output, as onnxruntime's
    calibration cache (ranges of tensors it does not quantize are not read)."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    names = [value.name for value in model.graph.input] + [name for node in model.graph.node
                                                          for name in node.output if name]
    placeholder = {name: TensorData(lowest=np.float32(0.0), highest=np.float32(1.0)) for name in names}
    save_tensors_data(TensorsData(method, placeholder), path)


def empty_producers(model: onnx.ModelProto) -> list[str]:
    """Rule b: the named Slices whose constant starts equal their constant ends: their output is
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


def input_gathers(model: onnx.ModelProto) -> list[str]:
    """Rule a': the named Gathers that read a float graph input (a tiled region's band rows of
    the input, passes/tile_emit.py rule f''): left float, so that each band's QuantizeLinear
    quantizes its own rows. Quantized, they would read one uint8 copy of the whole input
    (147 KiB at 224x224x3), held across the region's bands."""
    floats = {inp.name for inp in model.graph.input if inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return [node.name for node in model.graph.node
            if node.op_type == "Gather" and node.name and node.input and node.input[0] in floats]


def calibration_method(name: str) -> Any:
    """Rule b: onnxruntime's CalibrationMethod for a --calibrate name (auto: None,
    passes/quantize.py rule a')."""
    from onnxruntime.quantization import CalibrationMethod

    methods = {"auto": None, "minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if name not in methods:
        raise InputError(f"unknown calibration {name!r}; known: {', '.join(CALIBRATIONS)}")
    return methods[name]


@contextmanager
def _histograms_skip_empty_tensors() -> Iterator[None]:
    """Rule b: onnxruntime's HistogramCollector (Percentile, Entropy) fails when it merges the
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
    from .normalize import MIN_PER_CHANNEL_OPSET, TARGET_OPSET, converted_to

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), TARGET_OPSET)
    if opset >= MIN_PER_CHANNEL_OPSET:
        return model
    converted = converted_to(model, TARGET_OPSET)
    if converted is model:
        raise InputError(f"--int8 needs opset {MIN_PER_CHANNEL_OPSET} or later (per-channel weights) and onnx's "
                         f"version converter cannot take this opset-{opset} model there")
    return converted


def _keep_interface(model: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """Rule d: the float model's input and output declarations (a dynamic batch stays
    dynamic) and its metadata."""
    for ours, theirs in ((model.graph.input, quantized.graph.input), (model.graph.output, quantized.graph.output)):
        declared = {value.name: value for value in ours}
        for value in theirs:
            if value.name in declared:
                value.CopyFrom(declared[value.name])
    kept = {p.key for p in quantized.metadata_props}
    quantized.metadata_props.extend(p for p in model.metadata_props if p.key not in kept)
