"""PrepareDataPass: the samples compile fits, verifies and measures on, and the batch size.

Rules:

a. The samples come from `data` (an .npz, an image folder, a named set, or None for
   the surrogate photographs; fmcompress.data), shaped for the model's inputs at the
   pinned input shapes, normalised by `mean`, `std`, `scale`; labels are checked
   against the classes of a classifier's first output ([N, classes] in `ctx.before`).
b. At least two samples: a calibration part and a held-out part, split at random
   (`held_out_fraction`, `seed`); the held-out part is never trained on.
c. The batch size is the one asked for, or 1 when the graph fixes its batch
   dimension (said in `ctx.warnings`).
d. What the data lacks (too few samples, no labels for a gate) is said in
   `ctx.warnings`.
e. Where the model states the range its image input expects (a leading normalisation in
   the graph, or metadata; fmcompress.input_range), calibration samples that clearly miss
   it are said in `ctx.warnings`, with the `--scale`/`--mean`/`--std` that fit.

The model is not changed; the pass sets `ctx.dataset`, `ctx.calibration`,
`ctx.held_out` and `ctx.batch_size`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnx

from fmcompress.data import (
    DEFAULT_MEAN,
    DEFAULT_SCALE,
    DEFAULT_STD,
    Dataset,
    data_warnings,
    input_specs,
    load_dataset,
)
from fmcompress.errors import InputError
from fmcompress.input_range import input_range_warnings
from fmcompress.ortrun import batch_is_free

from .base import Pass, PassContext, PassResult
from .graph import Model


@dataclass
class DataOptions:
    """Where compile's samples come from and how they are split (rule a, b)."""

    data: str | os.PathLike | None = None  # .npz, image folder, named set, or None for the surrogate set
    num_samples: int = 256
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    scale: float = DEFAULT_SCALE
    held_out_fraction: float = 0.25
    batch_size: int = 16
    seed: int = 0


class PrepareDataPass(Pass):
    """Loads and splits the samples; picks the batch size the graph allows."""

    name = "prepare-data"
    requires = ("before",)
    provides = ("dataset", "calibration", "held_out", "batch_size")

    def __init__(self, options: DataOptions):
        self.options = options

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        proto = model.proto()
        ctx.batch_size = fitting_batch_size(proto, ctx, self.options.batch_size)
        ctx.dataset = load_samples(proto, ctx, self.options, num_classes(proto, ctx.before.tensor_shapes))
        ctx.calibration, ctx.held_out = ctx.dataset.split(self.options.held_out_fraction,
                                                          seed=self.options.seed)
        ctx.warnings += data_warnings(ctx.dataset, ctx.held_out)
        ctx.warnings += input_range_warnings(proto, ctx.calibration.inputs)
        return PassResult(model, modified=False, data=ctx.dataset)


def fitting_batch_size(model: onnx.ModelProto, ctx: PassContext, requested: int) -> int:
    """Rule c."""
    if requested == 1 or batch_is_free(model, input_specs(model, ctx.input_shapes)):
        return requested
    ctx.warnings.append("the model only runs at batch 1 (its graph fixes the batch dimension): "
                        "calibrating and measuring one sample at a time")
    return 1


def load_samples(model: onnx.ModelProto, ctx: PassContext, options: DataOptions,
                 classes: int | None) -> Dataset:
    """Rules a and b (the split aside)."""
    specs = input_specs(model, ctx.input_shapes)
    dataset = load_dataset(options.data, specs, num_samples=options.num_samples, mean=options.mean,
                           std=options.std, scale=options.scale, seed=options.seed, num_classes=classes)
    if len(dataset) < 2:
        raise InputError(f"need at least 2 samples of data (a calibration and a held-out part), "
                         f"got {len(dataset)}")
    skipped = f", {dataset.skipped} unreadable file(s) skipped" if dataset.skipped else ""
    ctx.log(f"data: {len(dataset)} sample(s) from {dataset.source}{skipped}")
    return dataset


def num_classes(model: onnx.ModelProto, tensor_shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Classes of a classifier's first output ([N, classes]), to check labels against."""
    first = tensor_shapes.get(model.graph.output[0].name)
    return int(first[1]) if first is not None and len(first) == 2 else None


class HeldOutPass(Pass):
    """Base of the passes that compare the emitted model with the original on held-out data
    (verify, measure): the constructor's original, samples and batch size, else the
    pipeline's (`ctx.original`, `ctx.held_out`, `ctx.batch_size`)."""

    original: onnx.ModelProto | None
    held_out: Dataset | None
    batch_size: int | None

    @property
    def requires(self) -> tuple[str, ...]:
        return ("held_out",) if self.held_out is None else ()

    def _take_held_out(self, ctx: PassContext) -> None:
        self.original = self.original if self.original is not None else ctx.original
        self.held_out = self.held_out if self.held_out is not None else ctx.held_out
        if self.held_out is None:
            raise InputError(f"the {self.name} pass needs held-out data: run PrepareDataPass first or pass it")
        self.batch_size = self.batch_size or ctx.batch_size or 16
