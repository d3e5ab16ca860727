"""Check the runtime view against the memory onnxruntime really takes.

    python examples/runtime_peak.py [--models resnet18,mobilenet_v2,...] [--level extended]

For each model: the runtime view's computed live peak (passes/runtime.py; `per tensor`: the same
without onnxruntime's reuse of freed buffers, what a session with enable_mem_reuse off plans) beside the
measured peak growth of one inference in a fresh process (fmcompress.memprobe: arena
off, glibc's mmap threshold at 4 KiB, peak resident set reset before the run; input
excluded), and their ratio. Zoo models are exported untrained (weights do not change
memory); the real ones come from the PyPI wheels of the `test` extra.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmodels import ZOO, model_path

from fmcompress.evaluation.thirdparty import REAL_MODELS
from fmcompress.memprobe import measure_peak
from fmcompress.passes.runtime import runtime_view
from fmcompress.units import format_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([*ZOO, *REAL_MODELS]))
    parser.add_argument("--level", default="extended")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'model':<16}{'per tensor':>12}{'computed':>12}{'measured':>12}{'measured/computed':>19}")
    ratios = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            path, shapes = model_path(name, Path(workdir))
            view = runtime_view(path, shapes, level=args.level)
            per_tensor = format_bytes(runtime_view(path, shapes, level=args.level, reuse=False).peak_bytes)
            measured = measure_peak(path, shapes, level=args.level, rounds=args.rounds)
            if measured.bytes is None:
                print(f"{name:<16}{per_tensor:>12}{format_bytes(view.peak_bytes):>12}{'n/a':>12}  {measured.reason}")
                continue
            ratio = measured.bytes / view.peak_bytes
            ratios.append(ratio)
            print(f"{name:<16}{per_tensor:>12}{format_bytes(view.peak_bytes):>12}{format_bytes(measured.bytes):>12}"
                  f"{ratio:>19.3f}")
    if ratios:
        print(f"measured/computed: {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} models")


if __name__ == "__main__":
    main()
