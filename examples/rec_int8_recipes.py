"""Where PP-OCR's recognizer loses its accuracy in int8: the original quantized alone.

    python examples/rec_int8_recipes.py [--recipes minmax,percentile,...] [--samples 384]

The recognizer (the `test` extra's PP-OCRv4 model) goes through onnxruntime's own flow as
fmcompress/int8.py rule a runs it (`quantize_int8`: opset 17, `quant_pre_process`,
`quantize_static` with QDQ, per-channel symmetric int8 weights, uint8 activations), calibrated on
`--samples` set-1 lines (seed 0), with one recipe each:

* minmax: every op onnxruntime quantizes, MinMax ranges (what `compile --int8` does);
* conv / matmul: only Conv, or only MatMul, quantized (the rest stays float);
* conv-percentile: only Conv, ranges from onnxruntime's Percentile calibrator (99.999);
* percentile / entropy: every op, ranges from the Percentile or Entropy calibrator
  (`compile --int8 --calibrate percentile|entropy`); entropy only when named, since it
  ran for over ten minutes on 384 lines without finishing.

Each row is the exact match on 300 other set-1 lines (seed 1000) and the seconds it took.
Every recipe collects its ranges one batch at a time (fmcompress/int8.py rule b): the
histogram calibrators otherwise hold every intermediate output of every sample.
"""

from __future__ import annotations

import argparse
import time

import onnx

from fmcompress.evaluation import textlines
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.int8 import quantize_int8


def recipes() -> dict[str, dict]:
    return {"minmax": {}, "conv": {"op_types_to_quantize": ["Conv"]},
            "matmul": {"op_types_to_quantize": ["MatMul"]},
            "conv-percentile": {"op_types_to_quantize": ["Conv"], "calibrate": "percentile"},
            "percentile": {"calibrate": "percentile"}, "entropy": {"calibrate": "entropy"}}


def quantized(path: str, calibration, recipe: dict) -> onnx.ModelProto:
    batches = ({"x": calibration[i:i + 16]} for i in range(0, len(calibration), 16))
    return quantize_int8(onnx.load(path), batches, **recipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="minmax,conv,matmul,conv-percentile,percentile")
    parser.add_argument("--samples", type=int, default=384)
    args = parser.parse_args()
    path = str(real_model("ppocr-rec"))
    calibration, _ = textlines.rec_dataset(args.samples, 0)
    lines = textlines.rec_dataset(300, 1000)
    print(f"float original: {100 * textlines.rec_exact_match(path, *lines):.1f}%", flush=True)
    known = recipes()
    for name in args.recipes.split(","):
        started = time.perf_counter()
        model = quantized(path, calibration, known[name])
        print(f"{name}: {100 * textlines.rec_exact_match(model, *lines):.1f}% "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
