"""What a training run carries from epoch to epoch, and the checkpoint file that keeps it.

Rules:

a. After every epoch the trainer writes a checkpoint (`--checkpoint`): projections,
   optimiser and scheduler state, history and the best state, written atomically, by
   rank 0 only.
b. `--resume` continues from it. A checkpoint is tied to its run (`run_identity`): the
   maps and their ranks, and every training setting but the device and the early-stop
   target. One of other maps, ranks or settings is refused, and so is a missing or
   unreadable file (InputErrors).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fmcompress.errors import InputError
from fmcompress.featuremaps import Projection
from fmcompress.train_config import TrainConfig

from .projection import ChannelProjection


@dataclass
class EpochRecord:
    epoch: int
    stage: str
    active_maps: int
    loss: float
    score: float
    lr: float
    held_out_loss: float = float("nan")
    seconds: float = 0.0  # wall time of the epoch: training steps and the held-out score


@dataclass
class RunState:
    """The best projections so far, their score and held-out loss, and the history."""

    best: dict[str, Projection]
    best_score: float
    best_epoch: int = -1
    best_loss: float = math.inf
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False


def run_identity(projections: Mapping[str, ChannelProjection], config: TrainConfig) -> dict[str, Any]:
    """Rule b: what a checkpoint must agree on to be resumed."""
    return {"maps": [[n, m.P.shape[0], m.P.shape[1]] for n, m in projections.items()],
            "config": config.fingerprint()}


def save_checkpoint(path: str | os.PathLike, identity: dict[str, Any], epoch: int,
                    projections: Mapping[str, ChannelProjection], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: RunState) -> None:
    """Rule a: the state after `epoch` epochs, written atomically to `path`."""
    from fmcompress.modelio import write_bytes_atomic

    payload = {"identity": identity, "epoch": epoch,
               "projections": {n: (m.P.detach().cpu(), m.U.detach().cpu()) for n, m in projections.items()},
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "best": {n: (p.P, p.U) for n, p in state.best.items()}, "best_score": state.best_score,
               "best_loss": state.best_loss,
               "best_epoch": state.best_epoch, "history": [asdict(r) for r in state.history]}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(buffer.getvalue(), path)


def load_checkpoint(path: str | os.PathLike | None, identity: dict[str, Any],
                    projections: Mapping[str, ChannelProjection], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: RunState) -> int:
    """Rule b: restore projections, optimiser, scheduler and `state` in place; the epochs done."""
    if path is None or not os.path.exists(path):
        raise InputError(f"--resume: no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a boundary: unpickling a truncated or foreign file raises anything
        raise InputError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__})") from exc
    if payload.get("identity") != identity:
        raise InputError(f"--resume: {path} was made for other maps, ranks or training settings")
    with torch.no_grad():
        for name, (P, U) in payload["projections"].items():  # noqa: N806
            projections[name].P.copy_(P)
            projections[name].U.copy_(U)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    state.best = {n: Projection(P, U) for n, (P, U) in payload["best"].items()}
    state.best_score, state.best_epoch = payload["best_score"], payload["best_epoch"]
    state.best_loss = payload.get("best_loss", math.inf)
    state.history = [EpochRecord(**r) for r in payload["history"]]
    return int(payload["epoch"])
