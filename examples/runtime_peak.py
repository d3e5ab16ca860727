"""Check the runtime view against the memory onnxruntime really takes.

    python examples/runtime_peak.py [--models resnet18,mobilenet_v2,...] [--level extended]

For each model: the runtime view's computed live peak (passes/runtime.py) beside the
measured peak growth of one inference in a fresh process (fmcompress.memprobe: arena
off, glibc's mmap threshold at 16 KiB, peak resident set reset before the run; input
excluded), and their ratio. Zoo models are exported untrained (weights do not change
memory); the real ones come from the PyPI wheels of the `test` extra.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fmcompress.memprobe import measure_peak
from fmcompress.passes.runtime import runtime_view
from fmcompress.thirdparty import REAL_MODELS, real_model
from fmcompress.units import format_bytes

ZOO = {"resnet18": (1, 3, 224, 224), "mobilenet_v2": (1, 3, 224, 224), "vgg16_bn_small": (1, 3, 32, 32)}


def model_path(name: str, workdir: Path) -> tuple[Path, tuple[int, ...]]:
    if name in REAL_MODELS:
        return real_model(name), REAL_MODELS[name].input_shape
    from fmcompress.frontend import export_model

    path = workdir / f"{name}.onnx"
    export_model(name, ZOO[name], path)
    return path, ZOO[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([*ZOO, *REAL_MODELS]))
    parser.add_argument("--level", default="extended")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'model':<16}{'computed':>12}{'measured':>12}{'measured/computed':>19}")
    ratios = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            path, shape = model_path(name, Path(workdir))
            view = runtime_view(path, _shapes(path, shape), level=args.level)
            measured = measure_peak(path, _shapes(path, shape), level=args.level, rounds=args.rounds)
            if measured.bytes is None:
                print(f"{name:<16}{format_bytes(view.peak_bytes):>12}{'n/a':>12}  {measured.reason}")
                continue
            ratio = measured.bytes / view.peak_bytes
            ratios.append(ratio)
            print(f"{name:<16}{format_bytes(view.peak_bytes):>12}{format_bytes(measured.bytes):>12}{ratio:>19.3f}")
    if ratios:
        print(f"measured/computed: {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} models")


def _shapes(path: Path, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    import onnx

    from fmcompress.shapes import graph_inputs

    model = onnx.load(str(path), load_external_data=False)
    return {graph_inputs(model)[0].name: shape}


if __name__ == "__main__":
    main()
