"""The training monitor of `compile`: rich progress bars on a terminal, one line per epoch
elsewhere, and every event as a JSON line when asked (fmcompress.backend.trainer's events).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console


@contextlib.contextmanager
def training_monitor(*, quiet: bool = False, json_log: str | os.PathLike | None = None,
                     log: Callable[[str], None] = lambda message: None) -> Iterator[Callable[[str, dict], None]]:
    """A monitor for fmcompress.backend.trainer's events, shown as the place allows.

    On a terminal: rich progress bars, one for the block stage (maps done, the last
    one's block loss, ETA) and one per epoch (stage, epoch, step, loss, held-out
    score, ETA). Elsewhere (CI logs): one line per epoch through `log`. Nothing with
    `quiet`. `json_log`: every event as one JSON line, flushed as it happens.
    """
    handle = open(json_log, "w", encoding="utf-8") if json_log else None  # noqa: SIM115 - closed below
    console = Console(stderr=True)
    progress = None
    if not quiet and console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console)
        progress.start()
    tasks: dict[str, Any] = {}

    def monitor(event: str, fields: dict) -> None:
        if handle is not None:
            handle.write(json.dumps({"event": event, **fields}) + "\n")
            handle.flush()
        if quiet:
            return
        if progress is not None:
            _progress_event(progress, tasks, event, fields)
        elif event == "epoch_end":
            log(_epoch_line(fields))

    try:
        yield monitor
    finally:
        if progress is not None:
            progress.stop()
        if handle is not None:
            handle.close()


def _progress_event(progress, tasks: dict[str, Any], event: str, fields: dict) -> None:
    """One bar for the block stage (maps done), then one per epoch (steps done)."""
    if event == "block":
        if "block" not in tasks:
            tasks["block"] = progress.add_task("block stage", total=fields["maps"], status="")
        loss = "kept its start" if fields["loss"] is None else f"loss {fields['loss']:.4g}"
        progress.update(tasks["block"], completed=fields["map"], status=f"map {fields['map']}: {loss}")
    elif event == "epoch_start":
        description = f"{fields['stage']} epoch {fields['epoch']}/{fields['epochs']}"
        tasks["epoch"] = progress.add_task(description, total=fields["steps"], status="")
    elif event == "step" and "epoch" in tasks:
        progress.update(tasks["epoch"], advance=1, status=f"loss {fields['loss']:.4g}")
    elif event == "epoch_end" and "epoch" in tasks:
        progress.update(tasks["epoch"], status=_epoch_line(fields))


def _epoch_line(fields: dict) -> str:
    return (f"epoch {fields['epoch']} ({fields['stage']}, {fields['active_maps']} map(s)): loss {fields['loss']:.4g}, "
            f"held-out {fields['metric']} {fields['score']:.4f} (kept {fields['best']:.4f})")
