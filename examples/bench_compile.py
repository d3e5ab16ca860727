"""Compile benchmark: wall time, fidelity and latency ratio of `compile` on five models.

    python examples/bench_compile.py [--num-samples 256] [--ceiling 4x] [--model NAME ...]
        [--samples-per-epoch 512]

Models: the trained digits demo (`models/`, its real test split via `--data mnist`),
the zoo ResNet-18 at 224 (exported here), PP-OCR's classifier (1,3,48,192) and
recognizer (1,3,48,320) and YOLOv8n (1,3,320,320) from their PyPI wheels; surrogate
calibration data for all but the demo. Each row is one full compile (plan, PCA over
the calibration part, training for `learned`, folding, verification, fidelity on the
held-out part, onnxruntime latency of compressed over original: interleaved rounds in
the same run, median of the per-round ratios and its range over rounds, with --threads
intra-op threads). `fit s` is the projections' pass (PCA, the block stage and training),
`block s` learned's block reconstruction stage; `s/epoch` the
median wall time of an epoch (its steps and the held-out score), each epoch drawing
`--samples-per-epoch` samples (all of the calibration part when it has fewer).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model
from fmcompress.metrics import gated_agreement
from fmcompress.models import digits_onnx_path
from fmcompress.train_config import TrainConfig


def models(workdir: Path) -> dict[str, tuple[Path, list[str], str | None]]:
    """name: (model, --input-shape values, --data: None for the surrogate photographs)."""
    from fmcompress.frontend import export_model

    r18 = workdir / "resnet18.onnx"
    export_model("resnet18", (1, 3, 224, 224), r18)
    shape = {name: [",".join(map(str, REAL_MODELS[name].input_shape))]
             for name in ("ppocr-cls", "ppocr-rec", "yolov8n")}
    return {"demo": (digits_onnx_path(), [], "mnist"),
            "resnet18-224": (r18, [], None),
            "ppocr-cls": (real_model("ppocr-cls"), shape["ppocr-cls"], None),
            "ppocr-rec": (real_model("ppocr-rec"), shape["ppocr-rec"], None),
            "yolov8n-320": (real_model("yolov8n"), shape["yolov8n"], None)}


def row(name: str, seconds: float, report: dict) -> str:
    fid, lat = report["fidelity"], report["latency_ms"]
    low, high = lat["spread"]["ratio"]
    what, agreement = gated_agreement(fid)
    top1 = "n/a" if agreement is None else f"{agreement:.1%}" + (" (sequence)" if what.startswith("sequence") else "")
    fit = report["timings_s"].get("fit", float("nan"))
    history = (report.get("training") or {}).get("history", [])
    block = ((report.get("training") or {}).get("block_stage") or {}).get("seconds")
    block_s = "-" if block is None else f"{block:.1f}"
    per_epoch = f"{statistics.median(epoch['seconds'] for epoch in history):.1f}" if history else "-"
    return (f"| {name} | {report['ceiling']} | {len(report['maps'])} | {seconds:.1f} | {fit:.1f} | {block_s} | "
            f"{per_epoch} | {top1} | "
            f"{fid['cosine_similarity']:.4f} | {fid['relative_error']:.3f} | {lat['original']:.2f} | "
            f"{lat['compressed']:.2f} | {lat['ratio']:.2f} ({low:.2f}-{high:.2f}) | {report['flops']['ratio']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--ceiling", action="append", help="ceilings to run (default: 4x and 256KB)")
    parser.add_argument("--model", action="append", help="models to run (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for latency")
    parser.add_argument("--method", default="learned", help="pca, learned or random")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (learned, random)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    parser.add_argument("--samples-per-epoch", type=int, default=512, help="training samples per epoch")
    args = parser.parse_args()
    ceilings = args.ceiling or ["4x", "256KB"]
    print(f"method {args.method}, {args.num_samples} samples, onnxruntime threads {args.threads}, "
          f"{args.rounds} interleaved latency rounds")
    print("| model | ceiling | maps | compile s | fit s | block s | s/epoch | agreement | cosine | rel. error | ort ms before | "
          "ort ms after | latency ratio (range) | FLOPs ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as workdir:
        for name, (path, shapes, data) in models(Path(workdir)).items():
            if args.model and name not in args.model:
                continue
            for ceiling in ceilings:
                options = CompileOptions(ceiling=ceiling, input_shapes=shapes, num_samples=args.num_samples,
                                         data=data,
                                         threads=args.threads, latency_rounds=args.rounds, method=args.method,
                                         training=TrainConfig(epochs=args.epochs,
                                                              max_samples=args.samples_per_epoch))
                start = time.perf_counter()
                try:
                    result = compile_model(path, options)
                except Exception as exc:  # report and go on: one infeasible ceiling is not the benchmark's end
                    print(f"| {name} | {ceiling} | {type(exc).__name__}: {exc} |")
                    continue
                print(row(name, time.perf_counter() - start, result.report), flush=True)


if __name__ == "__main__":
    main()
