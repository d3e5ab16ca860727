"""The settings of learned projections, torch-free so that options and the CLI can hold them.

The training itself is `fmcompress.backend.trainer` (and the backend modules it names);
their docstrings state the rules.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from .errors import InputError

LOSSES = ("kd", "ce", "kd+ce")
SCHEDULES = ("joint", "greedy")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
AUGMENTATIONS = ("none", "light", "splice", "strong")
FEATURE_REFERENCES = ("teacher", "self")
BLOCK_INITS = ("pca", "lstsq", "fisher")
BLOCK_AUGMENTATIONS = ("auto", "none", "look", "copies")
COPIES_FROM = 5.0  # `auto`: copies where the plan stores a fifth of the maps' bytes or less (passes/fit.py)
BLOCK_PRECISIONS = ("auto", "float32", "bfloat16")
BLOCK_JUDGES = ("held-out", "calibration")
BLOCK_LOSSES = ("mse", "fisher")
FISHER_DRAWS = 4  # the fisher start's sign draws per calibration batch, one backward pass each (docs/results.md section 1)


@dataclass
class TrainConfig:
    """What `compile --method learned|random` trains with (the CLI flags of the same names)."""

    epochs: int = 10  # end to end; 0: the starting projections (the block stage's, for learned) are kept
    block_epochs: int = 12  # learned: at most this many block reconstruction epochs a map (the held-out part
    # stops each map sooner: block_judge) before end-to-end training
    block_lr: float = 1e-2  # the block stage's rate, relative as lr is
    lr: float = 3e-3  # relative to each map's scale: a map of C channels steps at lr / sqrt(C) (schedule.py rule b)
    batch_size: int = 16
    optimizer: str = "adam"
    schedule: str = "joint"
    stage_epochs: int = 1  # greedy: epochs per added map
    loss: str = "kd"
    temperature: float = 2.0
    feature_weight: float = 0.0
    feature_reference: str = "teacher"  # what a projected map is compared with (losses.py)
    augment: str = "light"
    max_samples: int | None = None  # per epoch; None: the whole calibration part
    seed: int = 0
    device: str = "auto"
    target: float | None = None  # stop once the held-out score reaches it
    patience: int = 4  # stop after this many epochs without a better held-out score, after the probe's (0: never)
    probe: int = 3  # after this many epochs, stop if training does not look like paying (0: never)
    probe_steps: int = 4  # ...and after this many steps of the first epoch (0: not then; schedule.py rule e)
    block_min_gain: float = 0.01  # a map's block stage stops when an epoch gains less than this, relatively...
    block_patience: int = 2  # ...this many epochs in a row (block_epochs stays the maximum)
    block_judge: str = "held-out"  # whose block loss stops a map and picks the epoch it keeps (blockwise rule d)
    block_loss: str = "fisher"  # at a block ending at a map: its squared error weighted by the output's Fisher
    # information there, or plain (mse)
    fake_quant: bool = False  # the stored maps rounded as int8 in training (quantization-aware, for --int8)
    block_init: str = "fisher"  # the block stage's start: fisher (the reduced-rank regression in the output's
    # Fisher metric), lstsq (unweighted), or pca
    block_augment: str = "auto"  # look: half the block stage's samples given another look (augment.new_look);
    # copies: the stage's samples and two augmented copies of each (augment.COPY_KINDS), three times its time;
    # auto: copies where the plan compresses the maps COPIES_FROM-fold or more, else none (fit.block_augmentation)
    block_ridge: float | None = None  # the fisher and lstsq starts' damping; None: 1e-3 with int8 maps, else 1e-6
    block_precision: str = "float32"  # the block stage's arithmetic: float32, bfloat16, or auto (bfloat16 where native)
    fisher_draws: int = FISHER_DRAWS  # the fisher start's draws per calibration batch (fisher.py rule b)

    def check(self) -> None:
        """One-line InputErrors for values that cannot train."""
        if self.epochs < 0:
            raise InputError(f"--epochs must be at least 0, got {self.epochs}")
        if self.block_epochs < 0:
            raise InputError(f"--block-epochs must be at least 0, got {self.block_epochs}")
        for value, flag in ((self.lr, "--lr"), (self.block_lr, "--block-lr")):
            if not (value > 0 and math.isfinite(value)):
                raise InputError(f"{flag} must be a positive number, got {value}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.stage_epochs < 1:
            raise InputError(f"--stage-epochs must be at least 1, got {self.stage_epochs}")
        if self.max_samples is not None and self.max_samples < 1:
            raise InputError(f"--max-samples must be at least 1, got {self.max_samples}")
        if not self.temperature > 0:
            raise InputError(f"--temperature must be positive, got {self.temperature}")
        if self.feature_weight < 0:
            raise InputError(f"--feature-weight must be at least 0, got {self.feature_weight}")
        for value, flag in ((self.patience, "--patience"), (self.probe, "--probe"),
                            (self.probe_steps, "probe_steps")):
            if value < 0:
                raise InputError(f"{flag} must be at least 0, got {value}")
        if self.fisher_draws < 1:
            raise InputError(f"fisher_draws must be at least 1, got {self.fisher_draws}")
        if self.block_patience < 1:
            raise InputError(f"--block-patience must be at least 1, got {self.block_patience}")
        if self.block_ridge is not None and not (self.block_ridge >= 0 and math.isfinite(self.block_ridge)):
            raise InputError(f"--block-ridge must be a number at least 0, got {self.block_ridge}")
        if not 0 <= self.block_min_gain < 1:
            raise InputError(f"--block-min-gain must be in [0, 1), got {self.block_min_gain}")
        if self.target is not None and not 0 < self.target <= 1:
            raise InputError(f"--target must be in (0, 1], got {self.target}")
        for value, allowed, flag in ((self.loss, LOSSES, "--loss"), (self.schedule, SCHEDULES, "--schedule"),
                                     (self.optimizer, OPTIMIZERS, "--optimizer"),
                                     (self.device, DEVICES, "--device"), (self.augment, AUGMENTATIONS, "--augment"),
                                     (self.feature_reference, FEATURE_REFERENCES, "--feature-reference"),
                                     (self.block_augment, BLOCK_AUGMENTATIONS, "--block-augment"),
                                     (self.block_init, BLOCK_INITS, "--block-init"),
                                     (self.block_judge, BLOCK_JUDGES, "--block-judge"),
                                     (self.block_loss, BLOCK_LOSSES, "--block-loss"),
                                     (self.block_precision, BLOCK_PRECISIONS, "--block-precision")):
            if value not in allowed:
                raise InputError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")

    def fingerprint(self) -> str:
        """What a checkpoint must agree on to be resumed (not the device nor the early stops)."""
        kept = {k: v for k, v in asdict(self).items() if k not in ("device", "target", "patience", "probe",
                                                                "probe_steps")}
        return json.dumps(kept, sort_keys=True)


def check_device(name: str) -> None:
    """`--device cuda` on a machine without CUDA is a usage error, found before any work."""
    if name != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")

