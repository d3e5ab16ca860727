"""LSTM and GRU in the torch backend: differential tests against onnxruntime (and onnx.reference).

Single-node models over many configurations (directions, optional inputs and outputs, layouts,
linear_before_reset, clip, activations with alpha/beta, input_forget, sequence_lens, peepholes,
opsets 7/14/22) at batch 1 and 3; whole CRNN-style models exported from torch (nn.LSTM and
nn.GRU after convolutions); gradients. onnxruntime's CPU kernels refuse layout=1, so a
layout-1 node is checked against onnxruntime running its layout-0 twin (inputs and outputs
transposed) and against onnx.reference directly. onnx.reference ignores clip, activations,
input_forget and sequence_lens, so it serves as a second reference only where none is used.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from modeltools import ChannelBottleneck
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from fmcompress.backend import OnnxModule, unsupported_ops
from fmcompress.errors import InputError, UnsupportedOpError

GATES = {"LSTM": 4, "GRU": 3}
OUTPUTS = {"LSTM": ("Y", "Y_h", "Y_c"), "GRU": ("Y", "Y_h")}


@dataclass(frozen=True)
class Rnn:
    """One LSTM/GRU node configuration; the model is built with random weights from `seed`."""

    id: str
    op: str
    direction: str = "forward"
    batch: int = 3
    steps: int = 5
    inputs: int = 4
    hidden: int = 6
    bias: bool = True
    initial: bool = True  # initial_h (and initial_c for LSTM)
    peepholes: bool = False
    outputs: tuple[str, ...] = ()  # names per output slot, "" for an unused one; () = all
    layout: int = 0
    lengths: tuple[int, ...] | None = None  # sequence_lens
    opset: int = 17
    attrs: dict[str, Any] = field(default_factory=dict)
    weight_scale: float = 0.5
    ort_only: bool = False  # uses an attribute onnx.reference ignores

    @property
    def dirs(self) -> int:
        return 2 if self.direction == "bidirectional" else 1


def _arrays(case: Rnn) -> dict[str, np.ndarray | None]:
    """Named inputs in ONNX order (layout 0 shapes); None for an absent optional input."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    g, d, h = GATES[case.op], case.dirs, case.hidden

    def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    arrays: dict[str, np.ndarray | None] = {
        "X": rand(case.steps, case.batch, case.inputs),
        "W": rand(d, g * h, case.inputs, scale=case.weight_scale),
        "R": rand(d, g * h, h, scale=case.weight_scale),
        "B": rand(d, 2 * g * h, scale=0.3) if case.bias else None,
        "sequence_lens": None if case.lengths is None else np.array(case.lengths, np.int32),
        "initial_h": rand(d, case.batch, h) if case.initial else None,
    }
    if case.op == "LSTM":
        arrays["initial_c"] = rand(d, case.batch, h) if case.initial else None
        arrays["P"] = rand(d, 3 * h, scale=0.5) if case.peepholes else None
    return arrays


def _layout1(name: str, value: np.ndarray) -> np.ndarray:
    """A layout-0 input in layout 1: X [T,B,I] -> [B,T,I], states [D,B,H] -> [B,D,H]."""
    return np.ascontiguousarray(value.swapaxes(0, 1)) if name in ("X", "initial_h", "initial_c") else value


def build(case: Rnn, layout: int | None = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The node as a one-node model; weights are initializers, X and the states graph inputs."""
    layout = case.layout if layout is None else layout
    arrays = _arrays(case)
    while arrays and list(arrays.values())[-1] is None:  # trailing optional inputs omitted
        arrays.popitem()
    feeds, inits, names, infos = {}, [], [], []
    for name, value in arrays.items():
        if value is None:
            names.append("")
            continue
        value = _layout1(name, value) if layout == 1 else value
        names.append(name)
        if name in ("X", "initial_h", "initial_c"):
            feeds[name] = value
            infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape))
        else:
            inits.append(numpy_helper.from_array(value, name))
    outs = list(case.outputs or OUTPUTS[case.op])
    attrs = {"hidden_size": case.hidden, "direction": case.direction, **case.attrs}
    if layout:
        attrs["layout"] = layout
    node = helper.make_node(case.op, names, outs, name="rnn", **attrs)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs if n]
    graph = helper.make_graph([node], case.id, infos, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8 if case.opset <= 18 else 10
    return model, feeds


def run_ours(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in OnnxModule(model)({k: torch.from_numpy(v) for k, v in feeds.items()})]


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_close(got: np.ndarray, want: np.ndarray, who: str, rel: float = 1e-5) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, f"{who}: {got.shape} vs {want.shape}"
    scale = max(float(np.linalg.norm(want)), 1e-12)
    assert float(np.linalg.norm(got - want)) / scale <= rel, f"{who}: relative error too large"
    np.testing.assert_allclose(got, want, rtol=rel, atol=2e-6, err_msg=who)


def _ort_layout1(case: Rnn) -> list[np.ndarray]:
    """onnxruntime's answer for a layout-1 node: its layout-0 twin, outputs moved to layout 1."""
    model, feeds = build(case, layout=0)
    results = run_ort(model, feeds)
    names = [n for n in (case.outputs or OUTPUTS[case.op]) if n]
    return [np.ascontiguousarray(r.transpose(2, 0, 1, 3) if n == "Y" else r.swapaxes(0, 1))
            for n, r in zip(names, results, strict=True)]


def C(id: str, op: str, **kw: Any) -> Rnn:
    return Rnn(id, op, **kw)


DIRECTIONS = ("forward", "reverse", "bidirectional")
CLIP_ACTS = {"clip": 0.7}
LSTM_ACTS = {"activations": ["HardSigmoid", "LeakyRelu", "Softsign", "Sigmoid", "Tanh", "ScaledTanh"],
             "activation_alpha": [0.3, 0.05, 0.8], "activation_beta": [0.4, 1.2]}
LSTM_ACTS_2 = {"activations": ["Sigmoid", "Affine", "Elu"], "activation_alpha": [0.5, 0.9],
               "activation_beta": [0.1]}
GRU_ACTS = {"activations": ["HardSigmoid", "Softplus", "Sigmoid", "ThresholdedRelu"],
            "activation_alpha": [0.25, 0.1], "activation_beta": [0.45]}
GRU_ACTS_2 = {"activations": ["Sigmoid", "Relu"]}

CASES: list[Rnn] = [
    # every direction at batch 1 and 3, all optional inputs present
    *[C(f"{op}-{d}-b{b}", op, direction=d, batch=b, peepholes=op == "LSTM")
      for op in GATES for d in DIRECTIONS for b in (1, 3)],
    # only X, W, R
    *[C(f"{op}-{d}-minimal", op, direction=d, bias=False, initial=False) for op in GATES for d in DIRECTIONS],
    # LSTM without peepholes, GRU linear_before_reset
    *[C(f"LSTM-{d}-no-peepholes", "LSTM", direction=d) for d in DIRECTIONS],
    *[C(f"GRU-{d}-lbr-b{b}", "GRU", direction=d, batch=b, attrs={"linear_before_reset": 1})
      for d in DIRECTIONS for b in (1, 3)],
    C("GRU-lbr-minimal", "GRU", direction="bidirectional", bias=False, initial=False,
      attrs={"linear_before_reset": 1}),
    # output subsets (empty names), a single output
    C("LSTM-Y-only", "LSTM", direction="bidirectional", outputs=("Y",)),
    C("LSTM-Yh-only", "LSTM", direction="reverse", outputs=("", "Y_h")),
    C("LSTM-Yc-only", "LSTM", direction="bidirectional", outputs=("", "", "Y_c")),
    C("LSTM-Y-and-Yc", "LSTM", outputs=("Y", "", "Y_c"), peepholes=True),
    C("LSTM-states-only", "LSTM", direction="bidirectional", outputs=("", "Y_h", "Y_c")),
    C("GRU-Y-only", "GRU", direction="bidirectional", outputs=("Y",)),
    C("GRU-Yh-only", "GRU", direction="reverse", outputs=("", "Y_h"), attrs={"linear_before_reset": 1}),
    # layout 1 (opset 14+)
    *[C(f"{op}-{d}-layout1-b{b}", op, direction=d, batch=b, layout=1, opset=14, peepholes=op == "LSTM")
      for op in GATES for d in ("forward", "bidirectional") for b in (1, 3)],
    C("GRU-layout1-lbr", "GRU", direction="reverse", layout=1, opset=22, attrs={"linear_before_reset": 1}),
    C("LSTM-layout1-Yh-only", "LSTM", direction="bidirectional", layout=1, opset=14, outputs=("", "Y_h")),
    # opsets
    *[C(f"{op}-opset{v}", op, direction="bidirectional", opset=v) for op in GATES for v in (7, 14, 22)],
    # clip (weights large enough that it bites), activations, input_forget
    *[C(f"{op}-{d}-clip", op, direction=d, attrs=CLIP_ACTS, weight_scale=2.0, ort_only=True)
      for op in GATES for d in ("forward", "bidirectional")],
    C("GRU-clip-lbr", "GRU", direction="bidirectional", weight_scale=2.0, ort_only=True,
      attrs={"clip": 0.5, "linear_before_reset": 1}),
    C("LSTM-activations-bidirectional", "LSTM", direction="bidirectional", attrs=LSTM_ACTS, ort_only=True),
    C("LSTM-activations-affine-elu", "LSTM", direction="reverse", attrs=LSTM_ACTS_2, peepholes=True, ort_only=True),
    C("LSTM-activations-lowercase", "LSTM", attrs={"activations": ["sigmoid", "tanh", "relu"]}, ort_only=True),
    C("GRU-activations-bidirectional", "GRU", direction="bidirectional", attrs=GRU_ACTS, ort_only=True),
    C("GRU-activations-relu", "GRU", attrs={**GRU_ACTS_2, "linear_before_reset": 1}, ort_only=True),
    *[C(f"LSTM-{d}-input-forget", "LSTM", direction=d, peepholes=True, attrs={"input_forget": 1}, ort_only=True)
      for d in ("forward", "bidirectional")],
    # sequence_lens: all full, and shorter ones (reverse sequences start at their own end)
    *[C(f"{op}-{d}-lengths-full", op, direction=d, lengths=(5, 5, 5)) for op in GATES for d in DIRECTIONS],
    *[C(f"{op}-{d}-lengths-mixed", op, direction=d, lengths=(5, 2, 0), ort_only=True, peepholes=op == "LSTM")
      for op in GATES for d in DIRECTIONS],
    C("GRU-lengths-mixed-lbr", "GRU", direction="bidirectional", lengths=(3, 5, 1), ort_only=True,
      attrs={"linear_before_reset": 1}),
    C("LSTM-lengths-one-step", "LSTM", direction="bidirectional", steps=1, batch=1, lengths=(1,)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rnn_matches_onnxruntime_and_reference(case: Rnn) -> None:
    model, feeds = build(case)
    got = run_ours(model, feeds)
    want = _ort_layout1(case) if case.layout == 1 else run_ort(model, feeds)
    assert len(got) == len(want) == sum(1 for n in (case.outputs or OUTPUTS[case.op]) if n)
    for ours, theirs in zip(got, want, strict=True):
        assert_close(ours, theirs, "onnxruntime")
    if not case.ort_only and (case.lengths is None or case.lengths == (case.steps,) * case.batch):
        reference = ReferenceEvaluator(model).run(None, feeds)
        for ours, theirs in zip(got, reference, strict=True):
            assert_close(ours, theirs, "onnx.reference")


def test_clip_and_activation_cases_are_not_vacuous() -> None:
    """Clip, the activations and input_forget change the result (so the cases above test them)."""
    checked = 0
    for case in CASES:
        plain_attrs = {k: v for k, v in case.attrs.items() if k == "linear_before_reset"}
        if plain_attrs == case.attrs:
            continue
        model, feeds = build(case)
        plain, _ = build(replace(case, attrs=plain_attrs))
        checked += 1
        assert not np.allclose(run_ours(model, feeds)[0], run_ours(plain, feeds)[0], atol=1e-3), case.id
    assert checked == 12


def test_mixed_lengths_pad_with_zeros_and_zero_length_ends_in_zero_state() -> None:
    case = C("lengths", "LSTM", direction="bidirectional", lengths=(5, 2, 0))
    y, y_h, y_c = run_ours(*build(case))
    assert np.all(y[2:, :, 1] == 0) and np.all(y[:, :, 2] == 0) and np.all(y_h[:, 2] == 0) and np.all(y_c[:, 2] == 0)
    np.testing.assert_array_equal(y_h[0, 1], y[1, 0, 1])  # forward ends at the sequence's own end
    np.testing.assert_array_equal(y_h[1, 1], y[0, 1, 1])  # reverse ends at t = 0


# ---------------------------------------------------------------- errors and support


def test_unknown_activation_is_a_one_line_unsupported_op_error() -> None:
    model, _ = build(C("bad", "LSTM", attrs={"activations": ["Sigmoid", "Gelu", "Tanh"]}))
    assert unsupported_ops(model) == {"LSTM(activations=Gelu)": 1}
    with pytest.raises(UnsupportedOpError, match=r"^unsupported ops: LSTM\(activations=Gelu\) x1$"):
        OnnxModule(model)
    model, _ = build(C("bad-count", "GRU", direction="bidirectional", attrs={"activations": ["Sigmoid", "Tanh"]}))
    assert unsupported_ops(model) == {"GRU(activations: 2 for bidirectional)": 1}


def test_sequence_lens_out_of_range_is_an_input_error() -> None:
    model, feeds = build(C("too-long", "GRU", lengths=(5, 6, 1)))
    with pytest.raises(InputError, match=r"GRU node 'rnn': sequence_lens \[5, 6, 1\] outside 0\.\.5"):
        run_ours(model, feeds)


def test_rnn_ops_are_supported() -> None:
    for op in GATES:
        model, _ = build(C(op, op, direction="bidirectional"))
        assert unsupported_ops(model) == {}


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", [C("LSTM-grad", "LSTM", direction="bidirectional", peepholes=True, steps=3, batch=2),
                                  C("GRU-grad", "GRU", direction="bidirectional", steps=3, batch=2,
                                    attrs={"linear_before_reset": 1}),
                                  C("GRU-grad-lengths", "GRU", direction="reverse", steps=3, batch=2,
                                    lengths=(3, 1), attrs={"clip": 1.5})],
                         ids=lambda c: c.id)
def test_gradcheck_inputs_and_initial_states(case: Rnn) -> None:
    model, feeds = build(case)
    module = OnnxModule(model).double()
    names = list(feeds)
    tensors = tuple(torch.from_numpy(feeds[n]).double().requires_grad_(True) for n in names)

    def outputs(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return module(dict(zip(names, values, strict=True)))

    assert torch.autograd.gradcheck(outputs, tensors, eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- whole models


class Crnn(nn.Module):
    """A text-recognizer shape: convolutions -> columns as a sequence -> recurrent -> per-step classes."""

    def __init__(self, cell: str):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1)),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((4, 1)))
        kind = nn.LSTM if cell == "lstm" else nn.GRU
        self.batch_first = cell == "gru"
        self.rnn = kind(16, 24, num_layers=2, bidirectional=True, batch_first=self.batch_first)
        self.classifier = nn.Linear(48, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).squeeze(2)  # [N, C, W]
        seq = f.permute(0, 2, 1) if self.batch_first else f.permute(2, 0, 1)
        out, _ = self.rnn(seq)
        return self.classifier(out)


def export_crnn(cell: str) -> tuple[nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    module = Crnn(cell).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        module.features[1].running_mean.uniform_(-0.2, 0.2)
        module.features[1].running_var.uniform_(0.5, 1.5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the tracer's notes on nn.LSTM's shape checks and batch size
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, 16, 40),), buffer, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "N"}, "y": {0 if cell == "gru" else 1: "N"}})
    return module, onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module", params=["lstm", "gru"])
def crnn(request) -> tuple[str, nn.Module, onnx.ModelProto]:
    return (request.param, *export_crnn(request.param))


def test_crnn_matches_onnxruntime_and_torch(crnn) -> None:
    cell, native, model = crnn
    assert sum(n.op_type == cell.upper() for n in model.graph.node) == 2  # two layers, bidirectional
    module = OnnxModule(model)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 40)).astype(np.float32)
        with torch.no_grad():
            (got,) = module(torch.from_numpy(x))
            want_torch = native(torch.from_numpy(x)).numpy()
        (want_ort,) = run_ort(model, {"x": x})
        assert got.shape == want_ort.shape == want_torch.shape
        assert_close(got.numpy(), want_ort, "onnxruntime", rel=1e-5)
        assert_close(got.numpy(), want_torch, "torch", rel=1e-5)


def test_crnn_gradients_reach_a_projection_before_the_rnn(crnn) -> None:
    cell, native, model = crnn
    module = OnnxModule(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1].startswith("features.4"))
    projection = ChannelBottleneck(16, 4)
    module.set_transform(conv.output[0], projection)
    x = torch.randn(2, 3, 16, 40, requires_grad=True)
    (y,) = module(x)
    y.square().mean().backward()
    for tensor in (x, projection.p.weight, projection.u.weight):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    # the same gradient as the native module with the projection after the same conv
    native.zero_grad()
    hook = native.features[4].register_forward_hook(lambda m, i, o: projection(o))
    try:
        x2 = x.detach().clone().requires_grad_(True)
        native(x2).square().mean().backward()
    finally:
        hook.remove()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)
