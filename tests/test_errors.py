"""Honest errors: only known user errors are exit 2; a bug (an op handler that crashes, any
unexpected exception) is exit 3 with one `internal error:` line, and `--debug` or
FMCOMPRESS_DEBUG=1 prints the traceback with its chained causes."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from test_outputs import assert_one_line_error, write_tiny_model

import fmcompress.compiler
from fmcompress.backend import registry
from fmcompress.backend.executor import OnnxModule
from fmcompress.cli import main
from fmcompress.errors import EXIT_INTERNAL, InputError, InternalError

PCA = ["--ceiling", "32KB", "--method", "pca", "--num-samples", "8", "--batch-size", "4", "-q"]
BUG_HINT = "(a bug in fmcompress; run with --debug for the traceback)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("errors") / "tiny.onnx")


def _crashing(exc: Exception):
    def handler(ctx, *inputs):
        raise exc

    return handler


@pytest.fixture
def broken_conv(monkeypatch):
    """The Conv handler crashes as a bug would (Conv has no in-place variant, so it always runs)."""
    monkeypatch.setitem(registry.OPS, "Conv", _crashing(TypeError("conv2d() got an unexpected keyword 'pad'")))


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_internal_error_line(result, kind: str) -> str:
    assert result.exit_code == EXIT_INTERNAL, (result.output, result.exception)
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"internal error: {kind}: ") and last.endswith(BUG_HINT), result.stderr
    return last


# --- the executor: a crashing handler is a bug, a rejected value is the input's fault --------


def test_a_crashing_handler_is_an_internal_error_naming_its_node(tiny, broken_conv):
    with pytest.raises(InternalError, match=r"^node '.*' \(Conv\) failed: conv2d\(\) got an unexpected") as caught:
        OnnxModule(str(tiny))(torch.zeros(1, 3, 32, 32))
    assert isinstance(caught.value.__cause__, TypeError)
    assert not isinstance(caught.value, InputError)


def test_an_index_error_in_a_handler_is_internal_too(tiny, monkeypatch):
    monkeypatch.setitem(registry.OPS, "Conv", _crashing(IndexError("list index out of range")))
    with pytest.raises(InternalError) as caught:
        OnnxModule(str(tiny))(torch.zeros(1, 3, 32, 32))
    assert isinstance(caught.value.__cause__, IndexError)


def test_a_handlers_own_rejection_stays_an_input_error(tiny, monkeypatch):
    monkeypatch.setitem(registry.OPS, "Conv", _crashing(InputError("Conv with auto_pad=VALID is not supported")))
    with pytest.raises(InputError, match="^Conv with auto_pad=VALID is not supported$"):
        OnnxModule(str(tiny))(torch.zeros(1, 3, 32, 32))


def test_data_the_weights_reject_is_an_input_error_with_its_cause(tiny):
    with pytest.raises(InputError, match=r"\(Conv\) cannot run on these inputs") as caught:
        OnnxModule(str(tiny))(torch.zeros(1, 3, 1, 0))  # an empty image: torch's conv refuses it
    assert isinstance(caught.value.__cause__, RuntimeError)


# --- the CLI: exit 3 and one line for a bug; the traceback on request ------------------------


def test_a_crashing_handler_exits_3_with_one_line_not_2(tiny, broken_conv, tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke("compile", tiny, *PCA, "-o", out)
    line = assert_internal_error_line(result, "TypeError")
    assert "(Conv) failed: conv2d() got an unexpected keyword 'pad'" in line
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("how", ["--debug", "FMCOMPRESS_DEBUG=1"])
def test_debug_prints_the_traceback_with_its_cause(tiny, broken_conv, tmp_path, how):
    flags, env = (["--debug"], None) if how == "--debug" else ([], {"FMCOMPRESS_DEBUG": "1"})
    result = invoke(*flags, "compile", tiny, *PCA, "-o", tmp_path / "m.onnx", env=env)
    assert_internal_error_line(result, "TypeError")
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "TypeError: conv2d() got an unexpected keyword 'pad'" in result.stderr
    assert "The above exception was the direct cause of the following exception" in result.stderr
    assert "fmcompress.errors.InternalError: node " in result.stderr


def test_any_unexpected_exception_is_internal(tiny, monkeypatch):
    def buggy(*args, **kwargs):
        return {}["plan"]

    monkeypatch.setattr(fmcompress.compiler, "compile_model", buggy)
    result = invoke("compile", tiny, *PCA, "--plan-only")
    assert result.stderr == f"internal error: KeyError: 'plan' {BUG_HINT}\n"


def test_bad_input_is_still_exit_2_in_one_line(tmp_path):
    assert_one_line_error(invoke("compile", tmp_path / "missing.onnx", *PCA), code=2, contains="missing.onnx")
    not_a_model = tmp_path / "m.onnx"
    not_a_model.write_bytes(b"not protobuf")
    assert_one_line_error(invoke("compile", not_a_model, *PCA), code=2, contains="not a readable ONNX model")


def test_debug_shows_an_input_errors_cause_and_keeps_exit_2(tmp_path):
    not_a_model = tmp_path / "m.onnx"
    not_a_model.write_bytes(b"not protobuf")
    result = invoke("--debug", "compile", not_a_model, *PCA)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "The above exception was the direct cause of the following exception" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ") and "not a readable ONNX model" in result.stderr
