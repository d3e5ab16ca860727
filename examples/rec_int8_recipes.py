"""Where PP-OCR's recognizer (or classifier) loses its accuracy in int8: the original quantized alone.

    python examples/rec_int8_recipes.py [--model ppocr-rec|ppocr-cls] [--recipes minmax,percentile,...] [--samples 384] [--set first|second]

The recognizer (the `test` extra's PP-OCRv4 model) goes through onnxruntime's own flow as
fmcompress/int8.py rule a runs it (`quantize_int8`: opset 17, `quant_pre_process`,
`quantize_static` with QDQ, per-channel symmetric int8 weights, uint8 activations), calibrated on
`--samples` lines of `--set` (set 1, textlines, by default; set 2 is otherlines; seed 0),
with one recipe each:

* minmax: every op onnxruntime quantizes, MinMax ranges (what `compile --int8` does);
* conv / matmul: only Conv, or only MatMul, quantized (the rest stays float);
* conv-percentile: only Conv, ranges from onnxruntime's Percentile calibrator (99.999);
* percentile / entropy: every op, ranges from the Percentile or Entropy calibrator
  (`compile --int8 --calibrate percentile|entropy`); entropy only when named, since it
  ran for over ten minutes on the recognizer's 384 lines without finishing.
* symmetric / moving-average: MinMax with activations quantized symmetrically
  (`ActivationSymmetric`), or with each batch's range averaged (`CalibMovingAverage`);
* head-float / stem-float: MinMax with the Gemm, MatMul and Softmax nodes (the head), or the
  first Conv, left float;
* minmax-plain / percentile-plain: as minmax and percentile, without the rewrites of
  fmcompress/int8.py rule a'' for onnxruntime's integer kernels (Div by a constant as Mul,
  HardSigmoid as Mul, Add and Clip), to measure what they change;
* percentile-P: every op, Percentile at the P-th percentile of |x| instead of 99.999
  (onnxruntime's `CalibPercentile`);
* mse: every op, each activation's range the one that minimises its own quantization error
  (clipping plus rounding, from a signed 2048-bin histogram of the calibration lines; searched
  over a 160 x 160 grid of low and high ends): onnxruntime's Percentile calibrator collects the
  histograms, `mse_range` picks the range;
* sqnr-float-K (K = 4, 8, 16, ...): Percentile, with the K activation tensors whose own
  quantization is worst kept float: the percentile model's tensors ranked by their
  signal-to-quantization-noise ratio before and after their QuantizeLinear/DequantizeLinear
  pair (onnxruntime's `qdq_loss_debug`, on the first 16 calibration lines), and the nodes
  that write or read each of the K worst excluded from quantization (mixed precision).

Each row is the exact match (the classifier: accuracy) on 300 other lines of the same set
(seed 1000) and the seconds it took.
Every recipe collects its ranges one batch at a time (fmcompress/int8.py rule b): the
histogram calibrators otherwise hold every intermediate output of every sample.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import onnx

from fmcompress.evaluation import otherlines, textlines
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.int8 import quantize_int8, with_per_channel_opset


def recipes() -> dict[str, dict]:
    return {"minmax": {}, "conv": {"op_types_to_quantize": ["Conv"]},
            "matmul": {"op_types_to_quantize": ["MatMul"]},
            "conv-percentile": {"op_types_to_quantize": ["Conv"], "calibrate": "percentile"},
            "percentile": {"calibrate": "percentile"}, "entropy": {"calibrate": "entropy"},
            "minmax-plain": {"plain": True}, "percentile-plain": {"calibrate": "percentile", "plain": True},
            "mse": {"calibrate": "percentile", "mse": True,
                    "extra_options": {"CalibTensorRangeSymmetric": False, "CalibNumBins": 2048}},
            "symmetric": {"extra_options": {"ActivationSymmetric": True}},
            "moving-average": {"extra_options": {"CalibMovingAverage": True}}}


def node_recipes(model: onnx.ModelProto) -> dict[str, dict]:
    """The recipes that name nodes of `model`: its head, or its first Conv, left float."""
    head = [node.name for node in model.graph.node if node.op_type in ("Gemm", "MatMul", "Softmax")]
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    return {"head-float": {"nodes_to_exclude": head}, "stem-float": {"nodes_to_exclude": convs[:1]}}


SQNR_RECIPE = "sqnr-float-"
PERCENTILE_RECIPE = "percentile-"  # percentile-P: Percentile calibration at the P-th percentile (99.999 by default)


def percentile_of(name: str) -> float | None:
    """P of a `percentile-P` recipe name, else None."""
    try:
        return float(name[len(PERCENTILE_RECIPE):]) if name.startswith(PERCENTILE_RECIPE) else None
    except ValueError:
        return None


def float_count(name: str) -> int | None:
    """K of a `sqnr-float-K` recipe name, else None."""
    rest = name[len(SQNR_RECIPE):]
    return int(rest) if name.startswith(SQNR_RECIPE) and rest.isdigit() else None


def worst_quantized_nodes(model: onnx.ModelProto, calibration) -> list[set[str]]:
    """Per activation tensor of the Percentile model, worst SQNR first: the nodes of the float
    graph that write or read it (through its QuantizeLinear/DequantizeLinear pair)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    from fmcompress.int8 import calibration_reader

    qdq = quantized(model, calibration, {"calibrate": "percentile"})
    with tempfile.TemporaryDirectory() as folder:
        plain, augmented = os.path.join(folder, "qdq.onnx"), os.path.join(folder, "augmented.onnx")
        onnx.save(qdq, plain)
        modify_model_output_intermediate_tensors(plain, augmented)
        activations = collect_activations(augmented, calibration_reader([{"x": calibration[:16]}]))
    matched = {name: {**pair, "float": None} for name, pair in create_activation_matching(activations).items()}
    errors = compute_activation_error(matched)
    ranked = sorted(errors, key=lambda name: errors[name]["qdq_err"])
    writers = {out: node for node in qdq.graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in qdq.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    qdq_ops = ("QuantizeLinear", "DequantizeLinear")

    def around(tensor: str) -> set[str]:
        nodes = {writers[tensor].name} if tensor in writers and writers[tensor].op_type not in qdq_ops else set()
        frontier = [tensor]
        while frontier:
            for node in readers.get(frontier.pop(), []):
                if node.op_type in qdq_ops:
                    frontier.extend(node.output)
                else:
                    nodes.add(node.name)
        return nodes

    return [around(name) for name in ranked]


MSE_GRID = 160  # candidate low and high ends of a range


def mse_range(hist: np.ndarray, edges: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The range [a, b] (a <= 0 <= b, as uint8 with a zero point needs) whose uint8 quantization
    of the histogrammed values costs least: clipping (squared distance to the range, by prefix
    sums of the counts) plus rounding (step squared / 12 for every value inside)."""
    centres, counts = (edges[:-1] + edges[1:]).astype(np.float64) / 2, hist.astype(np.float64)
    sums = [np.cumsum(counts * centres ** p) for p in range(3)]
    total = [s[-1] for s in sums]
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    lows = np.linspace(low, 0, MSE_GRID, endpoint=False) if low < 0 else np.zeros(1)
    highs = np.linspace(high, 0, MSE_GRID, endpoint=False)[::-1] if high > 0 else np.zeros(1)

    def below(index: np.ndarray) -> list[np.ndarray]:  # sums over the bins before `index`
        return [np.where(index > 0, s[np.maximum(index - 1, 0)], 0.0) for s in sums]

    n0, n1, n2 = below(np.searchsorted(centres, lows))
    m0, m1, m2 = (t - b for t, b in zip(total, below(np.searchsorted(centres, highs, side="right")), strict=True))
    clipped = (n2 - 2 * lows * n1 + lows ** 2 * n0)[:, None] + (m2 - 2 * highs * m1 + highs ** 2 * m0)[None, :]
    inside = total[0] - n0[:, None] - m0[None, :]
    cost = clipped + inside * ((highs[None, :] - lows[:, None]) / 255) ** 2 / 12
    i, j = np.unravel_index(np.argmin(cost), cost.shape)
    return float(lows[i]), float(highs[j])


@contextmanager
def mse_ranges() -> Iterator[None]:
    """onnxruntime's Percentile calibrator, its ranges chosen by `mse_range` instead."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    def ranges(self) -> dict:
        return {name: (np.array(a, dtype=h[1].dtype), np.array(b, dtype=h[1].dtype), h[0], h[1])
                for name, h in self.histogram_dict.items() for a, b in [mse_range(h[0], h[1], h[2], h[3])]}

    with mock.patch.object(HistogramCollector, "compute_percentile", ranges):
        yield


def quantized(model: onnx.ModelProto, calibration, recipe: dict) -> onnx.ModelProto:
    batches = ({"x": calibration[i:i + 16]} for i in range(0, len(calibration), 16))
    recipe = dict(recipe)
    if recipe.pop("mse", False):
        with mse_ranges():
            return quantize_int8(model, batches, **recipe)
    if recipe.pop("plain", False):  # rule a'' undone, to measure what it changes
        with mock.patch("fmcompress.int8.integer_friendly", lambda model, shapes=None: with_per_channel_opset(model)):
            return quantize_int8(model, batches, **recipe)
    return quantize_int8(model, batches, **recipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("ppocr-rec", "ppocr-cls"), default="ppocr-rec")
    parser.add_argument("--recipes", default="minmax,conv,matmul,conv-percentile,percentile")
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--set", choices=("first", "second"), default="first",
                        help="the lines to calibrate on and score: set 1 (textlines) or set 2 (otherlines)")
    args = parser.parse_args()
    path = str(real_model(args.model))
    original = onnx.load(path)
    known, ranking = recipes() | node_recipes(original), None
    for name in args.recipes.split(","):
        if name not in known and float_count(name) is None and percentile_of(name) is None:
            parser.error(f"unknown recipe {name!r}; known: {', '.join(known)}, {SQNR_RECIPE}K, "
                         f"{PERCENTILE_RECIPE}P")
    renderer = {"first": textlines, "second": otherlines}[args.set]
    dataset, score = ((renderer.cls_dataset, textlines.cls_accuracy) if args.model == "ppocr-cls"
                      else (renderer.rec_dataset, textlines.rec_exact_match))
    calibration, _ = dataset(args.samples, 0)
    lines = dataset(300, 1000)
    print(f"float original: {100 * score(path, *lines):.1f}%", flush=True)
    for name in args.recipes.split(","):
        started = time.perf_counter()
        count, percentile = float_count(name), percentile_of(name)
        if percentile is not None:
            recipe = {"calibrate": "percentile", "extra_options": {"CalibPercentile": percentile}}
        elif count is None:
            recipe = known[name]
        else:
            ranking = ranking or worst_quantized_nodes(original, calibration)
            recipe = {"calibrate": "percentile", "nodes_to_exclude": sorted(set().union(*ranking[:count]))}
        model = quantized(original, calibration, recipe)
        print(f"{name}: {100 * score(model, *lines):.1f}% ({time.perf_counter() - started:.0f} s)", flush=True)

if __name__ == "__main__":
    main()
