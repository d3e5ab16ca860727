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


@pytest.mark.parametrize("level", ["extended", "all"])
def test_computed_peak_agrees_with_the_measured_one(level):
    """At `all` the NCHWc conv sums into its residual input in place (rule g): 2.0 MiB, not 3.0."""
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


def pointwise_chain(size: int = 128) -> onnx.ModelProto:
    """x -> MaxPool a[8] -> b[4] -> d[32] -> e[4] -> c[8] -> out[8], 1x1 convs: a and c, b and e share
    their shapes, and a dies (step 1) before c is born (step 4)."""
    rng = np.random.default_rng(0)
    widths = {"b": (4, 8), "d": (32, 4), "e": (4, 32), "c": (8, 4), "out": (8, 8)}
    inits = [numpy_helper.from_array((rng.standard_normal((o, i, 1, 1)) * 0.1).astype(np.float32), f"w_{name}")
             for name, (o, i) in widths.items()]
    nodes = [helper.make_node("MaxPool", ["x"], ["a"], kernel_shape=[1, 1], name="pool")]
    source = "a"
    for name in widths:
        nodes.append(helper.make_node("Conv", [source, f"w_{name}"], [name], name=f"conv_{name}"))
        source = name
    graph = helper.make_graph(nodes, "pointwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, 8, size, size])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_freed_buffer_is_reused_for_a_later_tensor_of_its_shape_and_held_between():
    """Rule g: c takes a's freed buffer (same shape), e takes b's; each buffer is held from its
    first tensor's birth to its last's death, so the held a counts beside d."""
    view = runtime_view(pointwise_chain())
    by_name = {t.name: t for t in view.tensors}
    plane = 128 * 128 * 4
    assert by_name["c"].bytes == by_name["a"].bytes == 8 * plane  # the per-tensor sizes are unchanged
    assert by_name["a"].last_use == 1 and by_name["c"].step == 4
    d_step = by_name["d"].step
    assert view.live[d_step].bytes == (8 + 4 + 32) * plane  # held a (for c), held b (for e), d
    assert view.peak_bytes == (8 + 4 + 32) * plane
    unshared = runtime_view(pointwise_chain(), reuse=False)  # enable_mem_reuse off: per-tensor lifetimes
    assert unshared.peak_bytes == (4 + 32) * plane


def test_alive_at_the_peak_lists_each_buffer_once_by_the_tensor_it_holds():
    """The tensors alive at the peak sum to the peak: a held buffer (a, kept for c) is listed
    beside d, once, and at c's step it is listed as c."""
    view = runtime_view(pointwise_chain())
    alive = view.alive_at(view.peak_step)
    assert sum(t.bytes for t in alive) == view.peak_bytes
    assert sorted(t.name for t in alive) == ["a", "b", "d"]
    by_name = {t.name: t for t in view.tensors}
    at_c = {t.name for t in view.alive_at(by_name["c"].step)}
    assert "c" in at_c and "a" not in at_c
    for point in view.live:
        assert sum(t.bytes for t in view.alive_at(point.step)) == point.bytes


def test_buffers_list_the_chains_of_tensors_that_share_memory():
    from fmcompress.passes.runtime import _tensor_infos, runtime_buffers, runtime_tensors
    from fmcompress.shapes import with_input_shapes

    shapes = {"x": (1, 8, 32, 32)}
    optimized = optimized_model(with_input_shapes(pointwise_chain(32), shapes))
    infos = _tensor_infos(optimized, shapes)
    buffers = runtime_buffers(optimized, shapes, infos, runtime_tensors(optimized, shapes, infos, None))
    chains = {b.root: (b.tensors, b.kinds, b.step, b.last_use) for b in buffers}
    assert chains["a"] == (["a", "c"], {"c": "reuse"}, 0, 5)
    assert chains["b"] == (["b", "e"], {"e": "reuse"}, 1, 4)
    assert chains["out"][0] == ["out"]  # a graph output is the caller's: never shared


def relu_after(fan_out: bool, size: int = 128) -> onnx.ModelProto:
    """x -> MaxPool m -> Relu r -> Conv out (and, with fan_out, m also read by an Add after the conv)."""
    w = numpy_helper.from_array(np.full((16, 16, 1, 1), 0.01, np.float32), "w")
    nodes = [helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[1, 1], name="pool"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["c" if fan_out else "out"], name="conv")]
    if fan_out:
        nodes.append(helper.make_node("Add", ["c", "m"], ["out"], name="add"))
    info = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "relu", [info("x", TensorProto.FLOAT, [1, 16, size, size])],
                              [info("out", TensorProto.FLOAT, [1, 16, size, size])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_relu_runs_in_place_on_the_last_use_of_its_input():
    """Rule g: Relu's output takes its input's buffer when the Relu is that input's last reader."""
    one = 16 * 128 * 128 * 4
    view = runtime_view(relu_after(fan_out=False), level="basic")  # basic: Relu stays its own node
    by_name = {t.name: t for t in view.tensors}
    assert by_name["r"].producer_op == "Relu" and by_name["r"].bytes == one
    assert view.live[by_name["r"].step].bytes == one  # m and r are one buffer
    assert view.peak_bytes == 2 * one  # r's buffer and the conv's output
    shared = runtime_view(relu_after(fan_out=True), level="basic")  # m is read again: not in place
    by_name = {t.name: t for t in shared.tensors}
    assert shared.live[by_name["r"].step].bytes == 2 * one


@pytest.mark.parametrize("model", ["pointwise", "relu"])
def test_reuse_and_in_place_agree_with_the_measured_peak(model):
    proto, shapes = ((pointwise_chain(), {"x": (1, 8, 128, 128)}) if model == "pointwise"
                     else (relu_after(fan_out=False), {"x": (1, 16, 128, 128)}))
    measured = measure_peak(proto, shapes, level="basic", rounds=7)  # a median steadier under load
    if measured.bytes is None:
        pytest.skip(measured.reason)
    computed = runtime_view(proto, shapes, level="basic").peak_bytes
    assert 0.9 <= measured.bytes / computed <= 1.1, (measured, computed)


def test_tensors_whose_shape_onnxruntime_cannot_infer_share_no_buffer():
    """Rule g': a Slice whose steps are computed from data (how tiled bands are ordered,
    passes/tile_emit.py rule g) leaves its output's shape unknown when onnxruntime loads the
    model, and everything after it: no freed buffer is reused, as with reuse off."""
    model = pointwise_chain(64)
    graph = model.graph
    graph.node[0].output[0] = "pooled"
    graph.node.insert(1, helper.make_node("ReduceMin", ["pooled"], ["low"], keepdims=0, name="low"))
    graph.node.insert(2, helper.make_node("Mul", ["low", "zero"], ["nothing"], name="times_zero"))
    graph.node.insert(3, helper.make_node("Cast", ["nothing"], ["nothing_int"], to=TensorProto.INT64, name="cast"))
    graph.node.insert(4, helper.make_node("Add", ["nothing_int", "one"], ["step"], name="plus_one"))
    graph.node.insert(5, helper.make_node("Slice", ["pooled", "starts", "ends", "axes", "step"], ["a"], name="rows"))
    graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), "zero"),
                              *(numpy_helper.from_array(np.array(v, np.int64), n)
                                for n, v in (("one", [1]), ("starts", [0]), ("ends", [64]), ("axes", [2])))])
    view, unshared = runtime_view(model), runtime_view(model, reuse=False)
    assert view.peak_bytes == unshared.peak_bytes < runtime_view(pointwise_chain(64)).peak_bytes
