"""PyTorch front end: export a zoo model, a factory's model or an nn.Module to a clean ONNX file.

The exported graph is what the passes expect: eval mode, BatchNorm folded into the
preceding Conv, input "input" and output "output" with a dynamic batch dimension
("batch"), weights stored as initializers inside the file (no Constant nodes, no
initializer shared through an Identity), at the requested opset (17 or later).

We use torch's TorchScript exporter (`dynamo=False`): with torch 2.13 it folds Conv+BN,
emits GlobalAveragePool/Flatten/Gemm, honours opset 17 and takes a fraction of a second,
while the dynamo exporter cannot go below opset 18 and emits ReduceMean/Reshape.

Every export is checked before anything is written: onnx.checker, then onnxruntime on a
random input against torch (relative error above 1e-3 raises VerificationError). Then one
trial at another batch size: a graph that fixes the batch (a hard-coded `x.view(1, -1)`, a
batch-1 constant) fails there or gives wrong shapes or values, and is exported again with
a static batch of the requested size (ExportResult.dynamic_batch False, and a warning).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError, UnsupportedOpError, VerificationError, onnxruntime_errors
from .modelio import check_output_path, save_model_atomic
from .onnxutil import constant_node_value

MIN_OPSET = 17
RELATIVE_TOLERANCE = 1e-3
INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"
_FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_STATE_DICT_KEYS = ("state_dict", "model")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float  # onnxruntime vs torch on a random input of the export shape
    input_names: list[str]
    output_names: list[str]
    opset: int
    dynamic_batch: bool = True  # False: the graph fixes the batch, exported with a static one
    warnings: tuple[str, ...] = ()


def export_model(source: str, input_shape: Sequence[int], output: str | os.PathLike, *,
                 weights: str | os.PathLike | None = None, opset: int = MIN_OPSET,
                 check: bool = True) -> ExportResult:
    """Export a zoo model (`resnet18`, ...) or a factory `package.module:function` to ONNX.

    `weights` is a state_dict file (raw, or under a "state_dict"/"model" key) loaded with
    torch.load(weights_only=True); the zoo models are otherwise untrained (their seeded
    random initialisation).
    """
    from fmcompress import models

    check_output_path(output, "file", inputs=[weights])
    _check_opset(opset)
    shape = _check_shape(input_shape)
    if source in models.MODEL_NAMES and len(shape) != 4:
        raise InputError(f"{source} takes a 4-D input (N,C,H,W); got {len(shape)} dims: {','.join(map(str, shape))}")
    module = models.get_model(source) if source in models.MODEL_NAMES else load_factory(source)
    if weights is not None:
        load_weights(module, weights)
    return export_module(module, shape, output, opset=opset, check=check)


def export_module(module: Any, input_shape: Sequence[int], output: str | os.PathLike, *,
                  opset: int = MIN_OPSET, check: bool = True) -> ExportResult:
    """Export an nn.Module taking one float tensor of `input_shape`; see the module docstring."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    _check_opset(opset)
    shape = _check_shape(input_shape)
    path = check_output_path(output, "file")
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(*shape, generator=generator)
    warnings_: list[str] = []
    with _eval_mode(module):
        expected = _run_torch(module, example)
        output_names = [OUTPUT_NAME] if len(expected) == 1 else [f"{OUTPUT_NAME}_{i}" for i in range(len(expected))]
        axes = _batch_axes(module, example.numpy(), expected)
        proto = _torch_to_onnx(module, example, output_names, opset, batch_axes=axes)
        _constants_to_initializers(proto.graph)
        max_abs_diff = float("nan")
        dynamic = True
        if check:
            session = _session(proto)
            max_abs_diff = _verify(session, proto, example.numpy(), expected)
            problem = _batch_trial(session, example.numpy(), expected, axes)
            if problem is not None:
                dynamic = False
                proto = _torch_to_onnx(module, example, output_names, opset)
                _constants_to_initializers(proto.graph)
                max_abs_diff = _verify(_session(proto), proto, example.numpy(), expected)
                warnings_.append(f"the graph fixes the batch size ({problem}); exported with a static batch "
                                 f"of {shape[0]}: it runs only at batch {shape[0]}")
    save_model_atomic(proto, path)
    return ExportResult(path, max_abs_diff, [INPUT_NAME], output_names, opset, dynamic, tuple(warnings_))


def load_factory(spec: str) -> Any:
    """Import `package.module:function` (a dotted attribute path is allowed) and call it."""
    import torch

    from fmcompress import models

    if ":" not in spec:
        raise InputError(f"unknown model {spec!r}; known: {', '.join(models.MODEL_NAMES)}, "
                         "or give a factory as package.module:function")
    if not _FACTORY_RE.match(spec):
        raise InputError(f"invalid factory {spec!r}: expected package.module:function")
    module_name, attr_path = spec.split(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a boundary: the user's module may raise anything while importing
        raise InputError(f"cannot import module {module_name!r}: {_first_line(exc)}") from exc
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise InputError(f"{spec}: {getattr(target, '__name__', module_name)!s} has no attribute {attr!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise InputError(f"{spec}: {attr_path} is not callable (type {type(target).__name__})")
    try:
        module = target()
    except Exception as exc:  # a boundary: the user's factory may raise anything
        raise InputError(f"{spec}: calling the factory failed: {_first_line(exc)}") from exc
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"{spec}: the factory returned type {type(module).__name__}, not a torch.nn.Module")
    return module


def load_weights(module: Any, weights: str | os.PathLike) -> None:
    """Load a state_dict file into `module`, strictly; mismatches name a few keys."""
    import torch

    path = Path(weights)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a weights file")
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a boundary: unpickling a foreign file raises anything (KeyError on text)
        raise InputError(f"{path}: not a readable state_dict file ({_first_line(exc)})") from exc
    state_dict = _unwrap_state_dict(loaded, path)
    state_dict = _strip_prefix(state_dict, "module.", module.state_dict())
    _check_keys(module.state_dict(), state_dict, path)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. size mismatch for layer1.0.conv1.weight
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise InputError(f"{path}: weights do not fit the model: {'; '.join(details[:3]) or _first_line(exc)}") from exc


def _unwrap_state_dict(loaded: Any, path: Path) -> Mapping[str, Any]:
    import torch

    if isinstance(loaded, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise InputError(f"{path}: not a state_dict (a dict of parameter names to tensors, "
                         f"optionally under a {' or '.join(map(repr, _STATE_DICT_KEYS))} key)")
    return loaded


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str, reference: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop DataParallel's `module.` prefix when the model's own names lack it."""
    if all(k.startswith(prefix) for k in state_dict) and not any(k.startswith(prefix) for k in reference):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _check_keys(expected: Mapping[str, Any], given: Mapping[str, Any], path: Path) -> None:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    raise InputError(f"{path}: weights do not match the model: keys {', '.join(parts)}")


def _few(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _check_opset(opset: int) -> None:
    highest = _highest_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET or opset > highest:
        raise InputError(f"opset {opset!r} is not supported: use {MIN_OPSET} to {highest}")


def _highest_opset() -> int:
    """The newest opset torch's TorchScript exporter emits (23 with torch 2.13)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # private constant moved: let the exporter itself refuse
        return 10**6
    return int(ONNX_MAX_OPSET)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise InputError(f"invalid input shape {input_shape!r}: expected positive integers, e.g. 1,3,224,224")
    return shape


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Put `module` in eval mode, then give every submodule back its own training flag."""
    flags = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for sub, training in flags.items():
            sub.training = training


def _run_torch(module: Any, example: Any) -> list[np.ndarray]:
    import torch

    try:
        with torch.no_grad():
            result = module(example)
    except Exception as exc:  # a boundary: whatever the user's model raises, the shape is at fault
        raise InputError(f"the model fails on input shape {tuple(example.shape)}: {_first_line(exc)}") from exc
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    if not outputs or not all(isinstance(t, torch.Tensor) for t in outputs):
        raise InputError(f"the model must return a tensor or a tuple of tensors, not {type(result).__name__}")
    return [t.detach().float().numpy() for t in outputs]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter: Python warnings and prints, and the C++ side's writes to fds 1 and 2
    (on failure it dumps the whole TorchScript graph to stderr)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), _silence_fds(1, 2):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _silence_fds(*fds: int) -> Iterator[None]:
    for stream in (sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(fd) for fd in fds]
    except OSError:  # no real descriptors (embedded interpreters): Python-level silence only
        yield
        return
    with open(os.devnull, "wb") as sink:
        for fd in fds:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in zip(fds, saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def _torch_to_onnx(module: Any, example: Any, output_names: list[str], opset: int, *,
                   batch_axes: Sequence[int] | None = None) -> onnx.ModelProto:
    """`batch_axes`: each output's batch axis (1 for a time-major [T, N, C] output); None:
    a static batch."""
    import torch

    buffer = io.BytesIO()
    dynamic_axes = None
    if batch_axes is not None:
        dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}}
        dynamic_axes.update({name: {axis: BATCH_DIM} for name, axis in zip(output_names, batch_axes, strict=True)})
    try:
        with _quiet():
            torch.onnx.export(module, (example,), buffer, input_names=[INPUT_NAME], output_names=output_names,
                              opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes,
                              do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    except Exception as exc:  # a boundary: tracing runs the user's model; unsupported ops, opsets vary
        raise UnsupportedOpError(f"torch.onnx.export failed: {_first_line(exc)}") from exc
    return onnx.load_from_string(buffer.getvalue())


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes become initializers, and an Identity of an initializer its own copy.

    The exporter emits Clip bounds as Constant nodes and shares equal weights (e.g. two zero
    biases) through Identity nodes; a pass that rewrites one weight must not touch another.
    """
    initializers = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        tensor = _constant_value(node, initializers)
        if tensor is None or node.output[0] in graph_outputs:
            kept.append(node)
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = node.output[0]
        graph.initializer.append(copy)
        initializers[copy.name] = copy
    del graph.node[:]
    graph.node.extend(kept)


def _constant_value(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    value = constant_node_value(node)
    if value is not None:
        return numpy_helper.from_array(value)
    if node.op_type == "Identity" and not node.domain and node.input[0] in initializers:
        return initializers[node.input[0]]
    return None


def _session(proto: onnx.ModelProto) -> Any:
    """onnx.checker, then an onnxruntime session."""
    from .ortrun import ort_session

    try:
        onnx.checker.check_model(proto)
        return ort_session(proto)
    except (onnx.checker.ValidationError, InputError) as exc:  # ort_session words onnxruntime's errors
        raise VerificationError(f"the exported model does not run: {_first_line(exc)}") from exc


def _verify(session: Any, proto: onnx.ModelProto, example: np.ndarray, expected: list[np.ndarray]) -> float:
    """onnxruntime against torch; returns the max abs difference."""
    try:
        actual = session.run(None, {INPUT_NAME: example})
    except onnxruntime_errors() as exc:
        raise VerificationError(f"the exported model does not run: {_first_line(exc)}") from exc
    max_abs_diff = 0.0
    for name, want, got in zip(proto.graph.output, expected, actual, strict=True):
        if want.shape != got.shape:
            raise VerificationError(f"output {name.name!r}: onnxruntime shape {got.shape} != torch {want.shape}")
        diff = _relative_diff(want, got)
        if diff is None:
            diff = float(np.max(np.abs(want - got), initial=0.0))
            scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-12)
            raise VerificationError(f"output {name.name!r}: onnxruntime differs from torch by {diff:.3g} "
                                    f"(relative {diff / scale:.3g} > {RELATIVE_TOLERANCE:g})")
        max_abs_diff = max(max_abs_diff, diff)
    return max_abs_diff


def _relative_diff(want: np.ndarray, got: np.ndarray) -> float | None:
    """The max abs difference, or None when it is above RELATIVE_TOLERANCE of want's magnitude."""
    diff = float(np.max(np.abs(want - got), initial=0.0))
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-12)
    return diff if np.isfinite(diff) and diff / scale <= RELATIVE_TOLERANCE else None


def _trial_batch(example: np.ndarray) -> np.ndarray:
    """Another batch size (2, or 3 when exporting at 2): the example's first sample, then
    other random samples."""
    trial = 2 if example.shape[0] != 2 else 3
    others = np.random.default_rng(1).standard_normal((trial - 1, *example.shape[1:])).astype(example.dtype)
    return np.concatenate([example[:1], others])


def _batch_axes(module: Any, example: np.ndarray, expected: list[np.ndarray]) -> list[int]:
    """Each output's batch axis, read from torch at the trial batch: the one axis whose size
    follows the batch (0 for [N, ...], 1 for a time-major [T, N, C]); 0 where none or several do
    (the ONNX trial then says what is wrong)."""
    import torch

    batch = _trial_batch(example)
    try:
        trial = _run_torch(module, torch.from_numpy(batch))
    except InputError:  # a model that fixes its batch may fail here; the ONNX trial says so
        return [0] * len(expected)
    axes = []
    for want, got in zip(expected, trial, strict=True):
        moved = [axis for axis, (a, b) in enumerate(zip(want.shape, got.shape, strict=False))
                 if a == example.shape[0] and b == batch.shape[0]]
        axes.append(moved[0] if len(moved) == 1 and want.ndim == got.ndim else 0)
    return axes


def _batch_trial(session: Any, example: np.ndarray, expected: list[np.ndarray],
                 axes: Sequence[int]) -> str | None:
    """One run at another batch size; None when it behaves.

    Samples are independent in eval mode, so each output's first sample along its batch axis
    must equal the export-shape run's, and every output must have the trial batch there.
    """
    batch = _trial_batch(example)
    trial = batch.shape[0]
    try:
        actual = session.run(None, {INPUT_NAME: batch})
    except onnxruntime_errors() as exc:
        return f"onnxruntime fails at batch {trial}: {_first_line(exc)}"
    for want, got, axis in zip(expected, actual, axes, strict=True):
        wanted_shape = tuple(trial if i == axis else n for i, n in enumerate(want.shape))
        if tuple(got.shape) != wanted_shape:
            return f"at batch {trial} an output has shape {tuple(got.shape)}, not {wanted_shape}"
        if _relative_diff(np.take(want, [0], axis=axis), np.take(got, [0], axis=axis)) is None:
            return f"at batch {trial} the first sample's output changes"
    return None


__all__ = ["ExportResult", "export_model", "export_module", "load_factory", "load_weights"]
