"""Runtime memory under a ceiling: tiling alone, projections alone, both (compile --runtime ort).

    python examples/runtime_sweep.py [--models resnet18,mobilenet_v2] [--ceilings 256KB,512KB]

For each model and ceiling, three ways to meet it:
  projections  `compile` as before: every stored map above the ceiling projected (pca)
  tiling       exact rewrites only (SinkConcatPass, then TileToCeilingPass on the original
               graph): lossless
  both         `compile --runtime ort`: tiling, and projections only where bands cannot fit
and for each the runtime peak of one onnxruntime inference (measured in a fresh process,
input excluded; computed by the runtime view in brackets), the FLOPs ratio and the latency
ratio (onnxruntime, 1 thread, interleaved rounds, median). Zoo models are untrained:
their figures are about memory and time, not accuracy. Real models (ppocr-det, yolov8n)
come from the test extra's wheels.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from benchmodels import model_path

from fmcompress import api
from fmcompress.compiler import build_context
from fmcompress.errors import FmcError
from fmcompress.memprobe import measure_peak
from fmcompress.metrics import count_flops, ort_latency
from fmcompress.modelio import load_model
from fmcompress.passes.runtime import runtime_view
from fmcompress.passes.runtime_plan import TileToCeilingPass
from fmcompress.passes.sink_concat import SinkConcatPass
from fmcompress.shapes import infer_tensor_infos
from fmcompress.units import format_bytes, parse_size


def variants(path: Path, shape: tuple[int, ...], ceiling: str, samples: int):
    """(label, model or the reason it could not be built)."""
    shapes = [",".join(map(str, shape))]
    common = {"input_shapes": shapes, "method": "pca", "num_samples": samples, "latency_rounds": 1,
              "latency_repeats": 1}
    for label in ("projections", "tiling", "both"):
        try:
            if label == "tiling":
                original = load_model(path)
                ctx = build_context(original, shapes, None)
                budget = parse_size(ceiling)
                sunk = SinkConcatPass(budget)(original, ctx).model  # exact, like the tiling
                yield label, TileToCeilingPass(budget)(sunk, ctx).model
            else:
                runtime = "ort" if label == "both" else None
                yield label, api.compile(path, ceiling=ceiling, runtime=runtime, measure_memory=False,
                                         **common).model
        except FmcError as exc:
            yield label, str(exc).split(":")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--ceilings", default="256KB,512KB")
    parser.add_argument("--samples", type=int, default=32, help="calibration + held-out samples (pca)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    args = parser.parse_args()
    header = f"{'model':<14}{'ceiling':>8}  {'variant':<12}{'runtime peak, measured (computed)':>36}{'FLOPs':>8}{'latency':>9}"
    print(header)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            path, shapes = model_path(name, Path(workdir))
            original = load_model(path)
            (input_name, shape), = shapes.items()
            feeds = {input_name: np.random.default_rng(0).random(shape, dtype=np.float32)}
            base = measure_peak(original, shapes)
            view = runtime_view(original, shapes)
            flops = _flops(original, shapes)
            print(f"{name:<14}{'-':>8}  {'original':<12}{_peak(base.bytes, view.peak_bytes):>36}{1:>8.2f}{1:>9.2f}")
            for ceiling in args.ceilings.split(","):
                for label, model in variants(path, shape, ceiling, args.samples):
                    if isinstance(model, str):
                        print(f"{name:<14}{ceiling:>8}  {label:<12}{'infeasible: ' + model[:60]}")
                        continue
                    peak = measure_peak(model, shapes).bytes
                    computed = runtime_view(model, shapes).peak_bytes
                    ratio = _flops(model, shapes) / flops
                    latency = ort_latency(original, model, feeds, rounds=args.rounds, repeats=10, threads=1)
                    print(f"{name:<14}{ceiling:>8}  {label:<12}{_peak(peak, computed):>36}{ratio:>8.2f}"
                          f"{latency.ratio:>9.2f}")


def _flops(model, shapes: dict[str, tuple[int, ...]]) -> int:
    infos = infer_tensor_infos(model, shapes)
    return count_flops(model, {name: info.shape for name, info in infos.items()})


def _peak(measured: int | None, computed: int) -> str:
    shown = format_bytes(measured) if measured is not None else "n/a"
    return f"{shown} ({format_bytes(computed)})"


if __name__ == "__main__":
    main()
