"""The runtime view (passes/runtime.py) against onnxruntime's own trace and a measured peak."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fmcompress.cli import main
from fmcompress.errors import InputError
from fmcompress.memprobe import measure_peak
from fmcompress.passes.runtime import optimized_model, runtime_view


def conv_chain(channels: int = 16, size: int = 128) -> onnx.ModelProto:
    """x -> Conv+Relu -> Conv+Relu -> Conv -> Add(skip) -> Reshape -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r0"], ["sum"]),
             helper.make_node("MaxPool", ["sum"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    flat = channels * (size // 8) ** 2
    inits = [weight("w0", channels, 3, 3, 3), weight("w1", channels, channels, 3, 3),
             weight("w2", channels, channels, 3, 3), weight("fc", 10, flat),
             numpy_helper.from_array(np.array([1, flat], np.int64), "shape")]
    for i, node in enumerate(nodes):
        node.name = f"{node.op_type.lower()}{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_execution_order_is_onnxruntimes(tmp_path):
    """Rule a: the saved optimised graph lists nodes in the order the profiler sees them run."""
    model = conv_chain(size=32)
    optimized = optimized_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "trace")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros((1, 3, 32, 32), np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    ran = [e["name"].removesuffix("_kernel_time") for e in events
           if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    assert ran == [node.name for node in optimized.graph.node]
    assert "FusedConv" in {node.op_type for node in optimized.graph.node}  # Conv+Relu fused


def test_view_sizes_fusions_aliases_and_leaves_the_input_out():
    view = runtime_view(conv_chain(), ceiling_bytes=512 * 1024)
    by_name = {t.name: t for t in view.tensors}
    assert by_name["x"].role == "input" and not by_name["x"].over_ceiling
    assert "c0" not in by_name and by_name["r0"].producer_op == "com.microsoft.FusedConv"  # rule a
    assert by_name["r0"].bytes == 16 * 128 * 128 * 4 and by_name["r0"].shape == [1, 16, 128, 128]
    assert by_name["flat"].bytes == 0  # rule c: a Reshape aliases its input ...
    assert by_name["pooled"].last_use == by_name["logits"].step  # ... whose buffer lives until Gemm reads it
    # rule d: r0 (read by the Add) is alive with r1 and c2 at the Add's step: three 1 MiB maps
    add_step = by_name["sum"].step
    assert view.live[add_step].bytes == sum(by_name[n].bytes for n in ("r0", "c2", "sum"))
    assert view.peak_bytes == max(p.bytes for p in view.live) == 3 * 16 * 128 * 128 * 4
    assert {t.name for t in view.over_ceiling()} == {"r0", "r1", "c2", "sum"}


@pytest.mark.parametrize("level", ["extended", pytest.param("all", marks=pytest.mark.xfail(
    reason="at all the view does not model NCHWc convs summing into their Sum input in place nor "
           "onnxruntime's buffer reuse: 3.0 MiB computed, 2.0 MiB measured here", strict=False))])
def test_computed_peak_agrees_with_the_measured_one(level):
    measured = measure_peak(conv_chain(), {"x": (1, 3, 128, 128)}, level=level)
    if measured.bytes is None:
        pytest.skip(measured.reason)
    computed = runtime_view(conv_chain(), level=level).peak_bytes
    assert 0.85 <= measured.bytes / computed <= 1.1, (measured, computed)


def test_a_model_onnxruntime_cannot_load_is_an_input_error():
    model = conv_chain(size=32)
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InputError, match="onnxruntime cannot load"):
        runtime_view(model)


def test_cli_runtime_mode_table_json_and_gate(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), str(path))
    runner = CliRunner()
    shown = runner.invoke(main, ["analyze", str(path), "--ceiling", "512KB", "--mode", "runtime",
                                 "--json", str(tmp_path / "a.json")])
    assert shown.exit_code == 0, shown.output
    assert "FusedConv" in shown.output and "runtime 3.0 MiB" in shown.output
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["peaks"]["runtime"] == 3 * 16 * 128 * 128 * 4
    assert set(data["runtime"]["over_ceiling"]) == {"r0", "r1", "c2", "sum"}
    gated = runner.invoke(main, ["analyze", str(path), "--ceiling", "512KB", "--mode", "runtime",
                                 "--fail-over-ceiling", "-q"])
    assert gated.exit_code == 1 and "4 onnxruntime allocation(s)" in gated.output
    stored = runner.invoke(main, ["analyze", str(path), "--ceiling", "4MB", "--mode", "runtime",
                                  "--fail-over-ceiling", "-q"])
    assert stored.exit_code == 0, stored.output


def test_cli_model_onnxruntime_cannot_run_is_one_line_exit_2(tmp_path):
    model = conv_chain(size=32)
    model.graph.node[1].op_type = "NoSuchOp"
    model.graph.node[1].domain = "custom.domain"
    model.opset_import.append(helper.make_opsetid("custom.domain", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    result = CliRunner().invoke(main, ["analyze", str(path), "--mode", "runtime"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
