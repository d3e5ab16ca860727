"""The output's Fisher information at each planned map: which directions of a map the network's
predictions depend on.

Used by the block stage's `fisher` start (`blockwise.py` rule a). Rules:

a. One forward pass of the *original* network over the calibration batches and `draws`
   backward passes (rule b), with every map's value tapped (an identity whose backward records
   the gradient there): the gradient flows from the outputs through every map at once, so
   all maps cost one pass.
b. What is differentiated, for class outputs (`probs`, `seq_probs`, `logits`; q the network's
   own probabilities per row and time step at the distillation loss's temperature T, q =
   softmax(scores / T), held fixed): T times the sum over rows and classes of
   r_c sqrt(q_c) log q_c, with random signs r_c = +-1 drawn from `seed`. Its gradient at the
   scores is v = sum_c r_c sqrt(q_c) (e_c - q), and E[v v^T] = diag(q) - q q^T, the Hessian
   of T^2 KL(q || q'), the loss the block stage's output blocks and the end-to-end phase
   minimise (`losses.py` rule b; at T = 1 the softmax's Fisher information), so E[g g^T] is
   that loss's expected curvature at the map, at the original (not its noise), every class
   in every draw. Drawing one class per row from q instead (the usual Monte-Carlo Fisher) is
   unbiased too, but mostly draws the likely class, whose gradient is near zero, and now and
   then a rare one with a large gradient: on a small classifier one such draw was 99% off the
   exact Fisher (relative Frobenius norm) and 256 draws 16% (before rule c's unit-energy
   samples); one draw of signs is 9% off what rules b and c estimate (computed exactly over
   every pattern of signs), 64 draws 1% (tests/test_fisher.py). `regression` outputs take
   a random Gaussian direction scaled by the output's RMS instead (Hutchinson's estimate of
   J^T J, the curvature of the scaled MSE). `draws` > 1 sums several draws, one backward pass each
   (`train_config.FISHER_DRAWS`, compile's `fisher_draws`): on the recognizer a draw's
   backward pass costs about 10 s; one draw a batch or eight instead of four were not better
   on both sets of lines (docs/results.md section 1).
c. Per map, sum g g^T over channel vectors (float64), at most 4096 random positions a
   batch, drawn from `seed` (`projection.SecondMomentRecorder`, as the start's other
   moments). Where every output is a class output, each sample's g is scaled to unit energy
   first (`unit_energy_scale`, applied to the sampled vectors only): the metric is the mean
   over samples of the directions each one's predictions depend on, not their sum, which the
   few samples the network is least sure of rule (a confident prediction has almost no curvature, and yet a map compressed
   4x moves it far). On PP-OCR's recognizer, 64 lines of set 2, one line held 59-63% of the
   plain sum's trace at three maps and six lines 92-95% (at T = 2, 32-40% and 74-88%): its
   metric was a handful of lines'. Each sample alike, the recognizer at 4x lost a quarter as
   much on its calibration set's held-out lines and held 2-3 points better on the other set
   (docs/results.md section 1). A regression output's curvature J^T J does not fade with
   confidence, and its sum stays plain: YOLOv8n at 4x scored an output cosine of 0.99911
   with every sample alike against 0.99917.
d. `metric_roots` turns a moment into M^(1/2) and M^(-1/2) (`floored_metric` into M itself) of
   M normalised to mean eigenvalue 1 plus `METRIC_FLOOR`: directions the outputs never depend on keep a small weight, so the
   weighted regression stays well posed on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fmcompress.train_config import FISHER_DRAWS

from .losses import log_probs, output_kinds
from .projection import SecondMomentRecorder
from .schedule import mix_seeds

METRIC_FLOOR = 0.1  # rule d, relative to the mean eigenvalue (1e-2 lost 3.6 points on the recognizer, set 1)


class _GradientTap(nn.Module):
    """Identity whose backward hands the gradient (with `unit_energy`, each sample's at unit
    energy) to a SecondMomentRecorder (rule c)."""

    def __init__(self, channels: int, seed: int):
        super().__init__()
        self.recorder = SecondMomentRecorder(channels, seed=seed, stop=False)
        self.unit_energy = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x.register_hook(self._record)
        return x

    def _record(self, gradient: torch.Tensor) -> None:
        # only the sampled vectors are scaled: the whole gradient is read once, for its norms
        gradient = gradient.detach()
        self.recorder(gradient, unit_energy_scale(gradient) if self.unit_energy else None)


def unit_energy_scale(x: torch.Tensor) -> torch.Tensor:
    """Per sample (axis 0), the factor that scales it to a sum of squares of 1 (an all-zero
    sample: a finite factor, so it stays 0). One reduction over x's memory as it lies (a
    channels-last gradient is not copied)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    norms = torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), dtype=dtype)
    return norms.clamp_min(1e-15).reciprocal()


def output_fisher(original: nn.Module, maps: Sequence[tuple[str, int]],
                  batches: Sequence[tuple[torch.Tensor, ...]], seed: int = 0, draws: int = FISHER_DRAWS,
                  temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Rules a-c: sum g g^T per (map name, channels) of `maps`, over `draws` draws of the outputs;
    `original` (an OnnxModule without transforms) is left without them."""
    generator = torch.Generator().manual_seed(mix_seeds(seed, 7))
    taps = {name: _GradientTap(channels, mix_seeds(seed, 7, i)) for i, (name, channels) in enumerate(maps)}
    for name, tap in taps.items():
        original.set_transform(name, tap)
    try:
        kinds = None
        for inputs in batches:
            # the inputs take the gradient, so that every value after them carries one to its map
            inputs = tuple(v.detach().clone().requires_grad_(v.is_floating_point()) for v in inputs)
            outputs = original(*inputs)
            if kinds is None:
                kinds = output_kinds(outputs)
                for tap in taps.values():  # rule c: class outputs only
                    tap.unit_energy = "regression" not in kinds
            terms = [_DrawTerms.of(out, kind, temperature) for out, kind in zip(outputs, kinds, strict=True)]  # once a batch
            for draw in range(draws):
                total = torch.stack([term.draw(generator) for term in terms]).sum()
                if total.requires_grad:  # no float input reaches the outputs: every moment stays 0 (plain lstsq)
                    total.backward(retain_graph=draw + 1 < draws)
    finally:
        original.clear_transforms()
    return {name: tap.recorder.moment for name, tap in taps.items()}


class _DrawTerms:
    """Rule b for one output: what every draw differentiates (log p as rows of classes, or a
    regression output) and its fixed weights (sqrt(q_c) and T, or the output's RMS), computed once
    a batch; `draw` adds only the random signs or direction."""

    def __init__(self, values: torch.Tensor, magnitude: torch.Tensor | None, divisor: torch.Tensor | None,
                 scale: float = 1.0):
        self.values, self.magnitude, self.divisor, self.scale = values, magnitude, divisor, scale

    @classmethod
    def of(cls, out: torch.Tensor, kind: str, temperature: float = 1.0) -> _DrawTerms:
        if kind == "regression":
            return cls(out.float(), None, out.detach().float().pow(2).mean().sqrt().clamp_min(1e-12))
        log_q = log_probs(out, kind, temperature)  # log q, q = softmax(scores / T)
        rows = log_q.reshape(-1, log_q.shape[-1])
        # d log q / d scores = (e_c - q) / T: times T, E[v v^T] = diag(q) - q q^T, the Hessian of T^2 KL
        return cls(rows, rows.detach().exp().sqrt(), None, temperature)

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        device = self.values.device
        if self.magnitude is None:
            direction = torch.randn(self.values.shape, generator=generator).to(device)
            return (self.values * direction).sum() / self.divisor
        signs = torch.randint(0, 2, self.values.shape, generator=generator).to(device) * 2.0 - 1.0
        return (self.values * (self.magnitude * signs)).sum() * self.scale


def metric_roots(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule d: (M^(1/2), M^(-1/2)), float64."""
    values, vectors = _floored_eigen(moment)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def floored_metric(moment: torch.Tensor) -> torch.Tensor:
    """Rule d: M itself, float64 (the block loss's e^T M e)."""
    values, vectors = _floored_eigen(moment)
    return (vectors * values) @ vectors.T


def _floored_eigen(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule d: the eigenvalues and eigenvectors of the moment normalised to mean eigenvalue 1,
    the eigenvalues raised by METRIC_FLOOR."""
    metric = moment.to(torch.float64)
    metric = (metric + metric.T) / 2
    metric = metric / (torch.trace(metric) / metric.shape[0]).clamp_min(1e-30)
    values, vectors = torch.linalg.eigh(metric)
    return values.clamp_min(0) + METRIC_FLOOR, vectors
