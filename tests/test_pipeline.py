"""compile as a pipeline of passes, and the ways it could write a wrong or misleading result:
a batch fixed by the graph, float16 models, the fidelity gate, weak data, latency figures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from modeltools import sequence_head, with_float_type
from onnx import TensorProto, helper, numpy_helper

from fmcompress.compiler import CompileOptions, build_context, compile_model
from fmcompress.data import load_dataset
from fmcompress.errors import VerificationError
from fmcompress.modelio import load_model
from fmcompress.passes import PassContext, Pipeline
from fmcompress.passes.fit import FitProjectionsPass
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.fold_bn import FoldBatchNormPass
from fmcompress.passes.measure import MeasurePass, fidelity_line
from fmcompress.passes.memory import MemoryAnalysisPass
from fmcompress.passes.plan import PlanPass
from fmcompress.passes.verify import VerifyPass
from fmcompress.reports.compile import ceiling_verdict
from fmcompress.units import parse_ceiling

QUICK = {"num_samples": 8, "batch_size": 4, "latency_rounds": 2, "latency_repeats": 2, "method": "pca"}


@pytest.fixture(scope="module")
def small_resnet(zoo_onnx):
    return zoo_onnx("resnet18_small", (1, 3, 32, 32))


def test_a_pipeline_assembled_by_hand_equals_compile(small_resnet):
    """The README's promise: compile is these passes, and a user can run them in Python."""
    compiled = compile_model(small_resnet, CompileOptions(ceiling="4x", **QUICK))
    model = load_model(small_resnet)
    ctx = build_context(model, None, None)
    dataset = load_dataset(None, _specs(model, ctx), num_samples=8)
    calibration, held_out = dataset.split(0.25, seed=0)
    ceiling = parse_ceiling("4x")
    folded, ctx = Pipeline([
        MemoryAnalysisPass(ceiling), PlanPass(ceiling), FitProjectionsPass(calibration, method="pca", batch_size=4),
        FoldBatchNormPass(), FoldProjectionsPass(), VerifyPass(model, held_out, batch_size=4),
        MeasurePass(model, held_out, batch_size=4, rounds=1, repeats=1),
    ]).run(model, ctx)
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in compiled.model.graph.node]
    for mine, theirs in zip(folded.graph.initializer, compiled.model.graph.initializer, strict=True):
        np.testing.assert_allclose(numpy_helper.to_array(mine), numpy_helper.to_array(theirs), rtol=1e-5, atol=1e-6)
    assert set(ctx.timings) == {"memory", "plan", "fit", "fold-bn", "fold-projections", "verify", "measure"}
    assert ctx.verification["executor_relative_error"] <= 1e-4


def _specs(model, ctx):
    from fmcompress.data import input_specs

    return input_specs(model, ctx.input_shapes)


def test_pca_projections_are_orthonormal(small_resnet):
    result = compile_model(small_resnet, CompileOptions(ceiling="4x", **QUICK))
    assert len(result.projections) == len(result.plan.maps) == 9
    for planned in result.plan.maps:
        projection = result.projections[planned.name]
        assert projection.P.shape == (planned.k, planned.channels)
        np.testing.assert_allclose(projection.P @ projection.P.T, np.eye(planned.k), atol=1e-5)
        np.testing.assert_array_equal(projection.U, projection.P.T)


def test_report_figures_are_computed(small_resnet):
    report = compile_model(small_resnet, CompileOptions(ceiling="4x", threads=1, **QUICK)).report
    assert report["schema_version"] == 2
    verification = report["verification"]
    assert verification["ceiling_ok"] is True and verification["over_ceiling"] == []
    assert verification["max_stored_bytes_after"] <= report["ceiling_bytes"]
    latency = report["latency_ms"]
    assert latency["threads"] == 1 and latency["rounds"] == 2
    assert latency["spread"]["ratio"][0] <= latency["ratio"] <= latency["spread"]["ratio"][1]
    assert any("held-out" in w for w in report["warnings"])  # 2 held-out samples are too few


def test_ceiling_verdict_is_computed_from_the_analysis(small_resnet):
    analysis = MemoryAnalysisPass(parse_ceiling("4x"))(load_model(small_resnet), build_context(
        load_model(small_resnet), None, None)).data
    verdict = ceiling_verdict(analysis, analysis.ceiling_bytes)
    assert verdict["ceiling_ok"] is False and len(verdict["over_ceiling"]) == 9
    assert ceiling_verdict(analysis, 10**9)["ceiling_ok"] is True


# ------------------------------------------------------- a graph that fixes the batch


def _batch_one_classifier(path) -> None:
    """Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Reshape to [1, -1] -> Gemm.

    The batch is declared symbolic, but the Reshape makes batch 2 fail in the Gemm."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
             helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1, "w2"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "fc")]
    graph = helper.make_graph(nodes, "b1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_a_graph_that_fixes_the_batch_runs_at_batch_1(tmp_path):
    path = tmp_path / "b1.onnx"
    _batch_one_classifier(path)
    result = compile_model(path, CompileOptions(ceiling="4x", num_samples=8, batch_size=4, latency_rounds=1,
                                                latency_repeats=1, method="pca"))
    assert result.report["batch_size"] == 1
    assert any("only runs at batch 1" in w for w in result.report["warnings"])
    assert result.report["verification"]["ceiling_ok"] and result.plan.maps


# ------------------------------------------------------------------- float16 models


def test_a_float16_model_compiles_to_float16_weights(small_resnet, tmp_path):
    model = with_float_type(onnx.load(str(small_resnet)), TensorProto.FLOAT16)
    result = compile_model(model, CompileOptions(ceiling="4x", **QUICK))
    onnx.checker.check_model(result.model, full_check=True)
    float_types = {i.data_type for i in result.model.graph.initializer if i.data_type != TensorProto.INT64}
    assert float_types == {TensorProto.FLOAT16}
    assert result.report["verification"]["tolerance"] == 1e-2
    assert result.report["fidelity"]["cosine_similarity"] > 0.5


# ------------------------------------------------------------------- the fidelity gate


def _quality(agreement, before=None, after=None, error=None) -> dict:
    return {"top1_agreement": agreement, "accuracy_reference": before, "accuracy_candidate": after,
            "accuracy_drop_error": error, "cosine_similarity": 0.9, "relative_error": 0.1, "max_abs_error": 1.0}


def _measure(dataset, **gate) -> MeasurePass:
    return MeasurePass(onnx.ModelProto(), dataset, **gate)


def test_gate_rules():
    rng = np.random.default_rng(0)
    labelled = load_dataset.__globals__["Dataset"]({"x": rng.standard_normal((4, 3)).astype(np.float32)},
                                                   labels=np.arange(4))
    gate, warnings = _measure(labelled, min_agreement=0.9)._gate(_quality(0.95))
    assert gate["passed"] and not warnings
    with pytest.raises(VerificationError, match="top-1 agreement 85.00% < 90.00%"):
        _measure(labelled, min_agreement=0.9)._gate(_quality(0.85))
    with pytest.raises(VerificationError, match="accuracy drop 2.00 points > 0.5"):
        _measure(labelled, max_accuracy_drop=0.5)._gate(_quality(0.99, 0.90, 0.88))
    with pytest.raises(VerificationError, match="accuracy drop 2.00 ± 1.25 points > 0.5"):
        _measure(labelled, max_accuracy_drop=0.5)._gate(_quality(0.99, 0.90, 0.88, 0.0125))
    gate, _ = _measure(labelled, max_accuracy_drop=0.5)._gate(_quality(0.99, 0.90, 0.897, 0.002))
    assert gate["accuracy_drop_points"] == pytest.approx(0.3) and gate["accuracy_drop_se_points"] == pytest.approx(0.2)
    assert fidelity_line(_quality(0.99, 0.90, 0.88, 0.0125)).startswith(
        "top-1 agreement 99.0%, accuracy 90.0% -> 88.0% (2.0 ± 1.2 points lost)")
    _, warnings = _measure(labelled)._gate(_quality(0.8))
    assert warnings and "below 90%" in warnings[0]
    sequence = _quality(None) | {"sequence_agreement": 0.8}  # a CTC head has no top-1 figure
    with pytest.raises(VerificationError, match="sequence agreement 80.00% < 90.00%"):
        _measure(labelled, min_agreement=0.9)._gate(sequence)
    with pytest.raises(VerificationError, match="no agreement to gate on"):
        _measure(labelled, min_agreement=0.9)._gate(_quality(None))


def test_a_sequence_head_reports_and_gates_on_sequence_agreement(tmp_path):
    path, data = tmp_path / "seq.onnx", tmp_path / "x.npz"
    onnx.save(sequence_head(), str(path))
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32))
    options = dict(ceiling="2x", method="pca", data=str(data), num_samples=64, latency_rounds=1, latency_repeats=1)
    fidelity = compile_model(path, CompileOptions(**options)).report["fidelity"]
    assert fidelity["top1_agreement"] is None and 0 < fidelity["sequence_agreement"] < 1
    with pytest.raises(VerificationError, match="sequence agreement"):
        compile_model(path, CompileOptions(**options, min_agreement=1.0))


def test_gate_flags_are_checked():
    from fmcompress.data import Dataset
    from fmcompress.errors import InputError

    unlabelled = Dataset({"x": np.zeros((4, 3), np.float32)})
    with pytest.raises(InputError, match="labelled"):
        _measure(unlabelled, max_accuracy_drop=1.0)
    with pytest.raises(InputError, match="between 0 and 1"):
        _measure(unlabelled, min_agreement=99)


def test_a_missed_gate_fails_compile(small_resnet):
    """At the smallest feasible ceiling PCA cannot keep every decision: a 100% gate must fail."""
    options = CompileOptions(ceiling="4KB", num_samples=48, batch_size=16, min_agreement=1.0, latency_rounds=1,
                             latency_repeats=1, method="pca")
    with pytest.raises(VerificationError, match="fidelity gate missed"):
        compile_model(small_resnet, options)


# ------------------------------------------------------------------------ weak data


def test_weak_data_is_warned_about(small_resnet, tmp_path):
    npz = tmp_path / "zeros.npz"
    np.savez(npz, input=np.zeros((8, 3, 32, 32), np.float32))
    report = compile_model(small_resnet, CompileOptions(ceiling="4x", data=npz, **QUICK)).report
    assert any("all zeros" in w for w in report["warnings"])
    assert any("2 held-out sample(s)" in w for w in report["warnings"])


def test_skipped_files_are_named(small_resnet, tmp_path):
    from PIL import Image

    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    for i in range(5):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not an image")
    report = compile_model(small_resnet, CompileOptions(ceiling="4x", data=tmp_path, num_samples=20, method="pca",
                                                        batch_size=4, latency_rounds=1, latency_repeats=1)).report
    skipped = [w for w in report["warnings"] if "unreadable" in w]
    assert skipped and skipped[0].startswith("5 unreadable file(s) skipped: ") and "and 2 more" in skipped[0]
    assert skipped[0].count("bad") == 3


# ------------------------------------------------------------------- plan-only warnings


def test_plan_only_warns_about_ops_compile_will_refuse(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft"),
             helper.make_node("Conv", ["g", "w2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])],
                              [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    result = compile_model(model, CompileOptions(ceiling="4x"), plan_only=True)
    assert result.plan.maps
    assert any("compile will refuse" in w and "Gelu" in w for w in result.report["warnings"])


def test_verify_catches_a_wrong_rewrite():
    """Rule c can fail: a folded weight changed after folding is refused."""
    from modeltools import random_projections, tiny_classifier

    from fmcompress.data import Dataset
    from fmcompress.passes.fold import FoldProjectionsPass
    from fmcompress.passes.plan import PlanPass
    from fmcompress.passes.verify import VerifyPass
    from fmcompress.units import parse_ceiling

    model = tiny_classifier()
    ctx = PassContext(input_shapes={"x": (1, 3, 8, 8)})
    plan = PlanPass(parse_ceiling("2x"))(model, ctx).data
    ctx.plan = plan
    projections = random_projections(plan)
    folded = FoldProjectionsPass(projections)(model, ctx).model
    held_out = Dataset(inputs={"x": np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)})
    data = VerifyPass(model, held_out, projections=projections)(folded, ctx).data
    assert data["relative_error"] <= 1e-4 and data["executor_relative_error"] <= 1e-4
    broken = onnx.ModelProto.FromString(folded.SerializeToString())
    weight = next(init for init in broken.graph.initializer if len(init.dims) == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    with pytest.raises(VerificationError, match="disagrees with the original with its projections inserted"):
        VerifyPass(model, held_out, projections=projections)(broken, ctx)


def test_rounding_sensitivity_is_the_models_own_amplification():
    """Rule c's looser tolerance is earned by the model: the logistic map x -> 4x(1 - x) doubles
    an error at each step, so twelve steps move the output under a one-rounding nudge of the
    input by far more than one step does."""
    from onnx import TensorProto, helper

    from fmcompress.data import Dataset
    from fmcompress.ortrun import ort_session, run_ort
    from fmcompress.passes.verify import rounding_sensitivity

    def logistic(steps: int) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(np.array(4.0, np.float32), "four"),
                 numpy_helper.from_array(np.array(1.0, np.float32), "one")]
        nodes, last = [], "x"
        for i in range(steps):
            nodes += [helper.make_node("Sub", ["one", last], [f"r{i}"]),
                      helper.make_node("Mul", [last, f"r{i}"], [f"p{i}"]),
                      helper.make_node("Mul", ["four", f"p{i}"], [f"x{i}"])]
            last = f"x{i}"
        nodes.append(helper.make_node("Identity", [last], ["y"]))
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    data = Dataset(inputs={"x": np.random.default_rng(0).uniform(0.1, 0.9, (4, 64)).astype(np.float32)})
    figures = []
    for model in (logistic(1), logistic(12)):
        session = ort_session(model, level="extended")
        reference = run_ort(session, data.batches(4), batch_first=True)
        figures.append(rounding_sensitivity(session, data, 4, reference))
    one, twelve = figures
    assert 0 < one < 1e-6  # about one rounding, relative
    assert twelve > 100 * one  # errors double per step: 2**11 more, give or take
