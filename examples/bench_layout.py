"""The torch executor's layout: the same compile with 4-D inputs channels last (the default on a
CPU) and as given, in interleaved rounds.

    python examples/bench_layout.py [--model ppocr-rec ...] [--rounds 3] [--num-samples 160]
        [--epochs 0] [--block-epochs 2] [--ceiling 4x]

The models and their calibration data are bench_compile.py's. Each round runs both layouts,
in alternating order; the first round is a warm-up and is not counted when there are more.
Printed per run: compile, fit and map-cost seconds and the held-out figures (the same to
float rounding: only the memory layout differs); then, per model, the median ratios
channels last / as given.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_compile import models

from fmcompress.backend.executor import OnnxModule
from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.metrics import gated_agreement
from fmcompress.train_config import TrainConfig

LAYOUTS = {"as given": False, "channels last": True}


def timed_compile(path: Path, shapes: list[str], data: str | None, args, channels_last: bool) -> tuple[float, dict]:
    OnnxModule.channels_last = channels_last
    options = CompileOptions(ceiling=args.ceiling, input_shapes=shapes, num_samples=args.num_samples, data=data,
                             latency_repeats=1, latency_rounds=1,
                             training=TrainConfig(epochs=args.epochs, block_epochs=args.block_epochs))
    started = time.perf_counter()
    result = compile_model(path, options)
    return time.perf_counter() - started, result.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="bench_compile.py's model names (default: ppocr-rec)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=0, help="end-to-end epochs")
    parser.add_argument("--block-epochs", type=int, default=2)
    parser.add_argument("--ceiling", default="4x")
    args = parser.parse_args()
    print("| model | round | layout | compile s | fit s | map-cost s | agreement | cosine |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as workdir:
        for name, (path, shapes, data) in models(Path(workdir)).items():
            if name not in (args.model or ["ppocr-rec"]):
                continue
            seconds: dict[str, list[tuple[float, float, float]]] = {layout: [] for layout in LAYOUTS}
            for round_ in range(args.rounds):
                order = list(LAYOUTS) if round_ % 2 == 0 else list(LAYOUTS)[::-1]
                for layout in order:
                    total, report = timed_compile(path, shapes, data, args, LAYOUTS[layout])
                    timings = report["timings_s"]
                    _, agreement = gated_agreement(report["fidelity"])
                    print(f"| {name} | {round_} | {layout} | {total:.1f} | {timings['fit']:.1f} | "
                          f"{timings.get('map-cost', 0.0):.1f} | {agreement if agreement is None else f'{agreement:.2%}'} "
                          f"| {report['fidelity']['cosine_similarity']:.5f} |", flush=True)
                    if round_ > 0 or args.rounds == 1:
                        seconds[layout].append((total, timings["fit"], timings.get("map-cost", 0.0)))
            medians = {layout: [statistics.median(column) for column in zip(*rows, strict=True)]
                       for layout, rows in seconds.items()}
            ratios = [now / before if before else float("nan")
                      for now, before in zip(medians["channels last"], medians["as given"], strict=True)]
            print(f"\n{name}: channels last / as given, median over {len(seconds['as given'])} round(s): compile "
                  f"{ratios[0]:.3f}, fit {ratios[1]:.3f}, map costs {ratios[2]:.3f}\n")
    OnnxModule.channels_last = True


if __name__ == "__main__":
    main()
