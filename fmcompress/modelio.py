"""Loading and saving ONNX models safely: clear errors on bad files, atomic writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError

TWO_GB = 2**31


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model, turning every way a file can be wrong into an InputError."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX model")
    size = path.stat().st_size
    if size >= TWO_GB:
        raise InputError(f"{path}: {size} bytes is over the 2 GB protobuf limit; not supported")
    if size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not model.graph.node or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph nodes or no opset)")
    if any(_uses_external_data(t) for t in _all_initializers(model.graph)):
        raise InputError(f"{path}: models with external data are not supported; save the weights inside the .onnx file")
    return model


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_initializers(sub)


def _uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write to a temporary file beside `path`, then rename: no partial output, ever."""
    write_bytes_atomic(model.SerializeToString(), path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
