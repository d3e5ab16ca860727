"""EqualizeRangesPass: the channels of every stored map brought to one range, for int8.

With `--int8` onnxruntime stores a projected map Z = P x in uint8 with one scale per
tensor, set by its range over the calibration data. U P = (U A^-1)(A P) for every
invertible k x k A: the fit fixes the product, not the basis of the stored channels nor
their scales, and in float they change nothing. In uint8 they decide what the rounding
costs: the widest channel sets the step for all, and U hands each channel's rounding on
with its column's gain (PCA's channels differ in range by the square roots of the map's
eigenvalues, the Fisher-weighted start's by more: its U = M^-1/2 V_k gives the metric's
weak directions large gains). Rules:

a. Optional (`BASIS = "principal"`; by default the fit's basis is kept): the principal
   basis. Per projection, E[z z^T] of z = P x over the calibration part (at most
   `max_samples` samples), as the compressed network computes it (the torch executor
   with every projection in place); U = Q R (QR), R E[z z^T] R^T = V diag(lambda) V^T,
   U' = Q V, P' = V^T R P. U' is orthonormal and P' x decorrelated (lambda, strongest
   first): the stored channels are the principal axes of the reconstruction U P x, so
   rounding them adds error of the reconstruction's own power, not the fitted basis's
   gains. It did not pay on PP-OCR's models at 4x --int8 (docs/results.md section 7): the
   recognizer calibrated on set 1's lines by MinMax ranges, set 1 / set 2, from the Fisher
   start 79.0% / 63.7% -> 82.0% / 63.3%, from the lstsq start 88.7% / 35.0% -> 88.3% / 40.7%;
   calibrated on set 2's (`--calibrate auto`), from the Fisher start 87.0% / 88.0% -> 82.3% /
   88.7%; the classifier over four draws, 1.6 / 3.1 points lost on average -> 1.9 / 4.0.
b. Then, per projection, a_c: the largest |Z_c| of each channel c over the same samples.
c. d_c = g / a_c, g the geometric mean of the nonzero a_c (the map's overall scale is
   kept); a channel that is zero on every sample keeps d_c = 1. Then every channel spans
   the same range, and rounding noise of one step s per channel reaches the output as
   s^2 sum_c a_c^2 |u_c|^2 instead of s^2 a_max^2 sum_c |u_c|^2 (|u_c| the column norms of
   U, steps of a range normalised to 1). The rounding moves to U's weights, which int8
   stores per output channel: a column scaled down by d_c keeps fewer of its row's levels.
   On the recognizer as fitted (without rule a; MinMax; before the pointwise placement):
   from the lstsq start 52.0% -> 76.0% on its own lines (62.7% balancing a_c against U's column maxima, cross-layer
   equalization's rule); from the Fisher start 31.0% -> 15.0% (halfway, d_c^1/2: 40.7%).
d. P <- D A P, U <- U A^-1 D^-1 (A = I without rule a); the folding passes place them as
   they would the others (every rule of passes/fold.py is linear in P and U; no nonlinear
   op sits between them).
e. The model is not changed: `ctx.projections` is replaced by the re-factored projections,
   and `ctx.equalized` (and `result.data`) gives per map `name` and `spread`, max a_c / min
   nonzero a_c before rule c (1.0: nothing to do). No projections or no calibration part:
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

BASIS = "fitted"  # rule a: "principal" re-factors each U P first (docs/results.md section 7 measures both)
MAX_SAMPLES = 256  # rules a, b: the moments and ranges of a few hundred samples; a forward pass each
BATCH = 16


class EqualizeRangesPass(Pass):
    """Rules a-e: P's rows and U's columns rescaled so that every channel of P x spans one range."""

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
        data, batch = calibration.head(self.max_samples), ctx.batch_size or BATCH
        graph = ctx.projected_graph.proto()
        if BASIS == "principal":
            moments = stored_moments(graph, ctx.projections, data, batch)
            for name, projection in list(ctx.projections.items()):
                ctx.projections[name] = principal_basis(projection, moments[name])
        peaks = stored_peaks(graph, ctx.projections, data, batch)
        ctx.equalized = []
        for name, projection in list(ctx.projections.items()):
            ctx.projections[name], spread = equalized(projection, peaks[name])
            ctx.equalized.append({"name": name, "spread": spread})
        widest = max(ctx.equalized, key=lambda entry: entry["spread"])
        basis = " in their principal basis" if BASIS == "principal" else ""
        ctx.log(f"equalized the channel ranges of {len(ctx.equalized)} stored map(s){basis} for int8 (widest "
                f"spread {widest['spread']:.1f}x, {widest['name']})")
        return PassResult(model, modified=False, data=ctx.equalized)


def equalized(projection: Projection, peaks: np.ndarray) -> tuple[Projection, float]:
    """Rules c and d for one projection, given each channel's a_c; (the rescaled one, the spread)."""
    live = peaks > 0
    if not live.any():
        return projection, 1.0
    scale = np.ones_like(peaks, dtype=np.float64)
    scale[live] = np.exp(np.log(peaks[live]).mean()) / peaks[live]
    spread = float(peaks[live].max() / peaks[live].min())
    P = (projection.P.astype(np.float64) * scale[:, None]).astype(np.float32)  # noqa: N806 - the paper's names
    U = (projection.U.astype(np.float64) / scale[None, :]).astype(np.float32)  # noqa: N806
    return Projection(P=P, U=U), spread


def principal_basis(projection: Projection, moment: np.ndarray) -> Projection:
    """Rule a for one projection, given E[z z^T] of its stored channels z = P x."""
    U, P = projection.U.astype(np.float64), projection.P.astype(np.float64)  # noqa: N806 - the paper's names
    Q, R = np.linalg.qr(U)  # noqa: N806
    V = np.linalg.eigh(R @ moment @ R.T)[1][:, ::-1]  # noqa: N806 - strongest first
    return Projection(P=(V.T @ R @ P).astype(np.float32), U=(Q @ V).astype(np.float32))


def stored_moments(model, projections: dict[str, Projection], data, batch: int) -> dict[str, np.ndarray]:
    """Rule a: per projected map, E[z z^T] of its stored channels z = P x over `data`, every
    position, in float64 (not backend.projection.SecondMomentRecorder: its float32 product
    loses the weak channels of an ill-conditioned fitted basis, which are what rule a is for)."""
    import torch

    class MomentRecorder:
        def __init__(self, projection: Projection):
            channels = projection.P.shape[0]
            self.moment, self.count = torch.zeros(channels, channels, dtype=torch.float64), 0

        def __call__(self, stored: torch.Tensor) -> None:
            flat = stored.transpose(0, 1).reshape(stored.shape[1], -1).to(torch.float64)
            self.moment += flat @ flat.T
            self.count += flat.shape[1]

    recorders = _tap_stored(model, projections, data, batch, MomentRecorder)
    return {name: (recorder.moment / max(recorder.count, 1)).numpy() for name, recorder in recorders.items()}


def stored_peaks(model, projections: dict[str, Projection], data, batch: int) -> dict[str, np.ndarray]:
    """Rule b: per projected map, the largest |P x| of each channel over `data`."""
    import torch

    class PeakRecorder:
        def __init__(self, projection: Projection):
            self.peak = torch.zeros(projection.P.shape[0], dtype=torch.float64)

        def __call__(self, stored: torch.Tensor) -> None:
            reduce = [axis for axis in range(stored.dim()) if axis != 1]
            self.peak = torch.maximum(self.peak, stored.abs().amax(dim=reduce).to(torch.float64))

    recorders = _tap_stored(model, projections, data, batch, PeakRecorder)
    return {name: recorder.peak.numpy() for name, recorder in recorders.items()}


def _tap_stored(model, projections: dict[str, Projection], data, batch: int, recorder) -> dict:
    """Runs `data` through `model` with every projection applied as the executor applies it
    (`ChannelProjection`), handing each stored map P x as it passes to `recorder(projection)`,
    one made per map; the recorders by map name."""
    import torch

    from fmcompress.backend.projection import ChannelProjection, mix_channels

    class Tap(ChannelProjection):
        def __init__(self, projection: Projection):
            super().__init__(projection.P, projection.U)
            self.record = recorder(projection)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stored = mix_channels(self.P, x)
            self.record(stored)
            return mix_channels(self.U, stored)

    executor = torch_executor(model)
    taps = {name: Tap(projection) for name, projection in projections.items()}
    for name, tap in taps.items():
        executor.set_transform(name, tap)
    with torch.no_grad():
        for inputs in data.torch_batches(batch, list(executor.input_names)):
            executor(*inputs)
    return {name: tap.record for name, tap in taps.items()}
