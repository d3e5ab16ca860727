"""EqualizeRangesPass (passes/equalize.py): every stored map's channels brought to one range for uint8."""

from __future__ import annotations

import numpy as np
import pytest
from modeltools import tiny_classifier

from fmcompress import api
from fmcompress.data import Dataset
from fmcompress.featuremaps import Projection
from fmcompress.passes.base import PassContext
from fmcompress.passes.equalize import EqualizeRangesPass, equalized, stored_peaks
from fmcompress.passes.graph import Model

torch = pytest.importorskip("torch")


def _data(count: int = 32) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(inputs={"x": rng.standard_normal((count, 3, 8, 8)).astype(np.float32)}, labels=None,
                   source="random")


def _uneven(seed: int, k: int = 4) -> Projection:
    """An orthonormal projection of 16 channels to k whose stored channels span ranges 1:10:100:1000."""
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((16, k)))[0]
    gains = 10.0 ** np.arange(k)
    return Projection(P=(q.T * gains[:, None]).astype(np.float32), U=(q / gains[None, :]).astype(np.float32))


def _outputs(projections: dict[str, Projection], data: Dataset, rounded: bool = False) -> np.ndarray:
    """The classifier's logits with the projections installed; with `rounded`, each stored map
    P x rounded as onnxruntime stores a uint8 activation (projection.fake_quant_uint8)."""
    from fmcompress.backend.projection import ChannelProjection
    from fmcompress.passes.fit import torch_executor

    executor = torch_executor(tiny_classifier())
    for name, projection in projections.items():
        executor.set_transform(name, ChannelProjection(projection.P, projection.U, quantized=rounded))
    with torch.no_grad():
        return executor(torch.from_numpy(data.inputs["x"]))[0].numpy()


def _run(projections: dict[str, Projection], data: Dataset) -> PassContext:
    ctx = PassContext(projections=dict(projections), projected_graph=Model.of(tiny_classifier()), calibration=data)
    EqualizeRangesPass().run(Model.of(tiny_classifier()), ctx)
    return ctx


def test_rescaling_keeps_u_times_p_and_gives_every_channel_the_geometric_mean_range():
    """Rules b and c on one projection; a dead channel keeps its scale."""
    projection = _uneven(0)
    peaks = np.array([0.5, 5.0, 50.0, 0.0])
    rescaled, spread = equalized(projection, peaks)
    np.testing.assert_allclose(rescaled.U @ rescaled.P, projection.U @ projection.P, rtol=1e-5, atol=1e-6)
    scales = np.linalg.norm(rescaled.P, axis=1) / np.linalg.norm(projection.P, axis=1)
    np.testing.assert_allclose(scales[:3] * peaks[:3], [5.0] * 3, rtol=1e-5)  # (0.5 * 5 * 50) ** (1/3)
    assert scales[3] == pytest.approx(1.0) and spread == pytest.approx(100.0)


def test_the_pass_gives_every_stored_channel_one_range_and_keeps_the_float_outputs():
    """Rules a, c and d on the classifier's two maps, measured again by the executor."""
    data = _data()
    projections = {"r1": _uneven(1), "r2": _uneven(2)}
    ctx = _run(projections, data)
    assert [entry["name"] for entry in ctx.equalized] == ["r1", "r2"]
    assert all(entry["spread"] > 100 for entry in ctx.equalized)  # gains of 1 to 1000 on random directions
    after = stored_peaks(tiny_classifier(), ctx.projections, data, batch=8)
    for name in projections:
        assert after[name].max() / after[name].min() == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(_outputs(ctx.projections, data), _outputs(projections, data), rtol=1e-4, atol=1e-4)


def test_equal_ranges_lose_less_to_uint8_rounding_of_the_stored_maps():
    """What the pass is for: with each P x rounded as a uint8 tensor (one scale from its range),
    the logits move less from the float ones once the channels share the range."""
    data = _data()
    projections = {"r1": _uneven(3), "r2": _uneven(4)}
    exact = _outputs(projections, data)
    before = np.abs(_outputs(projections, data, rounded=True) - exact).mean()
    after = np.abs(_outputs(_run(projections, data).projections, data, rounded=True) - exact).mean()
    assert after < before / 10


def test_int8_compile_reports_each_stored_maps_range_spread():
    """compile --int8 runs the pass (the report's maps give `range_spread`); a float compile does not."""
    common = {"ceiling": "4x", "method": "pca", "num_samples": 32, "latency_rounds": 1, "latency_repeats": 1,
              "measure_memory": False}
    spreads = [entry["range_spread"] for entry in api.compile(tiny_classifier(), int8=True, **common).report["maps"]]
    assert spreads and all(spread >= 1.0 for spread in spreads)
    assert all(entry["range_spread"] is None for entry in api.compile(tiny_classifier(), **common).report["maps"])
