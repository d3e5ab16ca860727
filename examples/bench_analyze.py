"""Time `fmcompress.analyze` on ResNet-18-224 (zoo) and the PP-OCR detector (1,3,640,640).

    python examples/bench_analyze.py [--repeats 5]

Prints the median and best wall time of a full analysis (load, shapes, grouping,
three views) per model. Target: under 2 s each on a 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import fmcompress
from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model


def models(workdir: Path) -> dict[str, tuple[Path, list[str]]]:
    from fmcompress.frontend import export_model

    r18 = workdir / "resnet18.onnx"
    export_model("resnet18", (1, 3, 224, 224), r18)
    det = REAL_MODELS["ppocr-det"].input_shape
    return {"resnet18-224": (r18, []),
            "ppocr-det-640": (real_model("ppocr-det"), [",".join(map(str, det))])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        print(f"{'model':<16}{'median s':>10}{'best s':>10}{'stored maps':>13}{'tensors':>9}")
        for name, (path, shapes) in models(Path(workdir)).items():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                report = fmcompress.analyze(path, ceiling="4x", input_shapes=shapes)
                times.append(time.perf_counter() - start)
            print(f"{name:<16}{statistics.median(times):>10.3f}{min(times):>10.3f}"
                  f"{len(report.stored):>13}{len(report.strict):>9}")


if __name__ == "__main__":
    main()
