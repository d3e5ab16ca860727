"""The output's Fisher information at the planned maps, and the block stage's `fisher` start."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from modeltools import sequence_head, tiny_classifier
from onnx import numpy_helper
from test_blockwise import TINY_MAPS, output_error
from test_pca import make_batches

import fmcompress
import fmcompress.backend.blockwise as blockwise
from fmcompress.backend import OnnxModule
from fmcompress.backend.blockwise import fit_blockwise, lstsq_projection
from fmcompress.backend.fisher import METRIC_FLOOR, metric_roots, output_fisher, unit_energy_scale
from fmcompress.errors import InputError
from fmcompress.train_config import TrainConfig

READ = 3  # the classifier below reads only r2's first READ channels


def half_read_classifier():
    """tiny_classifier whose Gemm reads r2's first READ channels only (the other columns zero)."""
    model = tiny_classifier()
    fc = next(init for init in model.graph.initializer if init.name == "fc")
    weights = numpy_helper.to_array(fc).copy()
    weights[:, READ:] = 0
    fc.CopyFrom(numpy_helper.from_array(weights, "fc"))
    return model


def pooled_regression():
    """tiny_classifier cut after its pooling: the features [N, 16, 1, 1] are the output, no class rows."""
    model = tiny_classifier()
    model.graph.node.pop()
    model.graph.node.pop()
    model.graph.output[0].name = "g"
    del model.graph.output[0].type.tensor_type.shape.dim[2:]
    return model


def test_the_fisher_is_zero_where_the_outputs_do_not_read_and_psd():
    batches, _ = make_batches((16, 3, 8, 8), 3)
    executor = OnnxModule(half_read_classifier())
    fisher = output_fisher(executor, [(name, c) for name, c, _ in TINY_MAPS], list(batches()))
    r2, r1 = fisher["r2"].numpy(), fisher["r1"].numpy()
    assert np.abs(r2[READ:, :]).max() == 0 and np.abs(r2[:, READ:]).max() == 0
    assert np.diag(r2)[:READ].min() > 0 and np.diag(r1).min() > 0  # r1 reaches the outputs through every r2 channel
    for moment in (r1, r2):
        assert np.linalg.eigvalsh(moment).min() > -1e-9 * np.trace(moment)
    assert len(executor.transforms) == 0  # the taps are gone


def test_sequence_and_regression_outputs_have_a_fisher_too():
    batches, _ = make_batches((16, 3, 8, 8), 2)
    sequence = output_fisher(OnnxModule(sequence_head()), [("r1", 16)], list(batches()))["r1"]
    assert np.trace(sequence.numpy()) > 0
    moment = output_fisher(OnnxModule(pooled_regression()), [("r1", 16)], list(batches()))["r1"]
    assert np.trace(moment.numpy()) > 0


def test_the_weighted_regression_is_the_best_rank_k_map_in_the_metric():
    """Against numpy: the rank-k W minimising sum (y - W x)^T M (y - W x), with M the metric as
    metric_roots floors it; with the identity it is the plain regression."""
    rng = np.random.default_rng(0)
    channels, n, k = 10, 3000, 3
    x = rng.standard_normal((channels, n)) * rng.uniform(0.3, 2, (channels, 1))
    y = rng.standard_normal((channels, channels)) @ x + 0.1 * rng.standard_normal((channels, n))
    a = rng.standard_normal((channels, channels))
    moment = a @ a.T * np.linspace(0.01, 3, channels)[:, None]
    moment = moment @ moment.T
    xx, yx = torch.from_numpy(x @ x.T), torch.from_numpy(y @ x.T)
    got = lstsq_projection(xx, yx, k, ridge=0.0, metric=torch.from_numpy(moment))
    metric = moment / (np.trace(moment) / channels) + METRIC_FLOOR * np.eye(channels)
    values, vectors = np.linalg.eigh(metric)
    root, inverse = (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T
    B = np.linalg.lstsq(x.T, y.T, rcond=None)[0].T  # noqa: N806
    top = np.linalg.svd(root @ B @ x, full_matrices=False)[0][:, :k]
    want = inverse @ top @ top.T @ root @ B
    np.testing.assert_allclose(got.U.astype(np.float64) @ got.P, want, rtol=1e-3, atol=1e-4)

    def weighted_error(w):
        e = y - w @ x
        return float(np.einsum("in,ij,jn->", e, metric, e))

    plain = lstsq_projection(xx, yx, k, ridge=0.0)
    assert weighted_error(want) < weighted_error(plain.U.astype(np.float64) @ plain.P)
    same = lstsq_projection(xx, yx, k, ridge=0.0, metric=torch.eye(channels, dtype=torch.float64))
    np.testing.assert_allclose(same.U @ same.P, plain.U @ plain.P, atol=1e-5)
    root_t, inverse_t = metric_roots(torch.from_numpy(moment))
    np.testing.assert_allclose(root_t.numpy() @ inverse_t.numpy(), np.eye(channels), atol=1e-8)


def test_the_fisher_start_keeps_the_channels_the_outputs_read():
    """At r2, whose later channels nothing reads, the plain start spends its rank on power and the
    Fisher start on what the Gemm reads: the outputs come nearer the original's."""
    model = half_read_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 4)
    maps = [("r2", 16, 3)]
    starts = {init: fit_blockwise(OnnxModule(model), maps, list(batches()), epochs=0, lr=1e-1, temperature=2.0,
                                  init=init) for init in ("lstsq", "fisher")}
    assert output_error(model, starts["fisher"], batches) < 0.3 * output_error(model, starts["lstsq"], batches)


def exact_fisher_at_r2(model, batches, temperature: float = 1.0) -> np.ndarray:
    """What rules b and c estimate at r2, exactly: sum over samples of the mean over every sign
    pattern r of g g^T / |g|^2, g = sum_c r_c sqrt(q_c) d(T log q_c)/d r2 the sample's gradient
    over its positions, q = softmax(logits / T) (E[g g^T] is the Hessian of T^2 KL(q || q'), the
    KD loss at T); by one backward pass per class and all 2^10 patterns of the 10 classes."""
    executor = OnnxModule(model)
    captured = {}

    class Capture(torch.nn.Module):
        def forward(self, x):
            x.retain_grad()
            captured["r2"] = x
            return x

    executor.set_transform("r2", Capture())
    patterns = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=10)), dtype=torch.float64)
    total = np.zeros((16, 16))
    for (x,) in batches:
        log_q = torch.log_softmax(executor(x.clone().requires_grad_(True))[0] / temperature, dim=-1)
        per_class = []
        for c in range(log_q.shape[1]):
            captured["r2"].grad = None
            (temperature * log_q[:, c].sum()).backward(retain_graph=True)
            g = captured["r2"].grad.double() * log_q[:, c].detach().exp().double().sqrt()[:, None, None, None]
            per_class.append(g.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 16))  # [N, positions, 16]
        gradients = torch.einsum("rc,ncpk->nrpk", patterns, torch.stack(per_class, 1))
        outer = torch.einsum("nrpk,nrpl->nrkl", gradients, gradients)
        total += (outer / gradients.pow(2).sum((2, 3))[..., None, None]).mean(1).sum(0).numpy()
    return total


def test_one_draw_of_signs_is_near_the_exact_fisher_and_more_come_nearer():
    """Rules b and c's estimate is near its expectation from one draw (one class drawn per row
    was 99% off the plain Fisher on this model), and its error falls with more draws."""
    batches, _ = make_batches((16, 3, 8, 8), 2)
    model = tiny_classifier()
    exact = exact_fisher_at_r2(model, list(batches()))
    errors = {}
    for draws in (1, 64):
        moment = output_fisher(OnnxModule(model), [("r2", 16)], list(batches()), draws=draws)["r2"].numpy() / draws
        errors[draws] = np.linalg.norm(moment - exact) / np.linalg.norm(exact)
    assert errors[1] < 0.2 and errors[64] < 0.03, errors


def test_every_sample_weighs_alike_in_the_metric():
    """Rule c: each sample's gradient at unit energy, whatever its size; a zero one stays zero."""
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    x[1] *= 1000
    x[2] = 0
    scaled = x * unit_energy_scale(x)[:, None, None, None]
    assert torch.allclose(scaled[:2].pow(2).sum((1, 2, 3)), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(scaled[1], x[1] / x[1].norm()) and scaled[2].abs().max() == 0


def test_class_outputs_count_every_sample_at_unit_energy_and_regression_outputs_plainly():
    """Rule c: with every position recorded, a class output's moment has a trace of one per
    sample and draw; a regression output's is the plain sum of its gradients' energy."""
    batches, _ = make_batches((16, 3, 8, 8), 2)  # 16 x 8 x 8 positions a batch: all recorded
    classes = output_fisher(OnnxModule(tiny_classifier()), [("r1", 16)], list(batches()), draws=3)["r1"]
    assert float(torch.trace(classes)) == pytest.approx(32 * 3, rel=1e-6)
    plain = output_fisher(OnnxModule(pooled_regression()), [("r1", 16)], list(batches()), draws=3)["r1"]
    assert abs(float(torch.trace(plain)) - 32 * 3) > 1


def test_at_a_temperature_the_draws_estimate_the_curvature_of_the_kd_loss_there():
    """Rule b at T: the metric of the KD loss compile trains with (temperature 2), which weighs
    confident predictions more than T = 1 does; a different moment from T = 1's."""
    batches, _ = make_batches((16, 3, 8, 8), 2)
    model = tiny_classifier()
    exact = {t: exact_fisher_at_r2(model, list(batches()), temperature=t) for t in (1.0, 2.0)}
    moment = output_fisher(OnnxModule(model), [("r2", 16)], list(batches()), draws=64, temperature=2.0)["r2"].numpy() / 64

    def off(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert off(moment, exact[2.0]) < 0.1 < off(exact[1.0], exact[2.0]), (off(moment, exact[2.0]), off(exact[1.0], exact[2.0]))


def test_the_number_of_draws_reaches_the_metric_from_compile(monkeypatch):
    """`TrainConfig.fisher_draws` (compile's `fisher_draws=`, the sweep's `--train fisher_draws=N`)
    is the draws rule b takes per batch; fewer than one is a usage error."""
    seen = []
    real = blockwise.output_fisher

    def recording(*args, **kwargs):
        seen.append(kwargs["draws"])
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "output_fisher", recording)
    fmcompress.compile(tiny_classifier(), ceiling="4x", num_samples=8, epochs=0, block_epochs=0, fisher_draws=3)
    assert seen == [3]
    with pytest.raises(InputError, match="fisher_draws"):
        TrainConfig(fisher_draws=0).check()


def test_the_floored_metric_is_the_normalised_moment_plus_the_floor_and_its_roots_square():
    """Rule d: M for a positive definite moment is the moment over its mean eigenvalue plus
    METRIC_FLOOR, and metric_roots' M^(1/2) squares to it."""
    from fmcompress.backend.fisher import floored_metric

    rng = np.random.default_rng(0)
    factor = rng.normal(size=(5, 5))
    moment = factor @ factor.T
    expected = moment / (np.trace(moment) / 5) + METRIC_FLOOR * np.eye(5)
    metric = floored_metric(torch.from_numpy(moment))
    np.testing.assert_allclose(metric.numpy(), expected, rtol=1e-10, atol=1e-12)
    root, _ = metric_roots(torch.from_numpy(moment))
    np.testing.assert_allclose((root @ root).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("count", [64, 10_000])  # positions drawn, and every position recorded
def test_sample_scale_scales_only_the_picked_vectors_as_the_scaled_map_would_give(count: int) -> None:
    """Rule c's scaling on the sampled vectors: the same vectors as sampling the scaled map, in
    either layout."""
    from fmcompress.backend.projection import sampled_vectors

    x = torch.randn(3, 8, 6, 7)
    scale = torch.tensor([0.5, 2.0, 0.0])
    for value in (x, x.contiguous(memory_format=torch.channels_last)):
        (scaled,) = sampled_vectors([value], count, torch.Generator().manual_seed(1), scale)
        (expected,) = sampled_vectors([value * scale[:, None, None, None]], count, torch.Generator().manual_seed(1))
        assert scaled.shape == expected.shape == (min(count, 3 * 6 * 7), 8)
        assert torch.allclose(scaled, expected)
