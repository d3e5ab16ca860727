"""The PyTorch front end: exports checked against torch in onnxruntime and the ONNX reference
evaluator, clean graphs (BN folded, no constants as nodes), dynamic batch, factories, weights,
and every bad input as a one-line InputError with nothing written."""

from __future__ import annotations

import collections
import importlib
import os
import stat
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx.reference import ReferenceEvaluator

from fmcompress.cli import main
from fmcompress.errors import InputError, UnsupportedOpError, VerificationError
from fmcompress.frontend import ExportResult, export_model, export_module
from fmcompress.models import get_model

SMALL = (1, 3, 32, 32)
TINY = (1, 3, 8, 8)
FACTORY_MODULE = "fmc_test_export_factories"
FACTORY_SOURCE = '''
    import torch
    from torch import nn

    class TinyResidual(nn.Module):
        """Conv-BN-ReLU, Conv-BN, skip, ReLU, pool, Linear; BN stats are not the identity."""

        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)
            generator = torch.Generator().manual_seed(0)
            for bn in (self.bn1, self.bn2):
                bn.running_mean.copy_(torch.randn(8, generator=generator))
                bn.running_var.copy_(torch.rand(8, generator=generator) + 0.5)
                bn.weight.data.copy_(torch.randn(8, generator=generator))
                bn.bias.data.copy_(torch.randn(8, generator=generator))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)) + y)
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    def tiny():
        torch.manual_seed(0)
        return TinyResidual()

    class Holder:
        @staticmethod
        def build():
            return tiny()

    NOT_CALLABLE = 3

    def returns_int():
        return 3

    def raises():
        raise ValueError("boom\\nsecond line")

    class BatchOne(nn.Module):
        """A hard-coded x.view(1, -1): at batch 2 the Gemm gets the wrong width and fails."""

        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(1, -1))

    class BatchOneShape(nn.Module):
        """A hard-coded reshape(1, 4, -1): at batch 2 it runs, and silently returns one row."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)).reshape(1, 4, -1).mean(-1)

    def batch_one():
        torch.manual_seed(0)
        return BatchOne()

    def batch_one_shape():
        torch.manual_seed(0)
        return BatchOneShape()
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    """An importable module of factories (module name FACTORY_MODULE)."""
    folder = tmp_path_factory.mktemp("factories")
    (folder / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    (folder / "fmc_test_broken_module.py").write_text("raise RuntimeError('cannot load me')\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield importlib.import_module(FACTORY_MODULE)


def _ort_run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _torch_run(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _op_counts(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _assert_nothing_written(folder) -> None:
    assert list(folder.iterdir()) == []


# --- the zoo --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18_small", "vgg16_bn_small", "mobilenet_v2_small"])
def test_zoo_export_matches_torch_at_batch_3(zoo_onnx, name):
    path = zoo_onnx(name, SMALL)
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    expected = _torch_run(get_model(name), x)
    np.testing.assert_allclose(_ort_run(path, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["resnet18_small", "vgg16_bn_small", "mobilenet_v2_small"])
def test_zoo_export_is_a_clean_graph(zoo_onnx, name):
    model = onnx.load(str(zoo_onnx(name, SMALL)))
    onnx.checker.check_model(model)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert not {"BatchNormalization", "Constant", "Identity", "ReduceMean", "Reshape"} & set(ops)
    assert {"Conv", "GlobalAveragePool", "Flatten", "Gemm"} <= set(ops)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_mobilenet_relu6_becomes_clip_with_initializer_bounds(zoo_onnx):
    model = onnx.load(str(zoo_onnx("mobilenet_v2_small", SMALL)))
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert ops["Conv"] == 52 and ops["Clip"] == 35 and ops["Add"] == 10
    initializers = {t.name for t in model.graph.initializer}
    clip = next(node for node in model.graph.node if node.op_type == "Clip")
    assert set(clip.input[1:]) <= initializers


def test_resnet18_224_has_exactly_torchvisions_ops(resnet18_224):
    assert _op_counts(resnet18_224) == {"Conv": 20, "Relu": 17, "Add": 8, "MaxPool": 1,
                                        "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected = _torch_run(get_model("resnet18"), x)
    np.testing.assert_allclose(_ort_run(resnet18_224, x), expected, atol=1e-4 * np.abs(expected).max())


def test_export_result_reports_the_check(tmp_path):
    result = export_model("mobilenet_v2_small", SMALL, tmp_path / "m.onnx")
    assert isinstance(result, ExportResult)
    assert result.path == tmp_path / "m.onnx" and result.path.is_file()
    assert 0 <= result.max_abs_diff < 1e-4
    assert (result.input_names, result.output_names, result.opset) == (["input"], ["output"], 17)
    assert list(tmp_path.iterdir()) == [result.path]  # no temporary file left behind


# --- export_module and factories -------------------------------------------------------------


def test_export_module_folds_batchnorm_exactly(factories, tmp_path):
    module = factories.tiny().eval()
    result = export_module(module, TINY, tmp_path / "tiny.onnx")
    assert "BatchNormalization" not in _op_counts(result.path)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = _torch_run(module, x)
    (reference,) = ReferenceEvaluator(str(result.path)).run(None, {"input": x})
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_ort_run(result.path, x), expected, rtol=1e-5, atol=1e-5)


def test_export_module_restores_training_flags(factories, tmp_path):
    module = factories.tiny().train()
    module.bn2.eval()
    export_module(module, TINY, tmp_path / "tiny.onnx")
    assert module.training and module.conv1.training and not module.bn2.training


def test_export_at_a_newer_opset(factories, tmp_path):
    result = export_module(factories.tiny(), TINY, tmp_path / "tiny.onnx", opset=18)
    assert result.opset == 18
    assert onnx.load(str(result.path)).opset_import[0].version == 18


def test_export_is_quiet(factories, tmp_path, capfd):
    export_module(factories.tiny(), TINY, tmp_path / "tiny.onnx")
    with pytest.raises(UnsupportedOpError):
        export_module(_Fft(), TINY, tmp_path / "fft.onnx")
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("spec", [f"{FACTORY_MODULE}:tiny", f"{FACTORY_MODULE}:Holder.build"])
def test_factory_export_matches_torch(factories, tmp_path, spec):
    result = export_model(spec, TINY, tmp_path / "f.onnx")
    assert result.dynamic_batch and result.warnings == ()
    x = np.random.default_rng(4).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_ort_run(result.path, x), _torch_run(factories.tiny().eval(), x),
                               rtol=1e-5, atol=1e-5)


# --- weights -----------------------------------------------------------------------------------


def _save(tmp_path, payload, name="w.pt"):
    path = tmp_path / name
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def seed1_weights():
    """resnet18_small's seed-1 state_dict, an input, and the seed-1 and seed-0 torch outputs."""
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    source = get_model("resnet18_small", seed=1)
    return source.state_dict(), x, _torch_run(source, x), _torch_run(get_model("resnet18_small"), x)


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module."])
def test_weights_replace_the_seeded_init(tmp_path, seed1_weights, wrap):
    state, x, expected, seed0 = seed1_weights
    payload = {"raw": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state},
               "module.": {f"module.{k}": v for k, v in state.items()}}[wrap]
    result = export_model("resnet18_small", SMALL, tmp_path / "r.onnx", weights=_save(tmp_path, payload))
    got = _ort_run(result.path, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, seed0, atol=1e-3)


def _bad_weights(tmp_path, kind):
    state = get_model("resnet18_small").state_dict() if kind in ("missing keys", "unexpected keys") else {}
    if kind == "garbage":
        path = tmp_path / "w.pt"
        path.write_bytes(b"definitely not a torch file")
        return path
    if kind == "empty":
        path = tmp_path / "w.pt"
        path.write_bytes(b"")
        return path
    if kind == "missing file":
        return tmp_path / "nope.pt"
    if kind == "directory":
        (tmp_path / "dir.pt").mkdir()
        return tmp_path / "dir.pt"
    if kind == "not a dict":
        return _save(tmp_path, [torch.zeros(1)])
    if kind == "missing keys":
        return _save(tmp_path, {k: v for k, v in state.items() if not k.startswith("layer4")})
    if kind == "unexpected keys":
        return _save(tmp_path, {**state, "extra.weight": torch.zeros(1)})
    if kind == "wrong shapes":
        return _save(tmp_path, get_model("resnet18_small", num_classes=5).state_dict())
    if kind == "pickled object":
        return _save(tmp_path, {"fc.weight": collections.OrderedDict()}, name="obj.pt")
    raise AssertionError(kind)


BAD_WEIGHTS = {
    "garbage": "not a readable state_dict file",
    "empty": "not a readable state_dict file",
    "missing file": "no such weights file",
    "directory": "is a directory, not a weights file",
    "not a dict": "not a state_dict",
    "missing keys": r"30 missing \(layer4\.0\.conv1\.weight, .*\.\.\.\)",
    "unexpected keys": r"1 unexpected \(extra\.weight\)",
    "wrong shapes": "size mismatch for fc.weight",
    "pickled object": "not a state_dict",
}


@pytest.mark.parametrize("kind", BAD_WEIGHTS)
def test_bad_weights_are_input_errors(tmp_path, kind):
    weights = _bad_weights(tmp_path, kind)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=BAD_WEIGHTS[kind]) as error:
        export_model("resnet18_small", SMALL, out / "r.onnx", weights=weights)
    assert "\n" not in str(error.value)
    _assert_nothing_written(out)


# --- bad sources, shapes, opsets -------------------------------------------------------------


class _Fft(torch.nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x).abs()


class _Noisy(torch.nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


BAD_SOURCES = {
    "resnet999": "unknown model 'resnet999'; known: resnet18, .*or give a factory",
    "a:b:c": "invalid factory",
    ":tiny": "invalid factory",
    f"{FACTORY_MODULE}:": "invalid factory",
    "1module:tiny": "invalid factory",
    f"{FACTORY_MODULE}:ti-ny": "invalid factory",
    "fmc_no_such_module_xyz:tiny": "cannot import module 'fmc_no_such_module_xyz': ModuleNotFoundError",
    "fmc_test_broken_module:tiny": "cannot import module .*RuntimeError: cannot load me",
    f"{FACTORY_MODULE}:missing": "has no attribute 'missing'",
    f"{FACTORY_MODULE}:Holder.nothing": "has no attribute 'nothing'",
    f"{FACTORY_MODULE}:NOT_CALLABLE": "NOT_CALLABLE is not callable \\(type int\\)",
    f"{FACTORY_MODULE}:returns_int": "returned type int, not a torch.nn.Module",
    f"{FACTORY_MODULE}:raises": "calling the factory failed: ValueError: boom$",
}


@pytest.mark.parametrize("source", BAD_SOURCES)
def test_bad_sources_are_one_line_input_errors(factories, tmp_path, source):
    with pytest.raises(InputError, match=BAD_SOURCES[source]) as error:
        export_model(source, TINY, tmp_path / "x.onnx")
    assert "\n" not in str(error.value)
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(("source", "shape", "message"), [
    ("resnet18_small", (3, 32, 32), "takes a 4-D input"),
    ("resnet18_small", (1, 1, 3, 32, 32), "takes a 4-D input"),
    ("resnet18_small", (1, 4, 32, 32), "fails on input shape .*expected input.*to have 3 channels"),
    ("vgg16_bn_small", (1, 3, 8, 8), "fails on input shape \\(1, 3, 8, 8\\)"),
    (f"{FACTORY_MODULE}:tiny", (1, 3, 8), "fails on input shape \\(1, 3, 8\\): RuntimeError"),
    ("resnet18_small", (), "invalid input shape"),
    ("resnet18_small", (0, 3, 32, 32), "invalid input shape"),
    (f"{FACTORY_MODULE}:tiny", (1, 3, 0), "invalid input shape"),
])
def test_bad_shapes_are_input_errors(factories, tmp_path, source, shape, message):
    with pytest.raises(InputError, match=message) as error:
        export_model(source, shape, tmp_path / "x.onnx")
    assert "\n" not in str(error.value)
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("opset", [11, 16, 24, "17"])
def test_unsupported_opsets_are_rejected(tmp_path, opset):
    with pytest.raises(InputError, match="opset .* is not supported: use 17 to 23"):
        export_model("resnet18_small", SMALL, tmp_path / "x.onnx", opset=opset)
    _assert_nothing_written(tmp_path)


def test_module_errors_write_nothing(tmp_path):
    with pytest.raises(InputError, match="expected a torch.nn.Module, got str"):
        export_module("resnet18", SMALL, tmp_path / "x.onnx")
    with pytest.raises(UnsupportedOpError, match="aten::fft_rfft"):
        export_module(_Fft(), TINY, tmp_path / "x.onnx")
    with pytest.raises(VerificationError, match="onnxruntime differs from torch"):
        export_module(_Noisy(), TINY, tmp_path / "x.onnx")
    _assert_nothing_written(tmp_path)


class _TwoOutputs(torch.nn.Module):
    def forward(self, x):
        return x * 2, x.mean(dim=(2, 3))


class _ReturnsDict(torch.nn.Module):
    def forward(self, x):
        return {"logits": x}


def test_tuple_outputs_get_numbered_names(tmp_path):
    result = export_module(_TwoOutputs(), TINY, tmp_path / "two.onnx")
    assert result.output_names == ["output_0", "output_1"]
    x = np.random.default_rng(6).standard_normal((4, 3, 8, 8)).astype(np.float32)
    doubled, means = ort.InferenceSession(str(result.path)).run(None, {"input": x})
    np.testing.assert_allclose(doubled, 2 * x, rtol=1e-6)
    np.testing.assert_allclose(means, x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_non_tensor_outputs_are_rejected(tmp_path):
    with pytest.raises(InputError, match="must return a tensor or a tuple of tensors, not dict"):
        export_module(_ReturnsDict(), TINY, tmp_path / "x.onnx")
    _assert_nothing_written(tmp_path)


def test_output_that_is_a_directory_is_rejected(factories, tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        export_module(factories.tiny(), TINY, tmp_path)


# --- the CLI -----------------------------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def test_cli_export_writes_and_reports(tmp_path):
    result = _cli("mobilenet_v2_small", "--input-shape", "1,3,32,32", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'm.onnx'}" in result.stdout and "max abs difference" in result.stdout
    assert "BatchNormalization" not in _op_counts(tmp_path / "m.onnx")


@pytest.mark.parametrize(("args", "message"), [
    (["resnet999", "--input-shape", "1,3,32,32"], "unknown model 'resnet999'"),
    (["resnet18_small", "--input-shape", "1,3,a,32"], "invalid shape"),
    (["resnet18_small", "--input-shape", "3,32,32"], "takes a 4-D input"),
    (["resnet18_small", "--input-shape", "1,3,32,32", "--opset", "11"], "opset 11 is not supported"),
    (["resnet18_small", "--input-shape", "1,3,32,32", "--weights", "missing.pt"], "no such weights file"),
    (["nowhere_xyz:f", "--input-shape", "1,3,32,32"], "cannot import module"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    out.mkdir()
    result = _cli(*args, "-o", out / "x.onnx")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    _assert_nothing_written(out)


# --- graphs that fix the batch: exported with a static batch ---------------------------------


@pytest.mark.parametrize(("factory", "problem"), [("batch_one", "onnxruntime fails at batch 2"),
                                                  ("batch_one_shape", "an output has shape (1, 4), not (2, 4)")])
def test_a_graph_that_fixes_the_batch_gets_a_static_batch(factories, tmp_path, factory, problem):
    result = export_model(f"{FACTORY_MODULE}:{factory}", TINY, tmp_path / "b.onnx")
    assert result.dynamic_batch is False
    assert len(result.warnings) == 1 and problem in result.warnings[0]
    assert "static batch of 1" in result.warnings[0]
    model = onnx.load(str(result.path))
    for value in [*model.graph.input, *model.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert (first.dim_value, first.dim_param) == (1, ""), value.name
    x = np.random.default_rng(7).standard_normal(TINY).astype(np.float32)
    np.testing.assert_allclose(_ort_run(result.path, x), _torch_run(getattr(factories, factory)().eval(), x),
                               rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == [result.path]


def test_cli_export_says_when_the_batch_is_static(factories, tmp_path):
    result = _cli(f"{FACTORY_MODULE}:batch_one", "--input-shape", "1,3,8,8", "-o", tmp_path / "b.onnx")
    assert result.exit_code == 0, result.output
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("warning: the graph fixes the batch size (onnxruntime fails at batch 2")
    assert warning.endswith("exported with a static batch of 1: it runs only at batch 1")
    assert result.stdout.startswith(f"wrote {tmp_path / 'b.onnx'}")
    assert onnx.load(str(tmp_path / "b.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_cli_export_of_a_dynamic_model_warns_nothing(factories, tmp_path):
    result = _cli(f"{FACTORY_MODULE}:tiny", "--input-shape", "1,3,8,8", "-o", tmp_path / "t.onnx")
    assert result.exit_code == 0 and result.stderr == ""
    assert onnx.load(str(tmp_path / "t.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


# --- help and outputs ---------------------------------------------------------------------------


def test_export_help_says_the_zoo_is_untrained():
    result = _cli("--help")
    assert result.exit_code == 0
    assert "zoo models are untrained (seeded random weights) unless --weights is given" in " ".join(
        result.stdout.split())


def test_cli_export_writes_through_a_symlink_with_a_normal_mode(factories, tmp_path):
    (tmp_path / "link.onnx").symlink_to(tmp_path / "real.onnx")
    old = os.umask(0o027)
    try:
        result = _cli(f"{FACTORY_MODULE}:tiny", "--input-shape", "1,3,8,8", "-o", tmp_path / "link.onnx")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link.onnx").is_symlink()
    assert stat.S_IMODE(os.stat(tmp_path / "real.onnx").st_mode) == 0o640
    onnx.checker.check_model(onnx.load(str(tmp_path / "real.onnx")))


@pytest.mark.parametrize("kind", ["fifo", "device", "weights"])
def test_cli_export_refuses_bad_outputs_before_building_the_model(tmp_path, monkeypatch, kind):
    import fmcompress.models

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(fmcompress.models, "get_model", forbidden)
    out = tmp_path / "out.onnx"
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "device":
        out.symlink_to("/dev/null")
    else:
        out = weights
    result = _cli("resnet18_small", "--input-shape", "1,3,32,32", "-o", out, "--weights", weights)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert {"fifo": "is a FIFO", "device": "is a character device", "weights": "would overwrite the input"}[kind] \
        in result.stderr
    assert weights.read_bytes() == b"weights"
    assert kind != "fifo" or stat.S_ISFIFO(os.lstat(out).st_mode)
    assert kind != "device" or os.readlink(out) == "/dev/null"


def test_a_time_major_output_keeps_its_batch_axis_dynamic(tmp_path):
    """A CRNN's [T, N, classes] output: the batch is its axis 1, found by a torch run at another
    batch, so the export stays batch-free and warns nothing."""
    result = export_model("crnn", (1, 3, 32, 128), tmp_path / "crnn.onnx")
    assert result.dynamic_batch and result.warnings == ()
    dims = onnx.load(str(result.path)).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["", "batch", ""]
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 128)).astype(np.float32)
    from fmcompress.models import get_model
    np.testing.assert_allclose(_ort_run(result.path, x), _torch_run(get_model("crnn").eval(), x),
                               rtol=1e-4, atol=1e-5)


def test_cli_export_takes_a_zoo_models_own_input_shape(tmp_path):
    listing = _cli("--list")
    assert listing.exit_code == 0 and "crnn" in listing.stdout and "1,3,32,128" in listing.stdout
    result = _cli("mobilenet_v3_small", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1:] == [3, 64, 64]
    factory = _cli("nowhere_xyz:f", "-o", tmp_path / "f.onnx")
    assert factory.exit_code == 2 and "--input-shape is required for a factory" in factory.stderr
    assert not (tmp_path / "f.onnx").exists()
