"""The losses of learned projections: what the student is compared with, per output.

Used by end-to-end training (`trainer.py`) and block reconstruction (`blockwise.py`).
Rules:

a. The kind of each output comes from the teacher's output on the first batch
   (`output_kinds`):
   * `[N, K]` class scores: `logits`, or `probs` when the rows are >= 0 and sum to 1;
   * `[N, T, K]` rows summing to 1 (CTC and other sequence heads): `seq_probs`;
   * anything else (detection maps, box regressions): `regression`.
b. Class and sequence outputs: KL divergence at temperature T (soft targets, times
   T^2), per row and per time step; probabilities are turned back into log-probs,
   floored at `PROBABILITY_FLOOR`. Regression outputs: MSE divided by the teacher's
   mean square, so outputs of any scale weigh alike. The terms are averaged over outputs
   (`distillation_loss`).
c. `ce` replaces KD with cross-entropy on the labels (class outputs only), `kd+ce` adds
   both (`label_loss`).
d. `feature_weight` adds feature-level distillation at the projected maps: the mean over
   maps of ||U P x - t||^2 / ||t||^2, where t is the map the teacher computed there from
   the same batch (`feature_reference` `teacher`: the student is told where errors from
   earlier maps took it, at every map), or x itself (`self`: each projection's own
   reconstruction error). `trainer.LearnedProjection` keeps that error per map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention

from fmcompress.errors import InputError
from fmcompress.metrics import is_sequence_head, rows_are_distributions

PROBABILITY_FLOOR = 1e-8  # probabilities below it are alike to the KD loss (see log_probs)


def output_kinds(outputs: Sequence[torch.Tensor]) -> list[str]:
    """Rule a: `logits`, `probs`, `seq_probs` or `regression` per output."""
    kinds = []
    for out in outputs:
        # only class-shaped outputs are copied to numpy for the test (not, say, a detection map)
        if out.dim() == 2 and out.shape[1] >= 2:
            kinds.append("probs" if rows_are_distributions(out.detach().float().cpu().numpy()) else "logits")
        elif out.dim() == 3 and is_sequence_head(out.detach().float().cpu().numpy()):
            kinds.append("seq_probs")
        else:
            kinds.append("regression")
    return kinds


def log_probs(out: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """Log-probabilities over the last axis at `temperature`, as the KD loss compares them."""
    # the floor is chosen by measurement, not a guard: a recognizer's many near-zero class
    # probabilities are its tails, and matching them exactly costs accuracy (docs/results.md)
    scores = out.float().clamp_min(PROBABILITY_FLOOR).log() if kind in ("probs", "seq_probs") else out.float()
    return F.log_softmax(scores / temperature, dim=-1)


def distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], kinds: Sequence[str],
                      temperature: float) -> torch.Tensor:
    """Rule b's KD/MSE terms, averaged over outputs."""
    terms = []
    for s, t, kind in zip(student, teacher, kinds, strict=True):
        if kind == "regression":
            terms.append(F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12))
            continue
        log_s, log_t = log_probs(s, kind, temperature), log_probs(t, kind, temperature)
        per_row = F.kl_div(log_s.reshape(-1, log_s.shape[-1]), log_t.reshape(-1, log_t.shape[-1]),
                           log_target=True, reduction="batchmean")
        terms.append(per_row * temperature**2)
    return torch.stack(terms).mean()


def label_loss(student: Sequence[torch.Tensor], kinds: Sequence[str], labels: torch.Tensor) -> torch.Tensor:
    """Rule c: cross-entropy of the first class output against the labels."""
    for out, kind in zip(student, kinds, strict=True):
        if kind in ("logits", "probs"):
            return F.nll_loss(log_probs(out, kind, 1.0), labels)
    raise InputError("--loss ce needs a model whose output is class scores [N, classes]")


def feature_loss(reconstructions: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Rule d: the mean of the maps' relative reconstruction errors (None when no map has one)."""
    active = [error for error in reconstructions if error is not None]
    return torch.stack(active).mean() if active else None
