"""The allocate pass (--traffic): the budget holds on the emitted model, infeasible budgets, the
ceiling as an upper bound, the greedy order (redundant channels are cut first), the CLI wiring,
and traffic+latency preferring a map whose projection folds over one feeding a depthwise conv."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from test_outputs import assert_one_line_error

from fmcompress.cli import main
from fmcompress.compiler import NO_CEILING, CompileOptions, build_context, compile_model
from fmcompress.data import Dataset
from fmcompress.errors import InputError
from fmcompress.passes import Pipeline
from fmcompress.passes.allocate import (
    AllocatePass,
    MapProxy,
    greedy_ranks,
    stored_traffic,
    uniform_ranks,
)
from fmcompress.passes.memory import MemoryAnalysisPass
from fmcompress.passes.plan import PlanPass

PLANE = 16 * 16 * 4  # bytes of one 16x16 float32 channel
FAST = {"method": "pca", "num_samples": 32, "batch_size": 8, "latency_rounds": 1, "latency_repeats": 1}


def _conv(name: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", inputs, [output], name=name, **attrs)


def two_map_model(depthwise: bool) -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv(8, filters 4-7 repeat 0-3) -> Relu -> a -> second conv -> Relu -> b -> Conv3x3(4) -> y.

    a has 4 duplicated channels (rank 4). With depthwise=False the second conv is a random 3x3
    group=1 conv (b: full rank); with depthwise=True it is a 3x3 depthwise conv whose filters repeat
    like a's channels, so b is rank 4 too, and a feeds a depthwise conv while b feeds a group=1 conv.
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.4
    w1[4:] = w1[:4]
    if depthwise:
        w2 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.5
        w2[4:] = w2[:4]
        second = _conv("dw", ["a", "w2"], "c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8)
    else:
        w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.3
        second = _conv("conv2", ["a", "w2"], "c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    w3 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3
    nodes = [_conv("conv1", ["x", "w1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a"], name="relu1"), second,
             helper.make_node("Relu", ["c2"], ["b"], name="relu2"), _conv("conv3", ["b", "w3"], "y", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))]
    graph = helper.make_graph(nodes, "two_maps", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def data(count: int = 32) -> Dataset:
    return Dataset({"x": np.random.default_rng(1).standard_normal((count, 3, 16, 16)).astype(np.float32)})


def allocate(model: onnx.ModelProto, budget: str, objective: str = "traffic", latency_weight: float = 1.0):
    ctx = build_context(model, None, None)
    Pipeline([MemoryAnalysisPass(NO_CEILING), PlanPass(NO_CEILING),
              AllocatePass(budget, data(), objective=objective, batch_size=8,
                           latency_weight=latency_weight)]).run(model, ctx)
    return ctx.allocation, ctx


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("allocate")
    path = folder / "two.onnx"
    onnx.save(two_map_model(depthwise=False), str(path))
    np.savez(folder / "data.npz", x=data().inputs["x"])
    return path


# --- the greedy rule on constructed proxies -------------------------------------------------


def proxy(name: str, step: int, energy: list[float], probes: list[tuple[int, float]]) -> MapProxy:
    return MapProxy(name=name, shape=[1, 8, 16, 16], plane_bytes=PLANE, k_max=8, producer=name, step=step,
                    energy_lost=energy, probes=probes)


def test_greedy_cuts_the_map_with_the_lower_cost_per_byte_first():
    flat = [1 - k / 8 for k in range(9)]
    redundant = [max(0.0, 0.5 - k / 8) for k in range(9)]  # half the channels carry nothing
    proxies = [proxy("flat", 1, flat, [(4, 0.5)]), proxy("redundant", 2, redundant, [(2, 0.5)])]
    ranks, steps = greedy_ranks(proxies, budget_bytes=12 * PLANE, fixed=0)
    assert ranks == {"flat": 8, "redundant": 4} and steps == 4
    # the flat map's cost grows with every channel cut; the redundant one's is 0 down to 4
    assert proxies[1].fidelity_cost(4) == 0 < proxies[0].fidelity_cost(7)
    # uniform: the same k/C on both, rounded so the total fits
    assert uniform_ranks(proxies, 12 * PLANE, 0) == {"flat": 6, "redundant": 6}


# --- the pass on real graphs ---------------------------------------------------------------


def test_duplicated_channels_are_cut_before_a_full_rank_map():
    model = two_map_model(depthwise=False)
    allocation, ctx = allocate(model, "12KB")  # the two maps hold 16 KiB: 4 channels must go
    assert allocation.ranks == {"a": 4, "b": 8}
    assert [(m.name, m.k) for m in ctx.plan.maps] == [("a", 4)]
    assert allocation.traffic_planned <= allocation.budget_bytes == 12 * 1024
    by_name = {p.name: p for p in allocation.proxies}
    assert by_name["a"].energy_lost[4] < 1e-6 < by_name["b"].energy_lost[4]


def test_infeasible_budget_is_an_input_error():
    with pytest.raises(InputError, match="smallest feasible budget is 2048 B"):
        allocate(two_map_model(depthwise=False), "100x")


def test_traffic_and_ceiling_both_hold_on_the_emitted_model(model_path):
    options = CompileOptions(ceiling="6KB", traffic="1.5x", data=str(model_path.parent / "data.npz"), **FAST)
    result = compile_model(model_path, options)
    section = result.report["allocation"]
    assert section["budget_bytes"] == 16384 * 2 // 3
    assert stored_traffic(result.after) == section["traffic_after_bytes"] <= section["budget_bytes"]
    assert all(m.k <= 6 for m in result.plan.maps) and result.report["verification"]["ceiling_ok"]
    assert max(m.bytes for m in result.after.stored if m.compressible) <= 6 * 1024
    # the ceiling alone binds harder than the traffic: its ranks are kept
    result = compile_model(model_path, CompileOptions(ceiling="3KB", traffic="1.1x", data=options.data, **FAST))
    assert [m.k for m in result.plan.maps] == [3, 3]
    assert stored_traffic(result.after) <= result.report["allocation"]["budget_bytes"]


def test_traffic_and_latency_prefers_the_map_whose_projection_folds():
    model = two_map_model(depthwise=True)
    traffic, _ = allocate(model, "12KB")
    latency, _ = allocate(model, "12KB", objective="traffic+latency")
    explicit = {p.name: p.explicit_u for p in latency.proxies}
    assert explicit == {"a": 1, "b": 0}  # a feeds the depthwise conv, b a group=1 conv
    assert traffic.ranks == {"a": 4, "b": 8}  # equal cost: the earlier map
    assert latency.ranks == {"a": 8, "b": 4}
    assert latency.traffic_planned <= latency.budget_bytes
    unweighted, _ = allocate(model, "12KB", objective="traffic+latency", latency_weight=0.0)
    assert unweighted.ranks == traffic.ranks and unweighted.latency_weight == 0.0


# --- the command line ------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_traffic_writes_the_allocation_section(model_path, tmp_path):
    npz = model_path.parent / "data.npz"
    common = ["--data", npz, "--method", "pca", "--num-samples", "32", "--batch-size", "8", "-q"]
    result = run("compile", model_path, "--traffic", "12KB", "-o", tmp_path / "m.onnx", "--json",
                 tmp_path / "r.json", *common)
    assert result.exit_code == 0, result.output
    assert "stored traffic 16.0 KiB -> 12.0 KiB (1.33x, budget 12KB)" in result.stdout.splitlines()[-1]
    report = json.loads((tmp_path / "r.json").read_text())
    section = report["allocation"]
    assert {"budget", "budget_bytes", "objective", "traffic_before_bytes", "traffic_after_bytes", "traffic_ratio",
            "estimated_rel_error", "measured_rel_error", "maps"} <= set(section)
    assert [(m["name"], m["k"]) for m in section["maps"]] == [("a", 4), ("b", 8)]
    assert {"C", "k_max", "bytes_after", "energy_lost", "probes", "cost", "explicit_u"} <= set(section["maps"][0])
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["fmcompress.traffic_bytes"] == "12288"
    plan = run("compile", model_path, "--traffic", "12KB", "--plan-only", "--json", tmp_path / "p.json", *common)
    assert plan.exit_code == 0 and "allocation" in json.loads((tmp_path / "p.json").read_text())


@pytest.mark.parametrize(("args", "message"), [
    ([], "missing option '--ceiling'"),
    (["--traffic", "100x"], "smallest feasible budget"),
    (["--traffic", "lots"], "invalid traffic budget"),
    (["--traffic", "2x", "--objective", "traffic+latency", "--latency-weight", "-1"], "--latency-weight"),
])
def test_cli_budget_errors_exit_2_on_one_line(model_path, tmp_path, args, message):
    result = run("compile", model_path, *args, "-o", tmp_path / "m.onnx", "--data", model_path.parent / "data.npz",
                 "--method", "pca", "--num-samples", "32", "-q")
    assert_one_line_error(result, contains=message)
    assert not (tmp_path / "m.onnx").exists()
