"""Channel projections for the training backend, and their PCA initialisation.

A projection of a map X with C channels stores Z = P X (P: k x C) and hands its
consumers U Z (U: C x k): channel mixing per position, for maps of rank 3 or 4
(channel axis 1). PCA (Tai et al.'s compression-aware projection, without the
compensation): P = the top-k eigenvectors of the channel second moment E[x x^T],
transposed, and U = P^T. The second moment is uncentred on purpose: the folded
model has no bias to carry a mean, and zero padding must commute with U.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fmcompress.featuremaps import Projection


def mix_channels(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """matrix (out x in) applied to axis 1 of x, per position."""
    return torch.einsum("oc,nc...->no...", matrix.to(x.dtype), x)


class ChannelProjection(nn.Module):
    """x -> U (P x). P and U are parameters, so end-to-end learning can refine them."""

    def __init__(self, P: np.ndarray | torch.Tensor, U: np.ndarray | torch.Tensor):  # noqa: N803 - the paper's names
        super().__init__()
        self.P = nn.Parameter(torch.as_tensor(np.asarray(P), dtype=torch.float32).clone())
        self.U = nn.Parameter(torch.as_tensor(np.asarray(U), dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mix_channels(self.U, mix_channels(self.P, x))

    def to_projection(self) -> Projection:
        return Projection(P=self.P.detach().cpu().numpy().astype(np.float32),
                          U=self.U.detach().cpu().numpy().astype(np.float32))


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a recorder once it has what it needs: the rest of the graph is not run."""


class SecondMomentRecorder(nn.Module):
    """Accumulates sum(x x^T) over channel vectors, a bounded random subset of positions per batch."""

    def __init__(self, channels: int, positions_per_batch: int = 4096, seed: int = 0, stop: bool = True):
        super().__init__()
        self.moment = torch.zeros(channels, channels, dtype=torch.float64)
        self.count = 0
        self.positions_per_batch = positions_per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.stop = stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vectors = x.detach().movedim(1, -1).reshape(-1, x.shape[1])
        if vectors.shape[0] > self.positions_per_batch:
            pick = torch.randperm(vectors.shape[0], generator=self.generator)[: self.positions_per_batch]
            vectors = vectors[pick.to(vectors.device)]
        vectors = vectors.to(torch.float64).cpu()
        self.moment += vectors.T @ vectors
        self.count += vectors.shape[0]
        if self.stop:
            raise StopForward
        return x


def pca_projection(moment: torch.Tensor, k: int) -> Projection:
    """P = top-k eigenvectors of the second moment (as rows), U = P^T."""
    _, vectors = torch.linalg.eigh(moment)  # ascending eigenvalues
    top = vectors[:, -k:].flip(-1)
    top = top * torch.where(top.sum(0) < 0, -1.0, 1.0).to(top.dtype)  # deterministic signs
    P = top.T.contiguous().numpy().astype(np.float32)  # noqa: N806
    return Projection(P=P, U=P.T.copy())


def fit_pca(executor: nn.Module, maps: Sequence[tuple[str, int, int]],
            batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]], *,
            positions_per_batch: int = 4096, progress: Callable[[int, str], None] | None = None,
            ) -> dict[str, Projection]:
    """Fit one projection per (name, channels, k), in network order, earlier ones in place.

    `executor` is an OnnxModule; `batches()` yields input tuples and is called once a map
    (one streaming pass each; the forward stops at the recorded tensor).
    """
    fitted: dict[str, Projection] = {}
    try:
        for i, (name, channels, k) in enumerate(maps):
            recorder = SecondMomentRecorder(channels, positions_per_batch, seed=i)
            executor.set_transform(name, recorder)
            with torch.no_grad():
                for inputs in batches():
                    with contextlib.suppress(StopForward):
                        executor(*inputs)
            fitted[name] = pca_projection(recorder.moment / max(recorder.count, 1), k)
            executor.set_transform(name, ChannelProjection(fitted[name].P, fitted[name].U))
            if progress is not None:
                progress(i, name)
    finally:
        executor.clear_transforms()
    return fitted


def install_projections(executor: nn.Module, projections: dict[str, Projection]) -> None:
    """Put U P at every projected tensor of `executor` (the reference for the folded model)."""
    executor.clear_transforms()
    for name, projection in projections.items():
        executor.set_transform(name, ChannelProjection(projection.P, projection.U))
