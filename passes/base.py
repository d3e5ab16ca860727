"""The pass interface shared by every graph pass, and a pipeline runner.

A pass is a small object with one entry point, `run(model, ctx) -> PassResult`
(also reachable as `pass_(model, ctx)`). It reads options from its constructor
and shared facts (input shapes, bytes per element, earlier passes' results) from
the `PassContext`. A pass that rewrites the graph returns the new model with
`modified=True`; an analysis pass returns the model unchanged and puts what it
found in `result.data`. The pipeline stores every pass's data in
`ctx.results[pass.name]`, so later passes can read what earlier ones found.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import onnx


@dataclass
class PassContext:
    """Facts shared by the passes of one pipeline run."""

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    act_bytes: int | None = None  # overrides the stored dtype's bytes per element
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per pass name, set by Pipeline
    log: Callable[[str], None] = lambda message: None


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool = False
    data: Any = None


class Pass:
    """Base class: subclasses set `name` and implement `run`."""

    name: str = "pass"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        return self.run(model, ctx if ctx is not None else PassContext())


class Pipeline:
    """Runs passes in order, feeding each the model the previous one returned."""

    def __init__(self, passes: Iterable[Pass]):
        self.passes = list(passes)

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> tuple[onnx.ModelProto, PassContext]:
        ctx = ctx if ctx is not None else PassContext()
        for pass_ in self.passes:
            started = time.perf_counter()
            result = pass_.run(model, ctx)
            model = result.model
            ctx.results[pass_.name] = result.data
            ctx.timings[pass_.name] = ctx.timings.get(pass_.name, 0.0) + time.perf_counter() - started
        return model, ctx
