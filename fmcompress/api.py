"""The Python API: `analyze`, `compile`, `export`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields, replace

import onnx

from .compiler import CompileOptions, CompileResult, build_context, compile_model, source_name
from .modelio import load_model
from .passes.memory import MemoryAnalysisPass
from .passes.runtime import RuntimeMemoryPass
from .reports.analysis import AnalysisReport
from .train_config import TrainConfig
from .units import Ceiling, parse_ceiling


def analyze(model: str | os.PathLike | onnx.ModelProto, *, ceiling: str | Ceiling | None = None,
            input_shapes: Sequence[str] | dict[str, Sequence[int]] | None = None,
            act_bytes: int | None = None, runtime: str | None = None) -> AnalysisReport:
    """Run the memory analysis pass: every stored feature map, and which are above `ceiling`.

    `ceiling` is `"256KB"`, `"4x"`, ... or a Ceiling; `input_shapes` pins symbolic dims,
    as `{"x": (1, 3, 224, 224)}` or CLI-style `["x=1,3,224,224"]`. With `runtime` (an
    onnxruntime optimisation level: "extended", "all", "basic", "none") the report's
    `runtime` view lists what onnxruntime allocates (passes/runtime.py), against the same ceiling.
    """
    proto = load_model(model)
    if isinstance(ceiling, str):
        ceiling = parse_ceiling(ceiling)
    ctx = build_context(proto, input_shapes, act_bytes)
    report = MemoryAnalysisPass(ceiling, source=source_name(model))(proto, ctx).data
    if runtime is not None:
        report.runtime = RuntimeMemoryPass(runtime, report.ceiling_bytes)(proto, ctx).data
    return report


def compile(model: str | os.PathLike | onnx.ModelProto, *, ceiling: str | Ceiling | None = None,  # noqa: A001
            plan_only: bool = False, **options) -> CompileResult:
    """Compress `model` so that every stored feature map fits under `ceiling` (and/or, with
    `traffic="3x"`, their total under that budget; `objective="traffic+latency"`).

    Options are those of `CompileOptions` (input_shapes, act_bytes, method, data,
    num_samples, mean, std, scale, batch_size, seed, min_agreement, ...) and of
    `fmcompress.train_config.TrainConfig` for the learned and random methods (epochs, lr,
    loss, schedule, target, ...). Returns a CompileResult whose `model` is the verified
    ONNX model and `report` the compile report; nothing is written to disk.
    """
    training_fields = {f.name for f in fields(TrainConfig)} - {"batch_size", "seed"}
    training = {key: options.pop(key) for key in list(options) if key in training_fields}
    if training:
        options["training"] = replace(options.get("training", TrainConfig()), **training)
    return compile_model(model, CompileOptions(ceiling=ceiling, **options), plan_only=plan_only)


def export(source: str, input_shape: Sequence[int], output: str | os.PathLike, **options):
    """Export a zoo model or `pkg.module:factory` to ONNX (see `fmcompress.frontend.export_model`)."""
    from .frontend import export_model

    return export_model(source, tuple(input_shape), output, **options)
