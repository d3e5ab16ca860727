"""The nine classic CNNs that the onnx wheel ships as backend test models load, analyze and
compile: AlexNet, DenseNet-121, GoogLeNet, Inception v2, ResNet-50, ShuffleNet, SqueezeNet,
VGG-19, ZFNet-512 (IR 3, opset 9, weights made by ConstantOfShape, initializers listed as
graph inputs; LRN in AlexNet, GoogLeNet and ZFNet; channel shuffles in ShuffleNet).

Their weights are one constant (0.02), so their outputs hardly depend on the input: the
fidelity figures mean nothing here. What is checked is what holds whatever the weights:
normalisation at load computes what the file computes (onnxruntime on both), `analyze` in
every view, `compile --ceiling 4x --method pca --num-samples 8` verifies, and the emitted
model passes onnx.checker's full check with every stored map under the resolved ceiling.
Each model runs at its natural input, 1x3x224x224. Times on two shared cores: compile
4 s (ShuffleNet) to 110 s (VGG-19, 548 MB of weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from fmcompress.cli import main
from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.modelio import load_model

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# name -> whether loading, analysing it take over a few seconds (large Gemm weights)
MODELS = {"bvlc_alexnet": True, "densenet121": False, "inception_v1": False, "inception_v2": False,
          "resnet50": False, "shufflenet": False, "squeezenet": False, "vgg19": True, "zfnet512": True}
FAST = {"method": "pca", "num_samples": 8, "batch_size": 4, "measure_memory": False,
        "latency_rounds": 1, "latency_repeats": 1}


def _path(name: str) -> Path:
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"this onnx wheel does not ship {path.name}")
    return path


def _params(slow_names: bool | None = None) -> list:
    """One param per model; `slow` where loading it is slow, or all of them (None)."""
    return [pytest.param(name, id=name, marks=[pytest.mark.slow] if slow_names is None or slow else [])
            for name, slow in MODELS.items()]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the originals carry unused initializers onnxruntime warns of
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", _params(slow_names=False))
def test_loads_as_a_current_model_that_computes_the_same(name):
    path = _path(name)
    model = load_model(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 13 and model.ir_version >= 8
    assert len(model.graph.input) == 1
    assert not any(node.op_type == "ConstantOfShape" for node in model.graph.node)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(onnx.load(str(path)), x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", _params(slow_names=False))
def test_analyze_lists_every_view(name, tmp_path):
    out = tmp_path / "a.json"
    result = CliRunner().invoke(main, ["analyze", str(_path(name)), "--ceiling", "4x", "--mode", "runtime",
                                       "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["peaks"]) == {"stored", "live", "strict", "runtime"}
    assert report["over_ceiling"] and report["runtime"]["tensors"]


@pytest.mark.parametrize("name", _params())
def test_compile_at_4x_verifies(name):
    result = compile_model(str(_path(name)), CompileOptions(ceiling="4x", **FAST))
    verification = result.report["verification"]
    assert verification["checker"] == "ok" and verification["onnxruntime"] == "ok"
    assert result.report["maps"], "nothing was projected at 4x"
    # verify ran onnx.checker's full check, onnxruntime against the original with its
    # projections inserted, and the memory analysis of the emitted model at the ceiling
    assert verification["ceiling_ok"] and not verification["over_ceiling"]
    assert verification["max_stored_bytes_after"] <= result.report["ceiling_bytes"]
    assert result.model.opset_import[0].version >= 11 and result.model.ir_version >= 4


@pytest.mark.slow
def test_compile_for_onnxruntime_tiles_squeezenet():
    """The runtime view sizes the optimised graph; at 700KB tiling alone makes it fit."""
    result = compile_model(str(_path("squeezenet")), CompileOptions(ceiling="700KB", runtime="ort", **FAST))
    assert result.report["verification"]["checker"] == "ok"
    peak = max(t.bytes for t in result.after.runtime.tensors if t.role in ("map", "workspace"))
    assert peak <= 700 * 1024
