"""Channel projections for the training backend, and their PCA initialisation.

A projection of a map X with C channels stores Z = P X (P: k x C) and hands its
consumers U Z (U: C x k): channel mixing per position, for maps of rank 3 or 4
(channel axis 1). PCA (Tai et al.'s compression-aware projection, without the
compensation): P = the top-k eigenvectors of the channel second moment E[x x^T],
transposed, and U = P^T. The second moment is uncentred on purpose: the folded
model has no bias to carry a mean, and zero padding must commute with U.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fmcompress.featuremaps import Projection

from .devices import available_memory
from .executor import Frontier, StopForward


def is_channels_last(x: torch.Tensor) -> bool:
    """x is a 4-D map laid out [N, H, W, C] in memory (the executor's layout rule), not also NCHW."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def mix_channels(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """matrix (out x in) applied to axis 1 of x, per position; x's layout kept (channels last
    stays channels last: the executor's layout rule)."""
    if is_channels_last(x):
        # a 1x1 convolution: oneDNN's channels-last kernels, no copy either way (forward and backward
        # 0.90x of one GEMM over the [N, H, W, C] memory on the recognizer's maps: bench_projection.py)
        return torch.nn.functional.conv2d(x, matrix.to(x.dtype)[:, :, None, None])
    # bmm of the matrix expanded over [N, C, positions] (no copy): no permute copies (einsum's plan
    # makes them), and none from torch.matmul either, which folds N into the positions, a transposed
    # copy of x, whenever x needs a gradient (training: 2-7x slower forward, 1.5-2x forward+backward)
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    mixed = torch.bmm(matrix.to(x.dtype).expand(x.shape[0], -1, -1), flat)
    return mixed.reshape(x.shape[0], matrix.shape[0], *x.shape[2:])


class ChannelProjection(nn.Module):
    """x -> U (P x). P and U are parameters, so end-to-end learning can refine them.

    With `quantized`, the stored map P x goes through `fake_quant_uint8` first: training
    sees the rounding an int8 deployment (`compile --int8`) gives it."""

    def __init__(self, P: np.ndarray | torch.Tensor, U: np.ndarray | torch.Tensor,  # noqa: N803 - the paper's names
                 quantized: bool = False):
        super().__init__()
        self.P = nn.Parameter(torch.as_tensor(np.asarray(P), dtype=torch.float32).clone())
        self.U = nn.Parameter(torch.as_tensor(np.asarray(U), dtype=torch.float32).clone())
        self.quantized = quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = mix_channels(self.P, x)
        return mix_channels(self.U, fake_quant_uint8(stored) if self.quantized else stored)

    def to_projection(self) -> Projection:
        return Projection(P=self.P.detach().cpu().numpy().astype(np.float32),
                          U=self.U.detach().cpu().numpy().astype(np.float32))


def fake_quant_uint8(x: torch.Tensor) -> torch.Tensor:
    """x rounded as onnxruntime's quantize_static stores an activation (uint8, one scale and
    zero point per tensor from its MinMax range, the range widened to hold 0), the range
    taken from this batch; the gradient passes straight through inside the range."""
    low, high = x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0)
    scale = float((high - low) / 255.0)
    if not scale > 0:
        return x
    zero_point = int(torch.round(-low / scale).clamp(0, 255))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def sampled_vectors(values: Sequence[torch.Tensor], count: int, generator: torch.Generator,
                    sample_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The channel vectors [n, C] of each value (all of one shape [N, C, ...]) at the same
    positions: every position when there are at most `count`, else `count` drawn from
    `generator`, rows numbered sample-major as in x.movedim(1, -1).reshape(-1, C); float32,
    on the CPU; with `sample_scale` ([N]), each vector times its sample's scale. Only the
    picked vectors are gathered and scaled: no copy of a whole map."""
    flat = [v.detach().reshape(v.shape[0], v.shape[1], -1) for v in values]  # [N, C, positions]
    samples, _, positions = flat[0].shape
    if samples * positions <= count:
        rows = None  # every row, sample-major
        vectors = [f.movedim(1, -1).reshape(-1, f.shape[1]) for f in flat]
    else:
        pick = torch.randperm(samples * positions, generator=generator)[:count].to(flat[0].device)
        rows, columns = pick // positions, pick % positions
        vectors = [f[rows, :, columns] for f in flat]
    if sample_scale is not None:
        per_row = sample_scale.repeat_interleave(positions) if rows is None else sample_scale[rows]
        vectors = [v * per_row.to(v.dtype)[:, None] for v in vectors]
    return [v.float().cpu() for v in vectors]


def moment_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b for [n, C] vectors, as float64. The product runs in float32 (2-9x faster on a CPU
    than in float64 for 4096 vectors of 64-480 channels; a sum of 4096 terms loses about 1e-6
    of its size) and is accumulated across batches in float64."""
    return (a.T @ b).to(torch.float64)


class SecondMomentRecorder(nn.Module):
    """Accumulates sum(x x^T) over channel vectors, a bounded random subset of positions per batch."""

    def __init__(self, channels: int, positions_per_batch: int = 4096, seed: int = 0, stop: bool = True):
        super().__init__()
        self.moment = torch.zeros(channels, channels, dtype=torch.float64)
        self.count = 0
        self.batches = 0
        self.positions_per_batch = positions_per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.stop = stop

    def mean_moment(self) -> torch.Tensor:
        """E[x x^T] over the positions recorded so far."""
        return self.moment / max(self.count, 1)

    def forward(self, x: torch.Tensor, sample_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Record x's channel vectors (with `sample_scale`, each times its sample's scale)."""
        (vectors,) = sampled_vectors([x], self.positions_per_batch, self.generator, sample_scale)
        self.moment += moment_product(vectors, vectors)
        self.count += vectors.shape[0]
        self.batches += 1
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


DEFAULT_CACHE_CAP = 4 << 30  # bytes; the default cache budget is min(this, available memory / 4)


def fit_pca(executor: nn.Module, maps: Sequence[tuple[str, int, int]],
            batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]], *,
            positions_per_batch: int = 4096, progress: Callable[[int, str], None] | None = None,
            cache_bytes: int | None = None) -> dict[str, Projection]:
    """Fit one projection per (name, channels, k), in list order, earlier ones in place.

    `executor` is an OnnxModule; `batches()` yields the same input tuples on every call.
    Map i's second moment is taken with the projections of maps 0..i-1 applied, positions
    subsampled with seed i, batches in order.

    Cost: each map resumes every batch from the frontier cached after the previous map (the
    activations alive at that step, the fitted projection applied) and runs only the steps up
    to its own tensor, so the whole fit costs about one forward pass up to the last map.
    Memory: the cache holds one frontier per calibration batch, at most `cache_bytes` in all
    (default: a quarter of the available memory, at most 4 GiB; counted wherever the tensors
    live). A batch whose frontier does not fit is re-run from its inputs for the next map,
    as is every batch when a map comes earlier in the graph than the one before it: a small
    budget costs time, never changes the result (0 gives the prefix-per-map cost).
    """
    budget = _default_cache_bytes() if cache_bytes is None else max(int(cache_bytes), 0)
    cache = _FrontierCache(executor, batches, budget)
    fitted: dict[str, Projection] = {}
    try:
        for i, (name, channels, k) in enumerate(maps):
            recorder = SecondMomentRecorder(channels, positions_per_batch, seed=i, stop=False)
            executor.set_transform(name, recorder)
            with torch.no_grad():
                cache.advance_to(name, recorder)
            fitted[name] = pca_projection(recorder.mean_moment(), k)
            projection = ChannelProjection(fitted[name].P, fitted[name].U)
            executor.set_transform(name, projection)
            with torch.no_grad():
                cache.apply(name, projection)
            if progress is not None:
                progress(i, name)
    finally:
        executor.clear_transforms()
    return fitted


def _default_cache_bytes() -> int:
    available = available_memory()
    return DEFAULT_CACHE_CAP if available is None else min(DEFAULT_CACHE_CAP, available // 4)


class _FrontierCache:
    """Per calibration batch, its run paused right after the last fitted map (None: start over).

    Invariant: a cached frontier holds the values of a run with every fitted projection that
    lies before its position applied; a frontier past the next map's step cannot serve it.
    """

    def __init__(self, executor: nn.Module, batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]],
                 budget: int):
        self.executor, self.batches, self.budget = executor, batches, budget
        self.frontiers: list[Frontier | None] = []  # per batch; empty before the first pass
        self.sizes: list[int] = []
        self.held = 0

    def advance_to(self, name: str, recorder: SecondMomentRecorder) -> None:
        """Run every batch to just after `name`'s step, recording it once per batch."""
        stop = self.executor.producer_step(name) + 1
        for b, inputs in enumerate(self._inputs(name, stop)):
            frontier = self._take(b, stop)
            seen = recorder.batches
            if frontier is None:
                frontier = self.executor.start(*inputs)
            self.executor.advance(frontier, stop)
            if recorder.batches == seen:  # produced before this frontier (a map of the same step)
                value = self.executor.value(frontier, name)
                if value is None:  # released (nothing reads it later): recompute this batch
                    frontier = self.executor.advance(self.executor.start(*inputs), stop)
                else:
                    recorder(value)
            self._keep(b, frontier)

    def apply(self, name: str, projection: nn.Module) -> None:
        """Put the fitted projection at `name` in every cached frontier (where it is still read)."""
        for b, frontier in enumerate(self.frontiers):
            value = None if frontier is None else self.executor.value(frontier, name)
            if value is None:
                continue
            self.executor.set_value(frontier, name, projection(value))
            # a view (a Split output) becomes its own tensor: the frontier may have grown
            size = self.executor.frontier_bytes(frontier)
            self.held += size - self.sizes[b]
            self.sizes[b] = size
            if self.held > self.budget:
                self.held -= size
                self.frontiers[b], self.sizes[b] = None, 0

    def _inputs(self, name: str, stop: int) -> Iterable[tuple[torch.Tensor, ...] | None]:
        """The batches' inputs, or Nones when every batch resumes from its cached frontier."""
        if self.frontiers and all(self._usable(f, name, stop) for f in self.frontiers):
            return [None] * len(self.frontiers)
        return self.batches()

    def _usable(self, frontier: Frontier | None, name: str, stop: int) -> bool:
        if frontier is None or frontier.position > stop:
            return False
        return frontier.position < stop or self.executor.value(frontier, name) is not None

    def _take(self, b: int, stop: int) -> Frontier | None:
        if b >= len(self.frontiers):
            self.frontiers.append(None)
            self.sizes.append(0)
        frontier, self.frontiers[b] = self.frontiers[b], None
        self.held -= self.sizes[b]
        self.sizes[b] = 0
        return frontier if frontier is not None and frontier.position <= stop else None

    def _keep(self, b: int, frontier: Frontier) -> None:
        self.executor.trim(frontier, keep_outputs=False)  # the fit never reads the outputs
        size = self.executor.frontier_bytes(frontier)
        if self.held + size <= self.budget:
            self.frontiers[b], self.sizes[b] = frontier, size
            self.held += size


def install_projections(executor: nn.Module, projections: dict[str, Projection]) -> None:
    """Put U P at every projected tensor of `executor` (the reference for the folded model)."""
    executor.clear_transforms()
    for name, projection in projections.items():
        executor.set_transform(name, ChannelProjection(projection.P, projection.U))
