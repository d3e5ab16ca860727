"""The plan pass: ranks k = floor(ceiling / (N*H*W*bytes)), rank-3 maps, infeasible ceilings,
maps that are never compressed (with a reason), execution order, and when an earlier analysis
in ctx.memory may be reused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fmcompress import analyze
from fmcompress.errors import InputError
from fmcompress.featuremaps import FeatureMap
from fmcompress.passes import PassContext
from fmcompress.passes.memory import MemoryAnalysisPass
from fmcompress.passes.plan import PlanPass, plan_from_report
from fmcompress.reports.analysis import AnalysisReport
from fmcompress.units import parse_ceiling


def fmap(name: str, shape: list[int], step: int, *, role: str = "map", dtype: str = "float32",
         itemsize: int = 4) -> FeatureMap:
    return FeatureMap(name=name, shape=shape, dtype=dtype, bytes=int(np.prod(shape)) * itemsize, role=role,
                      producer=f"{name}_op", producer_op="Relu", group=f"{name}_op", consumers=[], step=step,
                      last_use=step + 1)


def report_of(maps: list[FeatureMap], ceiling: str, act_bytes: int | None = None) -> AnalysisReport:
    return AnalysisReport.build(source="m.onnx", input_shapes={"x": (1, 3, 8, 8)}, act_bytes=act_bytes,
                                ceiling=parse_ceiling(ceiling), stored=maps, strict=list(maps), live=[],
                                strict_live=[])


def test_rank_is_the_ceiling_over_one_channel_and_maps_come_in_execution_order():
    # listed out of order: the plan sorts by step
    maps = [fmap("late", [1, 128, 28, 28], step=7), fmap("early", [1, 64, 56, 56], step=2),
            fmap("small", [1, 8, 8, 8], step=1)]
    plan = plan_from_report(report_of(maps, "200704"))
    assert [(m.name, m.k) for m in plan.maps] == [("early", 200704 // (56 * 56 * 4)), ("late", 200704 // (28 * 28 * 4))]
    assert [(m.k, m.bytes_after) for m in plan.maps] == [(16, 16 * 56 * 56 * 4), (64, 64 * 28 * 28 * 4)]
    assert all(m.bytes_after <= plan.ceiling_bytes < m.bytes_before for m in plan.maps)
    assert plan.to_dict()["maps"][0]["C"] == 64


def test_rank3_maps_and_act_bytes():
    # an NCL map (a detection head's [N, C, anchors]): one channel is L elements
    ncl = fmap("head", [1, 144, 2100], step=3)
    plan = plan_from_report(report_of([ncl], "100000"))
    assert [(m.name, m.k, m.bytes_after) for m in plan.maps] == [("head", 100000 // (2100 * 4), 11 * 2100 * 4)]
    # planned for int8 storage: one byte per element, so four times the rank
    int8 = fmap("head", [1, 144, 2100], step=3, itemsize=1)
    assert plan_from_report(report_of([int8], "100000", act_bytes=1)).maps[0].k == 100000 // 2100


def test_infeasible_plan_names_the_maps_and_the_smallest_feasible_ceiling():
    maps = [fmap("wide", [1, 8, 256, 256], step=1), fmap("wider", [1, 4, 512, 512], step=2),
            fmap("fine", [1, 64, 16, 16], step=3)]
    with pytest.raises(InputError) as info:
        plan_from_report(report_of(maps, "100KB"))
    message = str(info.value)
    assert "\n" not in message
    assert "wide 1x8x256x256" in message and "wider 1x4x512x512" in message and "fine" not in message
    assert "smallest feasible ceiling is 1048576 B (1.0 MiB)" in message  # one channel of `wider`
    # at that ceiling it is feasible, with rank 1 for `wider`
    plan = plan_from_report(report_of(maps, "1048576"))
    assert {m.name: m.k for m in plan.maps} == {"wide": 4, "wider": 1}


def test_a_float_map_that_cannot_be_projected_is_listed_with_its_reason():
    plan = plan_from_report(report_of([fmap("fc", [1, 100000], step=4), fmap("conv", [1, 16, 8, 8], step=1)], "1KB"))
    assert [m.name for m in plan.maps] == ["conv"]
    assert [(e["name"], e["reason"]) for e in plan.not_compressible] == [
        ("fc", "2-D map, not a 4-D NCHW or 3-D NCL map")]


def test_graph_inputs_outputs_and_integer_maps_are_listed_with_a_reason():
    maps = [fmap("probs", [1, 40, 6625], step=9, role="output"), fmap("q", [1, 64, 32, 32], step=4, dtype="uint8",
                                                                       itemsize=1),
            fmap("x", [1, 3, 224, 224], step=0, role="input"), fmap("conv", [1, 32, 32, 32], step=2)]
    plan = plan_from_report(report_of(maps, "16KB"))
    assert [m.name for m in plan.maps] == ["conv"]
    assert [(e["name"], e["reason"]) for e in plan.not_compressible] == [
        ("x", "graph input"), ("q", "integer dtype"), ("probs", "graph output")]
    assert plan.not_compressible[1] == {"name": "q", "role": "map", "shape": [1, 64, 32, 32], "dtype": "uint8",
                                        "bytes": 65536, "reason": "integer dtype", "step": 4}
    assert not maps[1].compressible and maps[3].compressible


def quantized_model() -> onnx.ModelProto:
    """x -> conv -> Relu -> QuantizeLinear (uint8, stored) -> DequantizeLinear -> conv -> y."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "sc", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["dq"]),
             helper.make_node("Conv", ["dq", "w2"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(0.1, np.float32), "sc"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantized_model_reports_its_integer_map_instead_of_planning_it():
    model = quantized_model()
    report = analyze(model, ceiling="256")
    q = {m.name: m for m in report.stored}["q"]
    assert (q.dtype, q.bytes, q.over_ceiling, q.compressible) == ("uint8", 512, True, False)
    assert report.over_ceiling() == []  # nothing the tool could compress is over the ceiling
    assert report.to_dict()["not_compressible_over_ceiling"] == ["x", "q", "y"]
    plan = PlanPass(parse_ceiling("256"))(model, PassContext()).data
    assert plan.maps == []
    assert [(e["name"], e["reason"]) for e in plan.not_compressible] == [
        ("x", "graph input"), ("q", "integer dtype"), ("y", "graph output")]


# ---------------------------------------------------------------- reuse of ctx.memory


def conv_model(height: str | int = 16, channels: int = 16) -> onnx.ModelProto:
    """x [1, 4, H, 16] -> 3x3 conv (`channels`) -> Relu = r -> 3x3 conv -> y; H may be symbolic."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    inits = [numpy_helper.from_array(rng.standard_normal((channels, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, channels, 3, 3)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, height, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, height, 16])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def planned(model: onnx.ModelProto, ctx: PassContext, ceiling: str) -> list[tuple[list[int], int]]:
    return [(m.shape, m.k) for m in PlanPass(parse_ceiling(ceiling))(model, ctx).data.maps]


def test_a_matching_analysis_is_reused():
    model, ctx = conv_model(), PassContext()
    earlier = MemoryAnalysisPass(parse_ceiling("4KB"))(model, ctx).data
    ctx.memory = earlier
    assert planned(model, ctx, "4096") == [([1, 16, 16, 16], 4)]  # one channel of r is 1 KiB
    assert ctx.memory is earlier


@pytest.mark.parametrize("change, expected", [
    ("ceiling", [([1, 16, 16, 16], 8)]),  # 8KB
    ("act_bytes", []),  # at one byte per element r is 4 KiB: at the ceiling, not above it
    ("input shapes", [([1, 16, 8, 16], 8)]),  # H = 8: one channel is 512 B
    ("graph", [([1, 32, 16, 16], 4)]),  # another model: r has 32 channels
])
def test_an_analysis_made_otherwise_is_not_reused(change, expected):
    ctx = PassContext(input_shapes={"x": (1, 4, 16, 16)})
    model = conv_model("H")
    stale = MemoryAnalysisPass(parse_ceiling("4KB"))(model, ctx).data
    ctx.memory = stale
    ceiling = "8KB" if change == "ceiling" else "4KB"
    if change == "act_bytes":
        ctx.act_bytes = 1
    elif change == "input shapes":
        ctx.input_shapes = {"x": (1, 4, 8, 16)}
    elif change == "graph":
        model = conv_model("H", channels=32)
    assert planned(model, ctx, ceiling) == expected
    fresh = ctx.memory
    assert fresh is not stale and fresh.ceiling == ceiling and fresh.act_bytes == ctx.act_bytes


def test_a_map_read_by_a_resize_is_ranked_for_its_upsampled_copy():
    """Fold carries U through the Resize, which then stores k channels at twice the size:
    the rank must fit that copy too (found on PP-OCR's detector, whose compile failed its
    ceiling check before)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from fmcompress import api

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n)
               for n, s in (("w0", (16, 3, 3, 3)), ("w1", (16, 3, 3, 3)), ("w2", (4, 16, 3, 3)))]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c0"], ["coarse"]),
             helper.make_node("Resize", ["coarse", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["lateral"]),
             helper.make_node("Add", ["up", "lateral"], ["sum"]),
             helper.make_node("Conv", ["sum", "w2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "fpn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [*weights, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ceiling = 2 * 16 * 16 * 4  # 2 channels at 16x16, 8 at 8x8
    plan = api.compile(model, ceiling=f"{ceiling}B", plan_only=True).plan
    ranks = {m.name: m.k for m in plan.maps}
    assert ranks["coarse"] == 2  # not 8: its upsampled copy holds 4x the positions
    result = api.compile(model, ceiling=f"{ceiling}B", method="pca", num_samples=16, latency_rounds=1,
                         latency_repeats=1)
    assert result.report["verification"]["ceiling_ok"]
