"""onnxruntime's measured peak and latency of float and int8 models, compiled or not.

    python examples/int8_peak.py [--models resnet18,mobilenet_v2] [--num-samples 64] [--level all]

For each zoo model (untrained weights: memory and time only), rows:

* original float;
* original through onnxruntime's own flow (`quant_pre_process`, then `quantize_static`:
  QDQ, per-channel int8 weights, uint8 activations, MinMax, default options);
* original through `compile --int8 --ceiling 1GB` (nothing projected or tiled: a
  quantize-only run of the pipeline, passes/quantize.py);
* original through `compile --int8` alone (`--peak lossless`: quantized and tiled for the
  smallest peak tiling alone reaches, nothing projected; passes/peak_plan.py rule h);
* compiled at 256KB `--runtime ort` (float);
* compiled at 64KB `--runtime ort --int8`.

Peak: fmcompress.memprobe (a fresh process, arena off, the input excluded) at `--level`.
Latency: median of `--repeats` single-thread runs on one sample. Compiles use `--method
pca` (fast; fidelity is not the point here) on surrogate photographs. The last column is
what passes/quantize.py lists as still running in float on feature maps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from benchmodels import model_path

from fmcompress import api
from fmcompress.data import input_specs, load_dataset
from fmcompress.evaluation.thirdparty import ort_quantize_static
from fmcompress.memprobe import measure_peak
from fmcompress.ortrun import ort_session
from fmcompress.passes.quantize import float_nodes
from fmcompress.units import format_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--level", default="all")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{'model':<14}{'row':<34}{'peak':>11}{'latency ms':>12}{'float maps':>12}")
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            path, shapes = model_path(name, Path(workdir))
            for row, model, floats in rows(path, shapes, args):
                print(f"{name:<14}{row:<34}{_peak(model, shapes, args.level):>11}"
                      f"{_latency(model, shapes, args.repeats):>12.2f}{floats:>12}")


def rows(path: Path, shapes: dict[str, tuple[int, ...]], args: argparse.Namespace):
    """(row name, model, float-map bytes or '-') for each row of the table."""
    original = onnx.load(str(path))
    yield "original float", original, "-"
    quantized = ort_flow(original, shapes, args.num_samples)
    yield "original, ORT quantize_static", quantized, format_bytes(_float_bytes(quantized, shapes, args.level))
    common = {"method": "pca", "num_samples": args.num_samples, "input_shapes": shapes, "measure_memory": True,
              "latency_rounds": 1, "latency_repeats": 1}
    for row, options in (("original, compile --int8 (1GB)", {"ceiling": "1GB", "int8": True}),
                         ("original, compile --int8 (lossless)", {"int8": True}),
                         ("256KB --runtime ort, float", {"ceiling": "256KB", "runtime": "ort"}),
                         ("64KB --runtime ort --int8", {"ceiling": "64KB", "runtime": "ort", "int8": True})):
        result = api.compile(path, **options, **common)
        int8 = result.report.get("int8")
        yield row, result.model, format_bytes(int8["float_bytes"]) if int8 else "-"


def ort_flow(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], num_samples: int) -> onnx.ModelProto:
    """onnxruntime's documented static quantization with its defaults (QDQ, per-channel)."""
    samples = load_dataset(None, input_specs(model, shapes), num_samples=num_samples)
    return ort_quantize_static(model, [inputs for inputs, _ in samples.batches(1)])


def _float_bytes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], level: str) -> int:
    return sum(entry["bytes"] for entry in float_nodes(model, shapes, level))


def _peak(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], level: str) -> str:
    measured = measure_peak(model, shapes, level=level)
    return format_bytes(measured.bytes) if measured.bytes is not None else "n/a"


def _latency(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], repeats: int) -> float:
    session = ort_session(model, threads=1)
    feeds = {meta.name: np.random.default_rng(0).random(shapes[meta.name], np.float32)
             for meta in session.get_inputs()}
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


if __name__ == "__main__":
    main()
