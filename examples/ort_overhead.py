"""onnxruntime's own memory per node: what one inference holds besides the tensors.

    python examples/ort_overhead.py [--nodes 500,2000,8000] [--levels none,all]

Each model is a chain of N Adds of a one-element tensor, so its tensors are a few bytes
and the measured peak (fmcompress.memprobe: a fresh process, arena and memory patterns
off, one thread) is onnxruntime's per-run bookkeeping. The slope between the largest and
the smallest chain is the bytes each node costs for the whole run. The runtime view
(passes/runtime.py) counts tensors and convolution scratch only; a tiled graph of
thousands of nodes pays this on top (docs/peak.md, "What the figures leave out").
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fmcompress.memprobe import measure_peak


def add_chain(nodes: int) -> onnx.ModelProto:
    """`nodes` Adds in a row on a one-element float tensor."""
    chain = [helper.make_node("Add", ["x" if i == 0 else f"t{i}", "one"], [f"t{i + 1}"]) for i in range(nodes)]
    graph = helper.make_graph(chain, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(f"t{nodes}", TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="500,2000,8000", help="chain lengths, comma-separated")
    parser.add_argument("--levels", default="none,all", help="onnxruntime optimisation levels")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.nodes.split(","))
    for level in args.levels.split(","):
        peaks = {}
        for count in counts:
            measured = measure_peak(add_chain(count), {}, level=level, rounds=args.rounds)
            peaks[count] = measured.bytes
            figure = "n/a: " + measured.reason if measured.bytes is None else f"{measured.bytes / 1024:.0f} KiB"
            print(f"{level}: {count} nodes: {figure}", flush=True)
        low, high = counts[0], counts[-1]
        if high > low and peaks[low] is not None and peaks[high] is not None:
            print(f"{level}: {(peaks[high] - peaks[low]) / (high - low):.0f} bytes a node", flush=True)


if __name__ == "__main__":
    main()
