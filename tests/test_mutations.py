"""Never a traceback: `analyze` and `compile --plan-only` on broken models.

Real models (the demo, zoo exports, the tiny test models) are mutated the ways a model file
goes wrong in practice: a node removed (its readers now read a dangling name), an input
renamed to a missing tensor, a shape corrupted (a dim 0, -1, huge or symbolic; the rank
changed), an attribute dropped or given a wrong type or value, an initializer's dtype or
dims made inconsistent with its data, an unknown op, the opset import removed or set to an
old or huge version, a graph output removed, two nodes writing the same name, a truncated
file. Every command must end with exit 0, 1 or 2 and, when it fails, exactly one `error: ...`
line on stderr: never a traceback, never exit 3 (`internal error`, a bug in fmcompress).

Mutations draw their choices through `pick(n) -> index in range(n)`, so hypothesis drives
them here (shrinking to the simplest failing choice) and a plain `random.Random` can drive
the same code in a longer fuzzing run (`python tests/test_mutations.py MODEL [N]`).
"""

from __future__ import annotations

import functools
import os
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from fmcompress.cli import main

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_resnet.onnx"

Pick = Callable[[int], int]  # pick(n) -> an index in range(n)
MISSING = "fmc_missing_tensor"
UNKNOWN_OP = "FmcNoSuchOp"

# every command each mutant goes through: the default analysis, the runtime view, the plan
ANALYZE = ("analyze",)
ANALYZE_RUNTIME = ("analyze", "--mode", "runtime")
PLAN = ("compile", "--plan-only", "--ceiling", "4x")
PLAN_ORT = ("compile", "--plan-only", "--ceiling", "4x", "--runtime", "ort")
COMMANDS = (ANALYZE, ANALYZE_RUNTIME, PLAN)


# ----------------------------------------------------------------------------- mutations

def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def _choose(pick: Pick, options):
    options = list(options)
    return options[pick(len(options))]


def remove_node(model: onnx.ModelProto, pick: Pick) -> None:
    """Delete one node: whoever read its outputs now reads a name nothing writes."""
    del model.graph.node[pick(len(model.graph.node))]


def rename_input(model: onnx.ModelProto, pick: Pick) -> None:
    """One input of one node now names a tensor that does not exist."""
    nodes = [n for n in model.graph.node if n.input]
    node = _choose(pick, nodes)
    node.input[pick(len(node.input))] = MISSING


def rewire(model: onnx.ModelProto, pick: Pick) -> None:
    """One input of one node now reads another existing tensor: of another shape or dtype, or
    written later in the graph (out of order, or a cycle), or the empty name (input absent)."""
    graph = model.graph
    nodes = [n for n in graph.node if n.input]
    node = _choose(pick, nodes)
    names = [i.name for i in graph.input] + [i.name for i in graph.initializer] + [""]
    names += [o for n in graph.node for o in n.output if o]
    node.input[pick(len(node.input))] = _choose(pick, names)


def _with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with ONNX's inferred shapes as value_info (the exports carry none)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an already broken model keeps what it has
        return model
    return inferred if inferred.graph.value_info else model


def corrupt_shape(model: onnx.ModelProto, pick: Pick) -> None:
    """One declared shape (a graph input, output or value_info) gets a dim of 0, -1, a huge
    value or a symbolic name, or loses or gains a dim, or loses its shape altogether."""
    model.CopyFrom(_with_value_info(model))
    graph = model.graph
    values = [v for v in [*graph.input, *graph.output, *graph.value_info]
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")]
    shape = _choose(pick, values).type.tensor_type.shape
    how = _choose(pick, ["zero", "minus_one", "huge", "symbolic", "unknown", "rank_up", "rank_down", "scalar",
                         "no_shape"])
    if how == "no_shape":
        _choose(pick, values).type.tensor_type.ClearField("shape")
        return
    if how == "rank_up":
        shape.dim.add().dim_value = 2
        return
    if how == "scalar":
        del shape.dim[:]
        return
    if not shape.dim:
        shape.dim.add().dim_value = 0
        return
    dim = shape.dim[pick(len(shape.dim))]
    if how == "rank_down":
        shape.dim.remove(dim)
    elif how == "symbolic":
        dim.dim_param = "fmc_sym"
    elif how == "unknown":
        dim.Clear()
    else:
        dim.dim_value = {"zero": 0, "minus_one": -1, "huge": 2**40}[how]


ATTRIBUTES_OF_INTEREST = ("kernel_shape", "pads", "strides", "dilations", "group", "axis", "axes", "perm",
                          "transB", "alpha", "auto_pad", "ceil_mode", "hidden_size", "direction", "mode")


def _wrong_attribute(name: str, pick: Pick) -> AttributeProto:
    """An attribute `name` of a wrong type or with a wrong value."""
    value = _choose(pick, ["string", "float", "empty_ints", "int_not_ints", "ints_not_int", "zero", "negative",
                           "huge", "too_long", "too_short", "graph", "tensor"])
    literal = {"string": b"fmc", "float": 1.5, "empty_ints": [], "int_not_ints": 3, "ints_not_int": [1, 1],
               "zero": 0, "negative": -3, "huge": 2**40, "too_long": [1] * 9, "too_short": [2],
               "graph": helper.make_graph([], "g", [], []),
               "tensor": numpy_helper.from_array(np.zeros((2,), np.float32))}[value]
    if value == "empty_ints":
        return helper.make_attribute(name, literal, attr_type=AttributeProto.INTS)
    return helper.make_attribute(name, literal)


def mutate_attribute(model: onnx.ModelProto, pick: Pick) -> None:
    """Drop one attribute of one node, or replace it with a wrong type or value; or give a node
    an attribute its op does not have."""
    nodes = [n for n in model.graph.node if n.attribute]
    if not nodes or pick(5) == 0:
        node = _choose(pick, model.graph.node)
        node.attribute.append(_wrong_attribute(_choose(pick, ATTRIBUTES_OF_INTEREST), pick))
        return
    node = _choose(pick, nodes)
    index = pick(len(node.attribute))
    name = node.attribute[index].name
    del node.attribute[index]
    if pick(3) > 0:  # else dropped
        node.attribute.append(_wrong_attribute(name, pick))


EXTREME_INTS = {"kernel_shape": [1, 2, 5, 7, 64], "strides": [1, 2, 3, 64, 2**31], "dilations": [1, 2, 9, 2**20],
                "pads": [0, 1, 3, 40, -1, -5], "group": [1, 2, 4, 3, 10**6, 0, -1], "axis": [-5, -4, -1, 0, 1, 3, 4, 9],
                "perm": [0, 1, 2, 3, 5]}


def extreme_attribute(model: onnx.ModelProto, pick: Pick) -> None:
    """An attribute of the right type with an unusual value: strides or kernels larger than the
    map, negative or huge pads, a group that divides nothing, an axis out of range, a
    permutation with a repeat; every element of a list is drawn on its own."""
    nodes = [n for n in model.graph.node if any(a.name in EXTREME_INTS for a in n.attribute)]
    if not nodes:
        mutate_attribute(model, pick)
        return
    node = _choose(pick, nodes)
    attrs = [a for a in node.attribute if a.name in EXTREME_INTS]
    attr = _choose(pick, attrs)
    values = EXTREME_INTS[attr.name]
    if attr.type == AttributeProto.INTS:
        length = len(attr.ints) if pick(4) else len(attr.ints) + _choose(pick, [-1, 1])
        new = [_choose(pick, values) for _ in range(max(length, 0))]
        del attr.ints[:]
        attr.ints.extend(new)
    else:
        attr.i = _choose(pick, values)


def input_dtype(model: onnx.ModelProto, pick: Pick) -> None:
    """A graph input's or output's element type changed (int64, float16, double, bool, undefined)."""
    values = [*model.graph.input, *model.graph.output]
    value = _choose(pick, values)
    value.type.tensor_type.elem_type = _choose(pick, [TensorProto.INT64, TensorProto.FLOAT16, TensorProto.DOUBLE,
                                                      TensorProto.BOOL, TensorProto.UNDEFINED, TensorProto.UINT8])


def initializer_dtype(model: onnx.ModelProto, pick: Pick) -> None:
    """One initializer's dtype changed: converted properly (float32 -> int64, float16, ...),
    or only relabelled, so that its bytes no longer match its dtype."""
    init = _choose(pick, model.graph.initializer)
    dtype = _choose(pick, [TensorProto.INT64, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8,
                           TensorProto.BOOL, TensorProto.STRING, TensorProto.FLOAT])
    if pick(2) == 0 and dtype != TensorProto.STRING:
        array = numpy_helper.to_array(init)
        converted = array.astype(helper.tensor_dtype_to_np_dtype(dtype))
        init.CopyFrom(numpy_helper.from_array(converted, init.name))
    else:
        init.data_type = dtype


def initializer_dims(model: onnx.ModelProto, pick: Pick) -> None:
    """One initializer's dims no longer match its data (a dim grown, shrunk or dropped, a dim
    added, a scalar, or a negative dim)."""
    init = _choose(pick, model.graph.initializer)
    how = _choose(pick, ["grow", "shrink", "drop", "add", "scalar", "negative", "zero"])
    dims = list(init.dims)
    if how in ("add", "scalar") or not dims:
        dims = [] if how == "scalar" else [*dims, 3]
    else:
        index = pick(len(dims))
        if how == "drop":
            del dims[index]
        else:
            dims[index] = {"grow": dims[index] + 1, "shrink": max(dims[index] - 1, 0), "negative": -1,
                           "zero": 0}[how]
    del init.dims[:]
    init.dims.extend(dims)


def unknown_op(model: onnx.ModelProto, pick: Pick) -> None:
    """One node's op_type is an op no one knows (in the default or a custom domain)."""
    node = _choose(pick, model.graph.node)
    node.op_type = UNKNOWN_OP
    if pick(3) == 0:
        node.domain = "com.example.fmc"


def mutate_opset(model: onnx.ModelProto, pick: Pick) -> None:
    """The default opset import removed, or set to an old or a huge version."""
    how = _choose(pick, ["remove", 1, 6, 9, 11, 13, 99, 2**40])
    imports = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if how == "remove":
        for entry in imports:
            model.opset_import.remove(entry)
    else:
        for entry in imports:
            entry.version = how


def remove_output(model: onnx.ModelProto, pick: Pick) -> None:
    """One graph output removed, or all of them."""
    outputs = model.graph.output
    if pick(3) == 0 or len(outputs) < 2:
        del outputs[:]
    else:
        del outputs[pick(len(outputs))]


def duplicate_output(model: onnx.ModelProto, pick: Pick) -> None:
    """Two nodes write the same tensor name (or a node writes a graph input or an initializer)."""
    nodes = model.graph.node
    node = nodes[pick(len(nodes))]
    sources = [o for n in nodes if n is not node for o in n.output if o]
    sources += [i.name for i in model.graph.input] + [i.name for i in model.graph.initializer]
    node.output[pick(len(node.output))] = _choose(pick, sources)


MUTATIONS: dict[str, Callable[[onnx.ModelProto, Pick], None]] = {
    "remove_node": remove_node,
    "rename_input": rename_input,
    "rewire": rewire,
    "corrupt_shape": corrupt_shape,
    "attribute": mutate_attribute,
    "extreme_attribute": extreme_attribute,
    "input_dtype": input_dtype,
    "initializer_dtype": initializer_dtype,
    "initializer_dims": initializer_dims,
    "unknown_op": unknown_op,
    "opset": mutate_opset,
    "remove_output": remove_output,
    "duplicate_output": duplicate_output,
}


def mutant_bytes(model: onnx.ModelProto, kind: str, pick: Pick) -> bytes:
    """The serialized mutant; `truncated` cuts the original file short."""
    data = model.SerializeToString()
    if kind == "truncated":
        return data[:pick(len(data))]
    mutant = _copy(model)
    MUTATIONS[kind](mutant, pick)
    return mutant.SerializeToString()


KINDS = (*MUTATIONS, "truncated")


# ----------------------------------------------------------------------------- the contract

class NativeStderr:
    """What native code (onnxruntime's C++ logger) writes straight to file descriptor 2 while
    the block runs; CliRunner sees only Python's sys.stderr, a user's terminal sees both."""

    def __enter__(self) -> NativeStderr:
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc_info) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()


def run_cli(args: list[str]):
    """Invoke the CLI in-process: (click's result, what native code wrote to fd 2)."""
    with NativeStderr() as native:
        result = CliRunner().invoke(main, args)
    return result, native.text


# onnxruntime's C++ logger writes "[E:onnxruntime:...]" lines to stderr for models it refuses,
# beside fmcompress's own `error:` line, until passes/runtime.py and fmcompress/shapes.py open
# their probe sessions at log_severity_level 4; then set this True (test_onnxruntime_logs_quiet)
CHECK_NATIVE_STDERR = True


def assert_no_traceback(result, native: str, args: list[str], check_native: bool = CHECK_NATIVE_STDERR) -> None:
    """Exit 0, 1 or 2; on a failure exactly one `error: ...` line (warnings may come first);
    never a traceback, never an internal error; with `check_native`, nothing from native code
    on stderr either."""
    where = (f"{' '.join(map(str, args))}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
             f"\nnative stderr: {native[-1000:]}")
    assert not (check_native and native.strip()), where
    assert "Traceback" not in result.output, where
    assert "internal error" not in result.stderr, where
    assert result.exit_code in (0, 1, 2), where
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), (where, repr(result.exception))
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    if result.exit_code == 0:
        assert not any(line.startswith("error:") for line in lines), where
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), where


def check_mutant(data: bytes, folder: Path, commands=COMMANDS, shape: str | None = None) -> None:
    path = folder / "mutant.onnx"
    path.write_bytes(data)
    for command in commands:
        args = [*command, str(path)] + (["--input-shape", shape] if shape else [])
        if command[0] == "compile":
            args += ["-q", "-o", str(folder / "mutant.fmc.onnx")]
        assert_no_traceback(*run_cli(args), args)


# ----------------------------------------------------------------------------- models

@functools.cache
def tiny_models() -> dict[str, onnx.ModelProto]:
    from modeltools import sequence_head, tiny_classifier

    return {"tiny_classifier": tiny_classifier(), "sequence_head": sequence_head()}


@functools.cache
def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def _hypothesis_check(model: onnx.ModelProto, kind: str, folder: Path, commands, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data) -> None:
        mutant = mutant_bytes(model, kind, lambda n: data.draw(st.integers(0, max(n - 1, 0))))
        check_mutant(mutant, folder, commands)

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_digits_mutants(kind, tmp_path):
    """The demo model, every mutation, a few draws each, through all three commands."""
    _hypothesis_check(load(DIGITS), kind, tmp_path, COMMANDS, examples=4)


@pytest.mark.parametrize("name", ["tiny_classifier", "sequence_head"])
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_mutants(name, kind, tmp_path):
    """The tiny test models (symbolic batch), every mutation."""
    _hypothesis_check(tiny_models()[name], kind, tmp_path, COMMANDS, examples=3)


@pytest.mark.parametrize("kind", ["remove_node", "attribute", "corrupt_shape", "initializer_dims"])
def test_runtime_plan_mutants(kind, tmp_path):
    """`compile --plan-only --runtime ort` too, on a few mutations of the demo."""
    _hypothesis_check(load(DIGITS), kind, tmp_path, (PLAN_ORT,), examples=3)


ZOO = [("mobilenet_v3_small", (1, 3, 32, 32)), ("shufflenet_v2", (1, 3, 32, 32)), ("unet", (1, 3, 32, 32)),
       ("crnn", (1, 3, 32, 128)), ("squeezenet", (1, 3, 64, 64))]


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", ZOO, ids=[name for name, _ in ZOO])
@pytest.mark.parametrize("kind", KINDS)
def test_zoo_mutants(name, shape, kind, zoo_onnx, tmp_path):
    """Zoo exports (inverted residuals, channel shuffles, skip Concats, LSTMs), every mutation."""
    _hypothesis_check(load(zoo_onnx(name, shape)), kind, tmp_path, (*COMMANDS, PLAN_ORT), examples=2)


def test_unmutated_models_pass(tmp_path):
    """The contract's baseline: the unmutated models succeed (exit 0) in every command (the
    tiny models' maps are too small for onnxruntime's tiling, so `--runtime ort` on the demo only)."""
    for name, model in {"digits": load(DIGITS), **tiny_models()}.items():
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        for command in (*COMMANDS, PLAN_ORT) if name == "digits" else COMMANDS:
            args = [*command, str(path)]
            args += ["-q", "-o", str(tmp_path / "out.onnx")] if command[0] == "compile" else []
            result, native = run_cli(args)
            assert result.exit_code == 0, (args, result.output)
            assert not native.strip(), (args, native)


def conv_bias_of_wrong_length() -> onnx.ModelProto:
    """The demo whose first Conv reads the 10-element `fc.bias` as its 16-channel bias: ONNX's
    shape inference does not look, onnxruntime refuses to run it (the runtime view)."""
    model = _copy(load(DIGITS))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3)
    conv.input[2] = "fc.bias"
    return model


def test_onnxruntime_logs_quiet(tmp_path):
    """A model onnxruntime refuses: the user sees fmcompress's words only, no C++ log lines."""
    path = tmp_path / "bias.onnx"
    onnx.save(conv_bias_of_wrong_length(), str(path))
    for command in COMMANDS:
        args = [*command, str(path)]
        result, native = run_cli(args)
        assert_no_traceback(result, native, args, check_native=True)


# ----------------------------------------------------------------------------- fuzzing by hand

def fuzz(path: str, count: int = 200, seed: int = 0, commands=(*COMMANDS, PLAN_ORT)) -> list[str]:
    """Random mutants of `path` (no hypothesis): the failures, each with its kind and seed."""
    model = onnx.load(path)
    failures = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(count):
            kind = KINDS[i % len(KINDS)]
            rng = random.Random(seed * 100_003 + i)
            try:
                check_mutant(mutant_bytes(model, kind, lambda n, r=rng: r.randrange(max(n, 1))),
                             Path(folder), commands)
            except AssertionError as exc:
                failures.append(f"{kind} seed={seed * 100_003 + i}: {str(exc)[:600]}")
                print(failures[-1], flush=True)
    return failures


if __name__ == "__main__":
    fuzz(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
