"""EqualizeRangesPass (passes/equalize.py): every stored map's channels brought to one range for uint8."""

from __future__ import annotations

import numpy as np
import pytest
from modeltools import tiny_classifier

from fmcompress import api
from fmcompress.data import Dataset
from fmcompress.featuremaps import Projection
from fmcompress.passes import equalize
from fmcompress.passes.base import PassContext
from fmcompress.passes.equalize import (
    EqualizeRangesPass,
    equalized,
    principal_basis,
    stored_moments,
    stored_peaks,
)
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


def _mixed(seed: int, k: int = 4) -> Projection:
    """An orthonormal projection of 16 channels to k, its basis mixed by an ill-conditioned A
    (U P = (Q A^-1)(A Q^T)): stored channels that are correlated and a U of large gains."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((16, k)))[0]
    mix = np.linalg.qr(rng.standard_normal((k, k)))[0] @ np.diag(10.0 ** np.arange(k)) \
        @ np.linalg.qr(rng.standard_normal((k, k)))[0]
    return Projection(P=(mix @ q.T).astype(np.float32), U=(q @ np.linalg.inv(mix)).astype(np.float32))


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


@pytest.mark.parametrize("basis", ["principal", "fitted"])
def test_the_pass_gives_every_stored_channel_one_range_and_keeps_the_float_outputs(basis, monkeypatch):
    """Rules b-e on the classifier's two maps, measured again by the executor, in either basis."""
    monkeypatch.setattr(equalize, "BASIS", basis)
    data = _data()
    projections = {"r1": _uneven(1), "r2": _uneven(2)}
    ctx = _run(projections, data)
    assert [entry["name"] for entry in ctx.equalized] == ["r1", "r2"]
    if basis == "fitted":
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


def test_the_principal_basis_keeps_u_times_p_with_u_orthonormal_and_decorrelated_channels():
    """Rule a on one projection: the product kept, U' orthonormal, E[z' z'^T] diagonal, strongest first."""
    projection = _mixed(5)
    x = np.random.default_rng(6).standard_normal((16, 2000)) * np.linspace(0.2, 2.0, 16)[:, None]
    z = projection.P.astype(np.float64) @ x
    rotated = principal_basis(projection, z @ z.T / x.shape[1])
    np.testing.assert_allclose(rotated.U @ rotated.P, projection.U @ projection.P, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rotated.U.T @ rotated.U, np.eye(4), atol=1e-5)
    moment = rotated.P.astype(np.float64) @ x @ x.T @ rotated.P.T.astype(np.float64) / x.shape[1]
    off_diagonal = moment - np.diag(np.diag(moment))
    assert np.abs(off_diagonal).max() < 1e-3 * np.diag(moment).max()
    assert list(np.diag(moment)) == sorted(np.diag(moment), reverse=True)


def test_the_pass_decorrelates_every_stored_map_as_the_executor_computes_it(monkeypatch):
    """Rules a and e on the classifier: the stored channels' moments, measured again, are diagonal."""
    monkeypatch.setattr(equalize, "BASIS", "principal")
    data = _data()
    ctx = _run({"r1": _mixed(7), "r2": _mixed(8)}, data)
    for name, moment in stored_moments(tiny_classifier(), ctx.projections, data, batch=8).items():
        off_diagonal = moment - np.diag(np.diag(moment))
        assert np.abs(off_diagonal).max() < 1e-4 * np.diag(moment).max(), name


def test_the_principal_basis_loses_less_to_uint8_rounding_than_the_fitted_one(monkeypatch):
    """What rule a is for: stored channels mixed by an ill-conditioned basis, equalized as fitted
    (rule a off), move the rounded logits more than the same product in its principal basis."""
    data = _data()
    projections = {"r1": _mixed(9), "r2": _mixed(10)}
    exact = _outputs(projections, data)
    monkeypatch.setattr(equalize, "BASIS", "principal")
    principal = np.abs(_outputs(_run(projections, data).projections, data, rounded=True) - exact).mean()
    monkeypatch.setattr(equalize, "BASIS", "fitted")
    fitted = np.abs(_outputs(_run(projections, data).projections, data, rounded=True) - exact).mean()
    assert principal < fitted / 3


def test_int8_compile_reports_each_stored_maps_range_spread():
    """compile --int8 runs the pass (the report's maps give `range_spread`); a float compile does not."""
    common = {"ceiling": "4x", "method": "pca", "num_samples": 32, "latency_rounds": 1, "latency_repeats": 1,
              "measure_memory": False}
    spreads = [entry["range_spread"] for entry in api.compile(tiny_classifier(), int8=True, **common).report["maps"]]
    assert spreads and all(spread >= 1.0 for spread in spreads)
    assert all(entry["range_spread"] is None for entry in api.compile(tiny_classifier(), **common).report["maps"])
