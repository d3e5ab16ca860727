"""compile is the declared pipeline `build_pipeline` returns, nothing more: the same graph
on every model of the suite, each pass finds what it needs or the pipeline says which
pass is missing before anything runs, and passes hand on typed fields, not string keys."""

from __future__ import annotations

import pytest
from modeltools import sequence_head, tiny_classifier

from fmcompress.compiler import CompileOptions, build_context, build_pipeline, compile_model
from fmcompress.modelio import load_model
from fmcompress.models import digits_onnx_path
from fmcompress.passes import Model, PassContext, Pipeline, PipelineError
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.fold_bn import FoldBatchNormPass
from fmcompress.passes.memory import MemoryAnalysisPass
from fmcompress.passes.plan import PlanPass
from fmcompress.passes.verify import VerifyPass
from fmcompress.units import parse_ceiling

QUICK = {"method": "pca", "num_samples": 8, "batch_size": 4, "latency_rounds": 1, "latency_repeats": 1,
         "measure_memory": False}


def _same_graph_as_compile(source, **options) -> None:
    compiled = compile_model(source, CompileOptions(**{**QUICK, **options}))
    model = load_model(source)
    ctx = build_context(model, options.get("input_shapes"), None)
    emitted, ctx = build_pipeline(CompileOptions(**{**QUICK, **options})).run(model, ctx)
    del emitted.graph.value_info[:]  # as compile_model does after the pipeline (its docstring says why)
    assert emitted.graph.SerializeToString(deterministic=True) == \
        compiled.model.graph.SerializeToString(deterministic=True)
    assert [m.name for m in ctx.plan.maps] == [m["name"] for m in compiled.report["maps"]]


@pytest.mark.parametrize("name, options", [
    ("digits", {"ceiling": "4x"}),
    ("digits", {"ceiling": "4x", "runtime": "ort"}),
    ("tiny", {"ceiling": "2x"}),
    ("sequence", {"ceiling": "2x"}),
    pytest.param("digits", {"ceiling": None, "traffic": "2x"}, marks=pytest.mark.slow),
])
def test_the_pipeline_gives_the_graph_compile_gives(name, options):
    source = {"digits": lambda: str(digits_onnx_path()), "tiny": tiny_classifier, "sequence": sequence_head}[name]()
    _same_graph_as_compile(source, **options)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"ceiling": "4x"}, {"ceiling": "2x", "runtime": "ort"}])
def test_the_pipeline_gives_the_graph_compile_gives_on_yolov8n(options):
    from fmcompress.evaluation.thirdparty import real_model

    _same_graph_as_compile(str(real_model("yolov8n")), input_shapes=["1,3,320,320"], **options)


@pytest.mark.slow
def test_the_pipeline_gives_the_graph_compile_gives_on_resnet18(zoo_onnx):
    _same_graph_as_compile(str(zoo_onnx("resnet18_small", (1, 3, 32, 32))), ceiling="4x")


def test_the_declared_pipeline_lists_every_step_of_compile():
    names = [p.name for p in build_pipeline(CompileOptions(ceiling="4x", runtime="ort")).passes]
    assert names == ["memory", "plan", "runtime", "sink-concat", "plan", "runtime", "runtime-plan",
                     "prepare-data", "fit", "map-cost", "fold-bn", "fold-projections", "tile-to-ceiling", "verify",
                     "measure"]
    names = [p.name for p in build_pipeline(CompileOptions(ceiling="4x"), plan_only=True).passes]
    assert names == ["memory", "plan", "sink-concat", "plan", "before-activation"]
    names = [p.name for p in build_pipeline(CompileOptions(ceiling="4x", placement="after"), plan_only=True).passes]
    assert names == ["memory", "plan", "sink-concat", "plan"]


def test_a_pipeline_without_its_fit_pass_fails_naming_it_before_running():
    ceiling = parse_ceiling("4x")
    pipeline = Pipeline([MemoryAnalysisPass(ceiling), PlanPass(ceiling), FoldBatchNormPass(),
                         FoldProjectionsPass(), VerifyPass()])
    ran = []
    pipeline.passes[0].run = lambda model, ctx: ran.append(model)  # nothing may run
    with pytest.raises(PipelineError, match=r"FoldProjectionsPass needs `projections`, which "
                                            r"FitProjectionsPass provides"):
        pipeline.run(tiny_classifier(), PassContext(input_shapes={"x": (1, 3, 8, 8)}))
    assert ran == []


def test_a_field_the_context_already_holds_satisfies_a_pass():
    ctx = PassContext(input_shapes={"x": (1, 3, 8, 8)})
    ctx.projections = {}
    folded, ctx = Pipeline([FoldProjectionsPass()]).run(tiny_classifier(), ctx)
    assert ctx.folds == {} and len(folded.graph.node) == len(tiny_classifier().graph.node)


def test_passes_edit_one_graph_and_leave_a_given_proto_alone():
    proto = tiny_classifier()
    before = proto.SerializeToString()
    ctx = PassContext(input_shapes={"x": (1, 3, 8, 8)})
    model = Model.from_proto(proto)
    assert model.proto() is proto  # untouched: the very proto it was loaded from
    Pipeline([MemoryAnalysisPass(parse_ceiling("2x")), PlanPass(parse_ceiling("2x"))]).run(model, ctx)
    assert model.proto() is proto and ctx.memory is ctx.before and ctx.plan.maps
    from modeltools import random_projections

    ctx.projections = random_projections(ctx.plan)
    FoldProjectionsPass().run(model, ctx)
    assert model.proto() is not proto and proto.SerializeToString() == before
    assert any(node.name.startswith("fmc/") for node in model.graph.nodes)
