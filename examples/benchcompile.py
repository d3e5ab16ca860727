"""Whole compiles timed side by side: one benchmark's modes, each a code prefix run before the CLI.

Imported by examples/bench_fusion.py and examples/bench_projection.py (run from anywhere:
Python puts a script's own folder on the path). Each compile runs in its own process, the
modes alternating within each round so all see the same machine state; the table gives the
median over rounds of the report's `timings_s`, the block stage's and an epoch's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fmcompress.evaluation.thirdparty import real_model


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The options every side-by-side benchmark takes: `--rounds`, and `--compile N` (whole compiles
    on N rendered lines instead of the benchmark's own measurement)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compile", type=int, metavar="N", help="time whole compiles on N rendered lines")
    return parser


RUN_CLI = "import sys\nfrom fmcompress.cli import main\nsys.argv = sys.argv[1:]\nmain()"


def compile_seconds(prefix: str, lines: Path, folder: Path, mode: str) -> dict[str, float]:
    """PP-OCR's recognizer at 4x on `lines` (`--block-epochs 2 --epochs 2`, memory probes off)
    in a fresh process that runs `prefix` first; the report's timings and the training's seconds."""
    report = folder / f"{mode}.json"
    command = [sys.executable, "-c", prefix + RUN_CLI, "fmcompress", "compile", str(real_model("ppocr-rec")),
               "--ceiling", "4x", "--data", str(lines), "--input-shape", "x=1,3,48,320",
               "--block-epochs", "2", "--epochs", "2", "-o", str(folder / f"{mode}.onnx"), "--json", str(report), "-q"]
    subprocess.run(command, env={**os.environ, "FMCOMPRESS_MEASURE_MEMORY": "0"}, check=True)
    data = json.loads(report.read_text())
    training = data["training"]
    return {"total s": data["timings_s"]["total"], "fit s": data["timings_s"]["fit"],
            "map-cost s": data["timings_s"]["map-cost"], "block stage s": training["block_stage"]["seconds"],
            "an epoch s": statistics.median(h["seconds"] for h in training["history"])}


def compare_compiles(modes: dict[str, str], count: int, rounds: int) -> None:
    """`modes`: name -> code prefix, the baseline first; prints each mode's medians and its ratio
    to the baseline's."""
    from fmcompress.evaluation import textlines

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        lines = folder / "lines.npz"
        textlines.save_npz(lines, textlines.rec_dataset(count, 0)[0], None)
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for _ in range(rounds):
            for mode, prefix in modes.items():
                runs[mode].append(compile_seconds(prefix, lines, folder, mode))
    baseline, *others = modes
    table = Table(title=f"PP-OCR recognizer, 4x, {count} lines: median of {rounds} rounds")
    table.add_column("")
    for mode in modes:
        table.add_column(mode)
    for mode in others:
        table.add_column(f"{mode} / {baseline}")
    for key in runs[baseline][0]:
        medians = {mode: statistics.median(run[key] for run in runs[mode]) for mode in modes}
        table.add_row(key, *(f"{medians[mode]:.1f}" for mode in modes),
                      *(f"{medians[mode] / medians[baseline]:.2f}" for mode in others))
    Console().print(table)
