"""Input augmentation for end-to-end training of projections (`--augment`), made for text lines.

Distillation needs no labels, so an augmented batch is simply new inputs for the student
and the teacher alike. Each sample's draw comes from its own seed (the trainer mixes the
run's seed, the epoch and the sample's index), so a sample is augmented alike whichever
batch it lands in and a resumed run repeats the uninterrupted one. Kinds:

* `none`: the inputs as they are (so are integer inputs and inputs without spatial axes);
* `light`: per sample, a shift of up to 2 positions along each spatial axis (zero fill)
  and noise at 2% of the sample's std (`shift_and_noise`);
* `splice`: first, each sample's columns in a span of 20-50% of its width come, with
  probability 1/2, from another sample of the batch (for text lines that is another
  real-looking line), then `light`. The partner is drawn among the batch's samples,
  which a distributed run splits between ranks;
* `strong`: `splice`, then each image stretched along its width (`stretch`) and its
  contrast and brightness changed (`photometric`), then `light`.

The block stage (`blockwise.py`) draws its own variants once, before its epochs: with
`--block-augment look`, half its samples given another look (`look_variants`): calibration
lines of one look (one face, dark on light) otherwise teach projections that drop what
another look needs; with `copies`, a copy of every sample per kind of `COPY_KINDS`, added to
the samples as given (the stage then fits each block to three times the lines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention

COPY_KINDS = ("light", "strong")  # --block-augment copies: one copy of each sample per kind


def augment_batch(x: torch.Tensor, kind: str, seeds: Sequence[int]) -> torch.Tensor:
    """The batch `x` [N, C, spatial...] augmented by `kind`, sample i drawn from `seeds[i]`."""
    if kind == "none" or not x.is_floating_point() or x.dim() < 3:
        return x
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    if kind in ("splice", "strong"):
        x = splice(x, generators)
    strong = kind == "strong"
    samples = []
    for sample, generator in zip(x, generators, strict=True):
        if strong:
            sample = photometric(stretch(sample, generator), generator)
        samples.append(shift_and_noise(sample, generator))
    return torch.stack(samples)


def stretch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One image [C, H, W] resampled along W by a factor in [0.8, 1.25] (log-uniform), then
    cut or zero-padded on the right back to W: glyphs of other widths (zero is what a
    recognizer's preprocessing pads a short line with). Other ranks are left as they are."""
    if x.dim() != 3:
        return x
    width = x.shape[-1]
    draw = float(torch.rand(1, generator=generator))
    factor = math.exp(math.log(0.8) + (math.log(1.25) - math.log(0.8)) * draw)
    resized = F.interpolate(x[None], size=(x.shape[1], max(1, round(width * factor))), mode="bilinear",
                            align_corners=False)[0]
    if resized.shape[-1] >= width:
        return resized[..., :width]
    return F.pad(resized, (0, width - resized.shape[-1]))


def photometric(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Contrast times [0.7, 1.3] about the sample's mean, brightness +-10% of its std."""
    contrast = 0.7 + 0.6 * float(torch.rand(1, generator=generator))
    brightness = 0.2 * float(torch.rand(1, generator=generator)) - 0.1
    mean, std = x.mean(), x.std().clamp_min(1e-6)
    return (x - mean) * contrast + mean + brightness * std


def splice(x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Per sample, with probability 1/2, a span of 20-50% of the last axis copied from a
    partner in the batch (itself when the batch has one sample)."""
    out = x.clone()
    width = x.shape[-1]
    for i, generator in enumerate(generators):
        draw = torch.rand(3, generator=generator)
        partner = int(torch.randint(0, len(x), (1,), generator=generator))
        if draw[0] >= 0.5 or partner == i:
            continue
        span = max(1, int(width * (0.2 + 0.3 * float(draw[1]))))
        start = int((width - span) * float(draw[2]))
        out[i, ..., start:start + span] = x[partner, ..., start:start + span]
    return out


def shift_and_noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`light` for one sample [C, spatial...]: shifted up to 2 positions per spatial axis
    (zero fill), plus Gaussian noise at 2% of its std."""
    noise_scale = 0.02 * float(x.std().clamp_min(1e-6))
    shifted = x
    for axis in range(1, x.dim()):
        shift = int(torch.randint(-2, 3, (1,), generator=generator))
        if shift:
            shifted = torch.roll(shifted, shift, dims=axis)
            index = torch.arange(x.shape[axis])
            mask = (index < shift) if shift > 0 else (index >= x.shape[axis] + shift)
            view = [1] * x.dim()
            view[axis] = -1
            shifted = shifted.masked_fill(mask.view(view), 0.0)
    return shifted + torch.randn(x.shape, generator=generator, dtype=x.dtype) * noise_scale


def look_variants(x: torch.Tensor, seeds: Sequence[int], share: float = 0.5) -> torch.Tensor:
    """The batch `x` [N, C, H, W] with a `share` of its samples given another look
    (`new_look`), sample i drawn from `seeds[i]`; other ranks and integer inputs unchanged."""
    if not x.is_floating_point() or x.dim() != 4:
        return x
    out = []
    for sample, seed in zip(x, seeds, strict=True):
        generator = torch.Generator().manual_seed(seed)
        out.append(new_look(sample, generator) if float(torch.rand(1, generator=generator)) < share else sample)
    return torch.stack(out)


def new_look(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One image [C, H, W] as another camera or printer might give it, still readable: polarity
    inverted (p 1/2), channels permuted (p 1/2), contrast x [0.5, 1.5] and brightness
    +-25% of its std, a linear ramp of up to 40% of its std across it, a 3x3 blur (p 1/3)
    and noise up to 5% of its std. The value range is kept (the model's normalisation)."""
    low, high = x.min(), x.max()
    mean, std = x.mean(), x.std().clamp_min(1e-6)
    draw = torch.rand(8, generator=generator).tolist()
    if draw[0] < 0.5:
        x = low + high - x
    if draw[1] < 0.5 and x.shape[0] > 1:
        x = x[torch.randperm(x.shape[0], generator=generator)]
    x = (x - mean) * (0.5 + draw[2]) + mean + (0.5 * draw[3] - 0.25) * std
    ramp = torch.linspace(-1.0, 1.0, x.shape[-1], dtype=x.dtype) if draw[4] < 0.5 else \
        torch.linspace(-1.0, 1.0, x.shape[-2], dtype=x.dtype)[:, None]
    x = x + 0.4 * draw[5] * std * ramp
    if draw[6] < 1 / 3:
        x = F.avg_pool2d(x[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    x = x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * (0.05 * draw[7]) * std
    return x.clamp(low, high)
