"""Time-major ([T, N, classes]) and batch-first ([N, T, classes]) sequence outputs: every place
that collects outputs over batches (run_ort, verify's executor path, measure's fidelity)
concatenates along each output's own batch axis. Checked against onnxruntime run sample by
sample and against numpy figures computed from the raw outputs."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.data import input_specs, load_dataset
from fmcompress.ortrun import ort_session, output_batch_axes, run_ort

torch = pytest.importorskip("torch")
CLASSES, HEIGHT, WIDTH = 12, 16, 32
STEPS = WIDTH // 2


class _Crnn(torch.nn.Module):
    """Convs down to one row, an LSTM over the width, per-step softmax; [T, N, C] or [N, T, C]."""

    def __init__(self, time_major: bool):
        super().__init__()
        nn = torch.nn
        self.time_major = time_major
        self.convs = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1)),
                                   nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d((4, 1)))
        self.lstm = nn.LSTM(32, 24)
        self.fc = nn.Linear(24, CLASSES)

    def forward(self, x):
        steps = self.convs(x).squeeze(2).permute(2, 0, 1)  # [T, N, 32]
        y = self.fc(self.lstm(steps)[0]).softmax(-1)  # [T, N, C]
        return y if self.time_major else y.transpose(0, 1)


def crnn(time_major: bool = True, free_batch: bool = True) -> onnx.ModelProto:
    """The CRNN exported by torch; `free_batch` makes the batch a symbol `N` (else fixed at 1)."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    axes = {"x": {0: "N"}, "y": {1 if time_major else 0: "N"}} if free_batch else None
    torch.onnx.export(_Crnn(time_major).eval(), torch.randn(1, 3, HEIGHT, WIDTH), buffer, input_names=["x"],
                      output_names=["y"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((7, 3, HEIGHT, WIDTH)).astype(np.float32)


def _per_sample(model: onnx.ModelProto, inputs: np.ndarray) -> list[np.ndarray]:
    """onnxruntime's output for each sample alone (no batching at all)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, {"x": sample[None]})[0] for sample in inputs]


@pytest.mark.parametrize(("time_major", "free_batch", "axis"),
                         [(True, True, 1), (True, False, 1), (False, True, 0), (False, False, 0)])
def test_batch_axis_and_stacking(samples, time_major, free_batch, axis):
    model = crnn(time_major, free_batch)
    session = ort_session(model)
    assert output_batch_axes(session, {"x": samples[:3]}) == [axis]
    singles = _per_sample(model, samples)
    expected = np.concatenate(singles, axis=axis)
    batches = [{"x": samples[start:start + 3]} for start in range(0, len(samples), 3)]
    [stacked] = run_ort(session, batches)
    np.testing.assert_allclose(stacked, expected, rtol=1e-5, atol=1e-6)
    first = run_ort(session, batches, batch_first=True)[0]
    assert first.shape == (len(samples), STEPS, CLASSES)
    np.testing.assert_allclose(first, np.moveaxis(expected, axis, 0), rtol=1e-5, atol=1e-6)


def test_probe_decides_when_nothing_is_declared(samples):
    """An output declaring no dims: the axis that grows from 1 to 2 samples."""
    model = crnn(time_major=True)
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    assert output_batch_axes(ort_session(model), {"x": samples[:1]}) == [1]


def _greedy(paths: np.ndarray, blank: int) -> list[list[int]]:
    decoded = []
    for path in paths:
        labels = [int(c) for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
        decoded.append([c for c in labels if c != blank])
    return decoded


@pytest.mark.parametrize("free_batch", [True, False])
def test_compile_time_major_end_to_end(tmp_path, samples, free_batch):
    """compile --method pca at batch 4 on a [T, N, C] model: verified, and the report's fidelity
    equals numpy's figures from each sample's raw outputs."""
    model = crnn(time_major=True, free_batch=free_batch)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(2).standard_normal((16, 3, HEIGHT, WIDTH)).astype(np.float32))
    options = CompileOptions(ceiling="4x", method="pca", data=str(data), num_samples=16, batch_size=4,
                             latency_repeats=1, latency_rounds=1)
    result = compile_model(model, options)
    assert result.plan.maps and result.report["verification"]["relative_error"] <= 1e-4
    held_out = load_dataset(str(data), input_specs(model, {'x': (1, 3, HEIGHT, WIDTH)}),
                            num_samples=options.num_samples).split(0.25, seed=0)[1].inputs["x"]
    reference = np.stack([y[:, 0] for y in _per_sample(model, held_out)]).astype(np.float64)
    candidate = np.stack([y[:, 0] for y in _per_sample(result.model, held_out)]).astype(np.float64)
    figures = result.report["fidelity"]
    relative = np.linalg.norm(candidate - reference) / np.linalg.norm(reference)
    assert figures["relative_error"] == pytest.approx(relative, rel=1e-4)
    assert figures["max_abs_error"] == pytest.approx(np.abs(candidate - reference).max(), rel=1e-3, abs=1e-7)
    flat_ref, flat_cand = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
    cosine = np.mean(np.sum(flat_ref * flat_cand, 1)
                     / (np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)))
    assert figures["cosine_similarity"] == pytest.approx(cosine, rel=1e-6)
    blank = int(np.bincount(reference.argmax(-1).ravel()).argmax())
    same = [a == b for a, b in zip(_greedy(reference.argmax(-1), blank), _greedy(candidate.argmax(-1), blank),
                                    strict=True)]
    assert figures["sequence_agreement"] == pytest.approx(np.mean(same))
    assert figures["top1_agreement"] is None
