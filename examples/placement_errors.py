"""Where to project: the error at each stored map X, projected at X or before its activation.

For every map that `--placement before` would move (passes/before_activation.py), on
calibration lines of PP-OCR's recognizer or classifier: the rank-k PCA of X (the plan's k,
the second moment as compile's PCA start takes it) against the rank-k PCA of T, the group's
linear part, passed through the region between T and X (the activation and its affine ops,
run by onnxruntime). The figure is |X_hat - X|^2 / |X|^2 over the lines; each map alone,
the original network before it. It is what rule e of the pass rests on: after a pointwise
conv T is low-rank, after a depthwise one it is not.

    python examples/placement_errors.py [--model ppocr-rec|ppocr-cls] [--ceiling 4x] [--set first|second]
        [--lines 128]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.evaluation import otherlines, textlines
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.modelio import load_model
from fmcompress.passes.before_activation import tensor_before_activation
from fmcompress.passes.memory import GraphIndex

SHAPES = {"ppocr-rec": (3, 48, 320), "ppocr-cls": (3, 48, 192)}
SETS = {"first": textlines, "second": otherlines}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor kept as named
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy whose outputs are `names` (declared, so the extractor finds them between)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return probe


def activations(probe: onnx.ModelProto, names: list[str], inputs: np.ndarray) -> dict[str, np.ndarray]:
    run = session(probe)
    feed = run.get_inputs()[0].name
    rows = [run.run(None, {feed: x[None]}) for x in inputs]  # one line at a time: the batch dim may be fixed
    return {n: np.concatenate([row[i] for row in rows]) for i, n in enumerate(names)}


def pca(x: np.ndarray, k: int) -> np.ndarray:
    """x's rank-k reconstruction from its uncentred channel second moment."""
    flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).astype(np.float64)
    basis = np.linalg.eigh(flat @ flat.T)[1][:, -k:]
    return np.moveaxis((basis @ (basis.T @ flat)).reshape(x.shape[1], x.shape[0], *x.shape[2:]), 0, 1)


def relative_error(estimate: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((estimate - x) ** 2) / np.sum(x.astype(np.float64) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="ppocr-rec")
    parser.add_argument("--ceiling", default="4x")
    parser.add_argument("--set", choices=sorted(SETS), default="second")
    parser.add_argument("--lines", type=int, default=128)
    args = parser.parse_args()
    path = str(real_model(args.model))
    shape = SHAPES[args.model]
    plan = compile_model(path, CompileOptions(ceiling=args.ceiling, placement="before",
                                              input_shapes=[f"x=1,{','.join(map(str, shape))}"]),
                         plan_only=True).plan
    moved = [m for m in plan.maps if m.stored_map]
    lines = SETS[args.set]
    data = lines.cls_dataset if args.model == "ppocr-cls" else lines.rec_dataset
    inputs = np.asarray(data(args.lines, 0)[0], np.float32)
    model = load_model(path)
    index = GraphIndex(model)
    names = list(dict.fromkeys(t for m in moved for t in (m.name, m.stored_map)))
    model = with_outputs(model, names)
    acts = activations(model, names, inputs)
    table = Table(title=f"{args.model} at {args.ceiling}, {args.lines} lines of set {args.set}")
    for column in ("stored map", "conv", "C", "k", "error at X", "error before", "before / at X"):
        table.add_column(column)
    wins = {True: [0, 0], False: [0, 0]}
    for m in moved:
        x = acts[m.stored_map]
        region = session(onnx.utils.Extractor(model).extract_model([m.name], [m.stored_map]))
        after = relative_error(pca(x, m.k), x)
        before = relative_error(region.run(None, {m.name: pca(acts[m.name], m.k).astype(np.float32)})[0], x)
        pointwise = tensor_before_activation(index, m.stored_map, pointwise_only=True) is not None  # rule e itself
        wins[pointwise][0] += before < after
        wins[pointwise][1] += 1
        table.add_row(m.stored_map, "pointwise" if pointwise else "other", str(m.channels), str(m.k),
                      f"{after:.4f}", f"{before:.4f}", f"{before / after:.2f}")
    Console(width=140).print(table)
    for pointwise, (won, total) in wins.items():
        print(f"{'after a pointwise conv' if pointwise else 'after any other conv'}: before the activation "
              f"reconstructs X better on {won} of {total} maps")


if __name__ == "__main__":
    main()
