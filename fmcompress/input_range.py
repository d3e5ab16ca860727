"""What value range a model's image input expects, where the model says so, and whether
the calibration data matches it.

Rules:

a. Only a 4-D input [N, C, H, W] is read; channel statistics are taken over axis 1.
b. A leading normalisation in the graph says it first: the input goes through a chain of
   Sub / Add / Mul / Div by constants (scalars or one value per channel), or a
   BatchNormalization, each the only reader of the tensor before it (Cast and Identity
   pass through). The chain is composed into y = a * x + b per channel; the input then
   expects raw pixels in [0, P]: P = 255 when 1 / |a| >= 16 or the subtracted centre
   -b / a is >= 16 (Div by 255, Sub 123.675 / Div 58.395, Div 127.5 then Sub 1), else
   P = 1 (Sub 0.485 / Div 0.229, Mul 2 then Sub 1). A chain that is the identity says nothing.
c. Else the metadata: keys named `mean`, `std`, `scale` (or ending in `_mean`, `_std`,
   `_scale`; lists such as `[0.485, 0.456, 0.406]`, `1/255` accepted), or
   `normalization`/`normalize` = `imagenet`, say the input expects
   (pixels * scale - mean) / std of 0-255 pixels (scale 1/255 when every mean is <= 1,
   else 1; std 1 when absent). An Ultralytics export (`author` or `description`
   naming Ultralytics, as YOLOv8 files carry) expects RGB pixels / 255 in [0, 1].
d. Else nothing is inferred and nothing is said.
e. The data disagrees clearly when, for some channel, its samples reach more than a
   quarter of the expected span outside [low, high], or cover less than a tenth of the
   span. The warning is one line and names the `--scale`, `--mean`, `--std` that give
   the expected range from 0-255 images.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel minimum, maximum and mean of a batch of samples [N, C, ...] (axis 1)."""

    minimum: np.ndarray  # [C]
    maximum: np.ndarray
    mean: np.ndarray


def channel_statistics(array: np.ndarray) -> ChannelStats | None:
    """Rule: statistics over every sample and position of each channel (axis 1) of an
    array of at least 2 dims; None for fewer dims or no elements."""
    if array.ndim < 2 or array.size == 0:
        return None
    per_channel = np.moveaxis(np.asarray(array, dtype=np.float64), 1, 0).reshape(array.shape[1], -1)
    return ChannelStats(per_channel.min(axis=1), per_channel.max(axis=1), per_channel.mean(axis=1))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BYTE_UNIT = 16.0  # 1/|a| or the centre at or above this: the graph expects 0-255 pixels
OUTSIDE_MARGIN = 0.25  # share of the expected span the data may overshoot
NARROW_SHARE = 0.1  # the data must cover at least this share of the expected span
_AFFINE_OPS = ("Sub", "Add", "Mul", "Div")
_PASS_THROUGH = ("Cast", "Identity")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+\.?\d*)?")


@dataclass(frozen=True)
class ExpectedRange:
    """The per-channel range [low, high] an input expects, why, and the flags giving it."""

    input: str
    low: np.ndarray  # [C]
    high: np.ndarray
    source: str  # what says so, e.g. "the graph's leading Div"
    scale: float  # --scale, --mean, --std that map 0-255 pixels onto it
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def flags(self) -> str:
        """The command-line flags that produce this range from 0-255 images."""
        return (f"--scale {self.scale:.8g} --mean {','.join(f'{m:g}' for m in self.mean)} "
                f"--std {','.join(f'{s:g}' for s in self.std)}")


def input_range_warnings(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> list[str]:
    """Rule e for every 4-D input of `inputs` (calibration samples) whose range the model states."""
    warnings = []
    for name, array in inputs.items():
        if array.ndim != 4:
            continue
        expected = expected_range(model, name, int(array.shape[1]))
        stats = channel_statistics(array)
        message = range_mismatch(expected, stats) if expected and stats else None
        if message:
            warnings.append(message)
    return warnings


def expected_range(model: onnx.ModelProto, name: str, channels: int) -> ExpectedRange | None:
    """Rules b-d: the graph's leading normalisation, else the metadata, else None."""
    return _graph_range(model, name, channels) or _metadata_range(model, name, channels)


def range_mismatch(expected: ExpectedRange, stats: ChannelStats) -> str | None:
    """Rule e: a one-line warning when the data's channels clearly miss the expected range."""
    span = np.maximum(expected.high - expected.low, 1e-12)
    outside = (stats.minimum < expected.low - OUTSIDE_MARGIN * span) | \
              (stats.maximum > expected.high + OUTSIDE_MARGIN * span)
    narrow = (stats.maximum - stats.minimum) < NARROW_SHARE * span
    if not np.any(outside | narrow):
        return None
    return (f"input {expected.input!r}: {expected.source} says it expects values in "
            f"{_interval(expected.low, expected.high)}, but the calibration samples range over "
            f"{_interval(stats.minimum, stats.maximum)} (mean {float(np.mean(stats.mean)):.3g}): the "
            f"fidelity figures may mean little; for image data pass {expected.flags()}")


def _interval(low: np.ndarray, high: np.ndarray) -> str:
    return f"[{float(np.min(low)):.3g}, {float(np.max(high)):.3g}]"


# ------------------------------------------------------------------- graph (rule b)


def _graph_range(model: onnx.ModelProto, name: str, channels: int) -> ExpectedRange | None:
    found = leading_affine(model, name, channels)
    if found is None:
        return None
    a, b, ops = found
    if np.any(a == 0) or (np.allclose(a, 1) and np.allclose(b, 0)):
        return None
    centre = -b / a
    byte_scale = float(np.median(1 / np.abs(a))) >= BYTE_UNIT or float(np.median(centre)) >= BYTE_UNIT
    top = 255.0 if byte_scale else 1.0
    source = f"the graph's leading {' -> '.join(ops)}"
    return ExpectedRange(name, np.zeros(channels), np.full(channels, top), source, top / 255.0,
                         (0.0,) * channels, (1.0,) * channels)


def leading_affine(model: onnx.ModelProto, name: str,
                   channels: int) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Rule b: (a, b, op types) of the chain y = a * x + b right after input `name`, or None
    when its first reader is no such op."""
    graph = model.graph
    constants = _Constants(graph)
    outputs = {out.name for out in graph.output}
    a, b = np.ones(channels), np.zeros(channels)
    ops: list[str] = []
    tensor = name
    while tensor not in outputs:
        readers = [node for node in graph.node if tensor in node.input]
        if len(readers) != 1:
            break
        step = _affine_step(readers[0], tensor, constants, channels)
        if step is None:
            break
        if step[0] is not None:
            a, b = step[0] * a, step[0] * b + step[1]
            ops.append(readers[0].op_type)
        tensor = readers[0].output[0]
    return (a, b, ops) if ops else None


def _affine_step(node: onnx.NodeProto, tensor: str, constants: _Constants,
                 channels: int) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """(k, c) of y = k * x + c for one node reading `tensor`; (None, None) for a pass-through."""
    if node.op_type in _PASS_THROUGH:
        return None, None
    if node.op_type == "BatchNormalization":
        return _batchnorm_step(node, tensor, constants, channels)
    if node.op_type not in _AFFINE_OPS or len(node.input) != 2:
        return None
    first = node.input[0] == tensor
    other = _per_channel(constants.get(node.input[1] if first else node.input[0]), channels)
    if other is None or (node.op_type in ("Sub", "Div") and not first):
        return None
    one, zero = np.ones(channels), np.zeros(channels)
    if node.op_type == "Div":
        return (1 / other, zero) if np.all(other != 0) else None
    return {"Sub": (one, -other), "Add": (one, other), "Mul": (other, zero)}[node.op_type]


def _batchnorm_step(node: onnx.NodeProto, tensor: str, constants: _Constants,
                    channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    if node.input[0] != tensor or len(node.input) < 5:
        return None
    gamma, beta, mean, var = (_per_channel(constants.get(n), channels, flat=True) for n in node.input[1:5])
    if gamma is None or beta is None or mean is None or var is None:
        return None
    eps = next((attr.f for attr in node.attribute if attr.name == "epsilon"), 1e-5)
    k = gamma / np.sqrt(var + eps)
    return k, beta - k * mean


class _Constants:
    """Initializers and Constant nodes' values by name, converted only when asked for."""

    def __init__(self, graph: onnx.GraphProto):
        self.tensors = {init.name: init for init in graph.initializer}
        for node in graph.node:
            value = next((attr for attr in node.attribute if attr.name == "value"), None)
            if node.op_type == "Constant" and value is not None:
                self.tensors[node.output[0]] = value.t

    def get(self, name: str) -> np.ndarray | None:
        tensor = self.tensors.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


def _per_channel(value: np.ndarray | None, channels: int, flat: bool = False) -> np.ndarray | None:
    """A scalar, or one value per channel laid out to broadcast over [N, C, H, W] (`flat`: a
    [C] vector, as BatchNormalization takes), as [C]."""
    if value is None or value.dtype.kind not in "fiu" or value.ndim > 4:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.size == 1:
        return np.full(channels, float(array.reshape(-1)[0]))
    aligned = (1,) * (4 - array.ndim) + array.shape
    if array.size == channels and (aligned[1] == channels or (flat and array.ndim == 1)):
        return array.reshape(-1)
    return None


# ---------------------------------------------------------------- metadata (rule c)


def _metadata_range(model: onnx.ModelProto, name: str, channels: int) -> ExpectedRange | None:
    props = {prop.key.lower(): prop.value for prop in model.metadata_props}
    mean, std, scale = (_metadata_numbers(props, key) for key in ("mean", "std", "scale"))
    normalization = (props.get("normalization") or props.get("normalize") or "").lower()
    if mean is None and "imagenet" in normalization:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if mean is not None or std is not None or scale is not None:
        return _normalised_range(name, channels, mean, std, scale, "the model's metadata (mean/std/scale)")
    maker = f"{props.get('author', '')} {props.get('description', '')}".lower()
    if "ultralytics" in maker:
        return _normalised_range(name, channels, [0.0], [1.0], [1 / 255],
                                 "the model's metadata (an Ultralytics export: RGB / 255)")
    return None


def _metadata_numbers(props: Mapping[str, str], key: str) -> list[float] | None:
    """The numbers of metadata key `key` (or `*_key`, `*-key`, `* key`); None when absent."""
    for prop, value in props.items():
        if prop == key or re.search(rf"[_\-. ]{key}$", prop):
            numbers = [_number(text) for text in _NUMBER.findall(value)]
            return numbers or None
    return None


def _number(text: str) -> float:
    top, _, bottom = text.partition("/")
    return float(top) / float(bottom) if bottom else float(top)


def _normalised_range(name: str, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                      scale: Sequence[float] | None, source: str) -> ExpectedRange | None:
    """Rule c: (pixels * scale - mean) / std over 0-255 pixels, per channel."""
    mean_c = _fit_channels(mean or [0.0], channels)
    std_c = _fit_channels(std or [1.0], channels)
    if mean_c is None or std_c is None or np.any(std_c <= 0):
        return None
    factor = scale[0] if scale else (1 / 255 if np.all(mean_c <= 1) else 1.0)
    if factor <= 0:
        return None
    low, high = (0 - mean_c) / std_c, (255 * factor - mean_c) / std_c
    return ExpectedRange(name, low, high, source, float(factor), tuple(float(m) for m in mean_c),
                         tuple(float(s) for s in std_c))


def _fit_channels(values: Sequence[float], channels: int) -> np.ndarray | None:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 1:
        return np.full(channels, float(array[0]))
    if array.size == channels:
        return array
    if channels == 1 and array.size == 3:  # RGB figures for a grayscale input
        return np.full(1, float(array.mean()))
    return None
