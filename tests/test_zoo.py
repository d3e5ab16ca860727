"""The architecture zoo (models/catalog.py) through export, analyze and compile.

Every compact architecture is exported (the frontend checks onnxruntime against torch; here
a second, independent check on another input), analysed, and compiled under `4x` with pca
through the Python API. A model compile refuses must do so with an InputError or a
VerificationError of one line, and must be listed in KNOWN_REFUSALS with the reason: a new
failure and a newly passing model both fail the test. `examples/zoo.py` prints the same
coverage as a table. Models that take more than a few seconds are marked slow.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from fmcompress import api
from fmcompress.errors import InputError, VerificationError
from fmcompress.models import MODEL_NAMES, default_input_shape, get_model
from fmcompress.models.catalog import ARCHITECTURES
from fmcompress.ortrun import ort_session

# the fast ones (export + compile in a few seconds each, one op family each); the rest are slow
# (models/more*.py's eight, mobilenet_v1 to vovnet27_slim, take 5-25 s each: all slow)
FAST = {
    "shufflenet_v2": "channel split, view/transpose shuffle",
    "squeezenet": "fire concats, no BatchNorm",
    "mobilenet_v3_small": "HardSwish, SE with HardSigmoid",
    "unet": "ConvTranspose, long skip concats",
    "yolov5_focus": "strided-slice Focus stem, multi-level detection output",
    "crnn": "BiLSTM, time-major output, static batch",
}
# compile refuses these, with the exception type and a fragment of its one-line message
KNOWN_REFUSALS: dict[str, tuple[type[Exception], str]] = {}
# graphs that fix their batch: exported with a static batch (the frontend's batch trial)
BATCH_AXIS = {"crnn": 1}  # a time-major [T, N, classes] output; the others put the batch first


def _params(names):
    return [pytest.param(n, id=n, marks=() if n in FAST else pytest.mark.slow) for n in names]


ZOO_PARAMS = _params(ARCHITECTURES)


def test_every_architecture_is_registered_with_a_small_input():
    for name, (_, _, shape) in ARCHITECTURES.items():
        assert name in MODEL_NAMES
        assert default_input_shape(name) == shape
        assert len(shape) == 4 and shape[0] == 1 and shape[2] * shape[3] <= 96 * 96
    assert set(FAST) | set(KNOWN_REFUSALS) | set(BATCH_AXIS) <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_export_agrees_with_torch(zoo_onnx, name):
    """onnxruntime on the exported file against the torch module, on a fresh input."""
    shape = default_input_shape(name)
    path = zoo_onnx(name, shape)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for output in model.graph.output:  # every export keeps a dynamic batch, on its own axis
        assert output.type.tensor_type.shape.dim[BATCH_AXIS.get(name, 0)].dim_param == "batch", output
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = get_model(name)(x)
    expected_list = list(expected) if isinstance(expected, tuple) else [expected]
    actual = ort_session(model).run(None, {model.graph.input[0].name: x.numpy()})
    assert len(actual) == len(expected_list)
    for want, got in zip(expected_list, actual, strict=True):
        want = want.numpy()
        assert got.shape == want.shape
        scale = float(np.max(np.abs(want)))
        assert scale > 1e-6, "the untrained output vanished: calibrate_batchnorm or init is off"
        assert float(np.max(np.abs(got - want))) <= 1e-3 * scale


@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_compile_or_known_refusal(zoo_onnx, name):
    path = zoo_onnx(name, default_input_shape(name))
    report = api.analyze(path, ceiling="4x")
    assert report.over_ceiling(), "4x always leaves the largest compressible map above the ceiling"
    try:
        result = api.compile(
            path,
            ceiling="4x",
            method="pca",
            num_samples=4,
            batch_size=2,
            latency_rounds=1,
            latency_repeats=1,
        )
    except (InputError, VerificationError) as exc:
        message = str(exc)
        assert message.strip() and "\n" not in message.strip(), f"not one line: {message!r}"
        assert name in KNOWN_REFUSALS, f"{name}: new refusal {type(exc).__name__}: {message}"
        kind, fragment = KNOWN_REFUSALS[name]
        assert isinstance(exc, kind) and fragment in message, (
            f"{name}: refused differently: {message}"
        )
        return
    assert name not in KNOWN_REFUSALS, f"{name} now compiles: remove it from KNOWN_REFUSALS"
    assert result.model is not None and result.plan.maps
    assert result.after is not None and not result.after.over_ceiling()


def test_coverage_script_reports_exit_codes_and_one_line_refusals(capsys, monkeypatch):
    """examples/zoo.py: a passing step is `ok`, a refused one its exit code and `error:` line."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "zoo.py"
    spec = importlib.util.spec_from_file_location("zoo_script", script)
    zoo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "zoo_script", zoo)  # dataclasses look their module up
    spec.loader.exec_module(zoo)
    zoo.main(["--models", "squeezenet", "--ceilings", "1B,ort:32KB", "--num-samples", "4"])
    row = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| squeezenet")
    )
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:2] == ["squeezenet", "1x3x64x64"]
    assert cells[2].startswith("ok ") and cells[3].startswith("ok ")  # export, analyze
    assert cells[4].startswith("exit 2: error: ceiling 1B") and "infeasible" in cells[4]
    # a runtime cell gives onnxruntime's peak before and after, from compile's own report
    assert re.fullmatch(r"ok \d+\.\ds, peak \d+\.\d\d -> \d+\.\d\d MiB", cells[5]), cells[5]
