"""QuantizablePass: the input model through onnxruntime's quantization before any fitting.

compile --int8 runs it after the data are prepared, before the fit. Rules:

a. fmcompress/int8.py's flow (its rule a, `quantize_int8`) runs on the input model and one
   calibration batch: a refusal (its rules a and c: a model onnxruntime's tools refuse, a
   model that is not float32) costs seconds, not a training run.
b. The int8 model is thrown away: the pass returns its input unchanged (QuantizePass
   quantizes the verified model later).

Entry point: `QuantizablePass().run(model, ctx)`.
"""

from __future__ import annotations

from fmcompress.int8 import check_float32, quantize_int8

from .base import Pass, PassContext, PassResult
from .graph import Model


class QuantizablePass(Pass):
    """Rule a: fmcompress/int8.py's rule a on the input model and one calibration batch, before
    any fitting, so that a model onnxruntime's tools refuse is refused in seconds, not after the
    training."""

    name = "quantizable"
    requires = ("calibration",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        proto = model.proto()
        check_float32(proto)
        first = next(iter(ctx.calibration.batches(ctx.batch_size or 1)))[0]
        quantize_int8(proto, [first], input_shapes=ctx.input_shapes)
        return PassResult(model, modified=False)
