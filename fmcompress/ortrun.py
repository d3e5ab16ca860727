"""onnxruntime at the edges of the passes: a CPU session, and a model run over a dataset's
batches with each output's batch axis found and the batches joined along it.

Rules:
a. Sessions run on the CPU with every graph optimisation on; a model onnxruntime
   cannot load is an InputError naming why.
b. An output's batch axis is where the inputs' batch goes: the output dim declared with
   the inputs' fixed batch size or their batch name, else the axis that grows from 1 to
   2 samples in a probe run, else 0 (a time-major [T, N, C] output's batch is axis 1).
c. Batches are joined along that axis; padded chunks of a graph fixed at batch B are
   trimmed back to the samples given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError, onnxruntime_errors

ModelLike = onnx.ModelProto | bytes | str | Path


# ---------------------------------------------------------------------- sessions


_LEVELS = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def ort_level(level: str) -> ort.GraphOptimizationLevel:
    """onnxruntime's graph optimisation level by its name here (`extended`, `all`, `basic`, `none`)."""
    if level not in _LEVELS:
        raise InputError(f"unknown onnxruntime optimisation level {level!r}; available: {', '.join(_LEVELS)}")
    return _LEVELS[level]


def ort_session(model: ModelLike, threads: int | None = None, level: str = "all") -> ort.InferenceSession:
    """An onnxruntime CPU session, all graph optimizations on unless `level` says otherwise."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a refusal is said in our own one line
    options.graph_optimization_level = ort_level(level)
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


def session_feeds(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [meta.name for meta in session.get_inputs()]
    missing = [name for name in names if name not in feeds]
    if missing:
        raise InputError(f"no data for model input(s) {', '.join(missing)} (have: {', '.join(feeds) or 'none'})")
    return {name: feeds[name] for name in names}


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
        feeds = session_feeds(session, batch[0] if isinstance(batch, tuple) else batch)
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
