"""EqualizeRangesPass: the channels of every stored map brought to one range, for int8 storage.

With `--int8` onnxruntime stores a projected map Z = P x in uint8 with one scale per
tensor, set by its range over the calibration data. A projection's channels differ in
range (PCA's by the square roots of the map's eigenvalues, the Fisher-weighted start's by
more: its U = M^-1/2 V_k gives the metric's weak directions large gains), and the widest
channel sets the step for all: the narrow ones keep a few of the 256 levels, and U hands
their rounding on with its gains. U P = (U D^-1)(D P) for every positive diagonal D, so
rescaling the rows of P and the columns of U changes nothing in float and moves each
channel's rounding. Rules:

a. For every projection, a_c: the largest |Z_c| of each channel c over the calibration
   part (at most `max_samples` samples), as the compressed network computes it: the torch
   executor with every projection in place.
b. d_c = g / a_c, g the geometric mean of the nonzero a_c (the map's overall scale is
   kept); a channel that is zero on every sample keeps d_c = 1. Then every channel spans
   the same range, and rounding noise of one step s per channel reaches the output as
   s^2 sum_c a_c^2 |u_c|^2 instead of s^2 a_max^2 sum_c |u_c|^2 (|u_c| the column norms of
   U, steps of a range normalised to 1). The rounding moves to U's weights, which int8
   stores per output channel: a column scaled down by d_c keeps fewer of its row's levels.
   PP-OCR's recognizer at 4x --int8 calibrated by MinMax (docs/results.md section 7): from
   the default start 52.0% -> 76.0% on its own lines (62.7% balancing a_c against U's
   column maxima, cross-layer equalization's rule); from the Fisher start (not the int8
   default) 31.0% -> 15.0% (halfway, d_c^1/2: 40.7%; the balance: 23.0%).
c. P <- D P, U <- U D^-1; the folding passes place them as they would the others (D is
   positive: it commutes with a ReLU after P as with any scaling).
d. The model is not changed: `ctx.projections` is replaced by the rescaled projections, and
   `ctx.equalized` (and `result.data`) gives per map `name` and `spread`, max a_c / min
   nonzero a_c before the pass (1.0: nothing to do). No projections or no calibration part:
   nothing changes.

compile runs it only with `--int8` (fmcompress/compiler.py), after the fit and the map costs.
Entry point: `EqualizeRangesPass().run(model, ctx)`.
"""

from __future__ import annotations

import numpy as np

from fmcompress.featuremaps import Projection

from .base import Pass, PassContext, PassResult
from .fit import torch_executor
from .graph import Model

MAX_SAMPLES = 256  # rule a: the ranges of a few hundred samples; one forward pass of them
BATCH = 16


class EqualizeRangesPass(Pass):
    """Rules a-d: P's rows and U's columns rescaled so that every channel of P x spans one range."""

    name = "equalize-ranges"
    requires = ("projections", "projected_graph", "calibration")
    provides = ("equalized",)  # and rewrites `projections` (rule d), as SinkConcatPass refines the plan

    def __init__(self, max_samples: int = MAX_SAMPLES):
        self.max_samples = max_samples

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        calibration = ctx.calibration
        if not ctx.projections or calibration is None or len(calibration) == 0:
            ctx.equalized = []
            return PassResult(model, modified=False, data=ctx.equalized)
        peaks = stored_peaks(ctx.projected_graph.proto(), ctx.projections, calibration.head(self.max_samples),
                             ctx.batch_size or BATCH)
        ctx.equalized = []
        for name, projection in list(ctx.projections.items()):
            ctx.projections[name], spread = equalized(projection, peaks[name])
            ctx.equalized.append({"name": name, "spread": spread})
        widest = max(ctx.equalized, key=lambda entry: entry["spread"])
        ctx.log(f"equalized the channel ranges of {len(ctx.equalized)} stored map(s) for int8 (widest spread "
                f"{widest['spread']:.1f}x, {widest['name']})")
        return PassResult(model, modified=False, data=ctx.equalized)


def equalized(projection: Projection, peaks: np.ndarray) -> tuple[Projection, float]:
    """Rules b and c for one projection, given each channel's a_c; (the rescaled one, the spread)."""
    live = peaks > 0
    if not live.any():
        return projection, 1.0
    scale = np.ones_like(peaks, dtype=np.float64)
    scale[live] = np.exp(np.log(peaks[live]).mean()) / peaks[live]
    spread = float(peaks[live].max() / peaks[live].min())
    P = (projection.P.astype(np.float64) * scale[:, None]).astype(np.float32)  # noqa: N806 - the paper's names
    U = (projection.U.astype(np.float64) / scale[None, :]).astype(np.float32)  # noqa: N806
    return Projection(P=P, U=U), spread


def stored_peaks(model, projections: dict[str, Projection], data, batch: int) -> dict[str, np.ndarray]:
    """Rule a: per projected map, the largest |P x| of each channel over `data`."""
    import torch

    executor = torch_executor(model)
    taps = {name: _peak_tap(projection) for name, projection in projections.items()}
    for name, tap in taps.items():
        executor.set_transform(name, tap)
    with torch.no_grad():
        for inputs in data.torch_batches(batch, list(executor.input_names)):
            executor(*inputs)
    return {name: tap.peak.numpy() for name, tap in taps.items()}


def _peak_tap(projection: Projection):
    """The projection as the executor applies it (`ChannelProjection`), recording each stored
    channel's largest |P x| as it passes (rule a)."""
    import torch

    from fmcompress.backend.projection import ChannelProjection, mix_channels

    class PeakTap(ChannelProjection):
        def __init__(self):
            super().__init__(projection.P, projection.U)
            self.peak = torch.zeros(projection.P.shape[0], dtype=torch.float64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stored = mix_channels(self.P, x)
            reduce = [axis for axis in range(stored.dim()) if axis != 1]
            self.peak = torch.maximum(self.peak, stored.abs().amax(dim=reduce).to(torch.float64))
            return mix_channels(self.U, stored)

    return PeakTap()
