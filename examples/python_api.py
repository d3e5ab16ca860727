"""The Python API in a few lines: analyze, compose passes, compile, and check the result.

    python examples/python_api.py [--num-samples 32]

Uses PP-OCR's text-direction classifier from the rapidocr-onnxruntime wheel.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort

import fmcompress
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.modelio import load_model
from fmcompress.passes import PassContext, Pipeline
from fmcompress.passes.fold_bn import FoldBatchNormPass
from fmcompress.passes.memory import MemoryAnalysisPass
from fmcompress.units import parse_ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=32)
    args = parser.parse_args()
    path, shapes = real_model("ppocr-cls"), {"x": (1, 3, 48, 192)}

    report = fmcompress.analyze(path, ceiling="4x", input_shapes=shapes)
    print(f"ceiling {report.ceiling_bytes} B; {len(report.over_ceiling())} stored maps above it; peaks {report.peaks}")

    # Passes compose: fold BatchNorm, then analyse the folded graph.
    model, ctx = Pipeline([FoldBatchNormPass(), MemoryAnalysisPass(parse_ceiling("4x"))]).run(
        load_model(path), PassContext(input_shapes=shapes))
    print(f"after BN folding: {len(model.graph.node)} nodes, {len(ctx.memory.stored)} stored maps")

    result = fmcompress.compile(path, ceiling="4x", input_shapes=shapes, num_samples=args.num_samples)
    print(f"compressed {len(result.plan.maps)} maps; largest stored map after: "
          f"{result.report['verification']['max_stored_bytes_after']} B; fidelity {result.report['fidelity']}")

    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"x": np.zeros((1, 3, 48, 192), np.float32)})[0]
    print(f"onnxruntime runs the compressed model: output {probabilities.shape}")


if __name__ == "__main__":
    main()
