"""Block reconstruction (fmcompress.backend.blockwise): its rules, against PCA on the same maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from modeltools import tiny_classifier
from test_pca import IN_ORDER, branchy_model, make_batches

from fmcompress.backend import OnnxModule
from fmcompress.backend.blockwise import fit_blockwise
from fmcompress.backend.projection import fit_pca, install_projections
from fmcompress.featuremaps import Projection

TINY_MAPS = [("r1", 16, 3), ("r2", 16, 3)]


def output_error(model, projections: dict[str, Projection], batches) -> float:
    """Relative squared error of the outputs with `projections` applied, against the original's."""
    executor = OnnxModule(model)
    with torch.no_grad():
        reference = [executor(*inputs) for inputs in batches()]
        install_projections(executor, projections)
        student = [executor(*inputs) for inputs in batches()]
    num = sum(float((s - t).pow(2).sum()) for got, want in zip(student, reference, strict=True)
              for s, t in zip(got, want, strict=True))
    den = sum(float(t.pow(2).sum()) for want in reference for t in want)
    return num / den


def blockwise(model, maps, batches, epochs: int = 8, seed: int = 0, progress=None) -> dict[str, Projection]:
    return fit_blockwise(OnnxModule(model), maps, list(batches()), epochs=epochs, lr=1e-1, temperature=2.0,
                         seed=seed, progress=progress)


def test_blocks_reproduce_the_outputs_better_than_pca():
    model = tiny_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 4)
    pca = fit_pca(OnnxModule(model), TINY_MAPS, batches)
    losses = {}
    refined = blockwise(model, TINY_MAPS, batches,
                        progress=lambda i, name, fit: losses.update({name: (fit.first, fit.last)}))
    assert {name: (p.P.shape, p.U.shape) for name, p in refined.items()} == \
        {name: ((k, c), (c, k)) for name, c, k in TINY_MAPS}
    assert all(last < first for first, last in losses.values()), losses
    assert output_error(model, refined, batches) < 0.8 * output_error(model, pca, batches)


def test_no_epochs_is_pca_and_the_same_seed_repeats():
    model = tiny_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 3)
    pca = fit_pca(OnnxModule(model), TINY_MAPS, batches)
    for name, projection in blockwise(model, TINY_MAPS, batches, epochs=0).items():
        np.testing.assert_allclose(projection.P, pca[name].P, atol=1e-6)
    first, again = (blockwise(model, TINY_MAPS, batches, epochs=2, seed=5) for _ in range(2))
    other = blockwise(model, TINY_MAPS, batches, epochs=2, seed=6)
    for name in first:
        np.testing.assert_array_equal(first[name].P, again[name].P)
    assert any(not np.array_equal(first[name].P, other[name].P) for name in first)


def test_branches_end_each_block_where_it_is_read():
    """s1 and s2 come from one Split step; c2 does not read s1, so s1's block ends at e."""
    model = branchy_model()
    maps = [m for m in IN_ORDER if m[0] != "x"]
    batches, _ = make_batches((8, 4, 6, 6), 3)
    ends = []
    refined = blockwise(model, maps, batches, epochs=4, progress=lambda i, name, fit: ends.append(name))
    assert ends == [name for name, _, _ in maps]
    assert all(np.isfinite(p.P).all() and np.isfinite(p.U).all() for p in refined.values())
    pca = fit_pca(OnnxModule(model), maps, batches)
    assert output_error(model, refined, batches) < output_error(model, pca, batches)


@pytest.mark.parametrize("flags", [["--block-epochs", "-1"], ["--block-epochs", "x"], ["--block-lr", "0"]])
def test_bad_block_epochs_is_a_usage_error(tmp_path, flags):
    import onnx
    from click.testing import CliRunner

    from fmcompress.cli import main

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    result = CliRunner().invoke(main, ["compile", str(path), "--ceiling", "4x", *flags])
    assert result.exit_code == 2 and flags[0] in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_compile_logs_one_block_event_a_map(tmp_path):
    import json

    import onnx
    from click.testing import CliRunner

    from fmcompress.cli import main

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    result = CliRunner().invoke(main, ["compile", str(path), "--ceiling", "4x", "--num-samples", "16",
                                       "--batch-size", "4", "--epochs", "1", "--block-epochs", "2",
                                       "--json-log", str(tmp_path / "log.jsonl"), "--json", str(tmp_path / "r.json"),
                                       "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    blocks = [e for e in events if e["event"] == "block"]
    assert [e["map"] for e in blocks] == list(range(1, len(blocks) + 1)) and blocks[0]["maps"] == len(blocks) >= 1
    assert all(e["loss"] is not None and e["loss"] <= e["first_loss"] * 1.5 for e in blocks)
    assert events.index(blocks[-1]) < next(i for i, e in enumerate(events) if e["event"] == "epoch_start")
    assert "block 1/" in result.output
    stage = json.loads((tmp_path / "r.json").read_text())["training"]["block_stage"]
    assert stage["epochs"] == 2 and [m["loss"] for m in stage["maps"]] == [e["loss"] for e in blocks]
    assert all(0 < m["seconds"] <= stage["seconds"] for m in stage["maps"])


def test_max_samples_bounds_the_block_stage(tmp_path, monkeypatch):
    seen, _ = _stage_runs(tmp_path, monkeypatch, [("4x", {"max_samples": None}), ("4x", {"max_samples": 5})])
    assert [len(samples) for samples in seen] == [24, 5]  # a quarter of the 32 samples is held out


def _stage_runs(tmp_path, monkeypatch, runs: list[tuple[str, dict]],
                log: list[str] | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """The samples the block stage is handed and the report, one compile of the tiny classifier per
    (ceiling, TrainConfig settings); the compiles' log lines appended to `log`."""
    import onnx

    import fmcompress.backend.blockwise as module
    from fmcompress.compiler import CompileOptions, compile_model
    from fmcompress.train_config import TrainConfig

    seen = []
    real = module.fit_blockwise

    def recording(executor, maps, batches, **kwargs):
        seen.append(torch.cat([batch[0].cpu() for batch in batches]))
        return real(executor, maps, batches, **kwargs)

    monkeypatch.setattr(module, "fit_blockwise", recording)
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    reports = [compile_model(str(path), CompileOptions(ceiling=ceiling, num_samples=32, batch_size=4, latency_rounds=1,
                                                       latency_repeats=1, training=TrainConfig(
                                                           epochs=1, block_epochs=1, batch_size=4, **settings)),
                             log=(log if log is not None else []).append).report
               for ceiling, settings in runs]
    return seen, reports


def _stage_samples(tmp_path, monkeypatch, kinds: tuple[str, ...]) -> list[torch.Tensor]:
    """The samples the block stage is handed, one compile of the tiny classifier per --block-augment kind."""
    return _stage_runs(tmp_path, monkeypatch, [("4x", {"block_augment": kind}) for kind in kinds])[0]


def test_block_augment_look_gives_the_stage_other_looks_of_the_same_samples(tmp_path, monkeypatch):
    """--block-augment look: the stage's batches are as many, as large, half their samples changed."""
    plain, looked = _stage_samples(tmp_path, monkeypatch, ("none", "look"))
    assert plain.shape == looked.shape
    changed = sum(not torch.equal(a, b) for a, b in zip(plain, looked, strict=True))
    assert 4 <= changed <= 20  # of 24: about half


def test_block_augment_copies_adds_two_changed_copies_of_every_sample(tmp_path, monkeypatch):
    """--block-augment copies: the stage's samples as given, then a light and a strong copy of each."""
    plain, copied = _stage_samples(tmp_path, monkeypatch, ("none", "copies"))
    assert copied.shape == (3 * len(plain), *plain.shape[1:])
    assert torch.equal(copied[:len(plain)], plain)
    for part in (copied[len(plain):2 * len(plain)], copied[2 * len(plain):]):
        assert all(not torch.equal(a, b) for a, b in zip(plain, part, strict=True))  # noise changes every sample


def test_block_augment_auto_copies_only_where_the_plan_compresses_five_fold():
    """`auto` gives the stage copies where the planned maps keep a fifth of their bytes or less;
    a named kind is kept whatever the plan."""
    from fmcompress.passes.fit import block_augmentation, plan_compression
    from fmcompress.passes.plan import Plan, PlannedMap

    def plan(*bytes_after: int) -> Plan:
        maps = [PlannedMap(f"m{i}", [1, 64, 8, 8], 8, 4096, after, "conv", i) for i, after in enumerate(bytes_after)]
        return Plan("8x", 1024, None, maps)

    assert plan_compression(plan(1024, 512)) == 8192 / 1536
    assert block_augmentation("auto", plan(1024, 512)) == "copies"  # 5.3-fold
    assert block_augmentation("auto", plan(1024, 1024)) == "none"  # 4-fold
    assert block_augmentation("auto", plan(820, 818)) == "copies"  # 5.0-fold: from there on
    assert block_augmentation("auto", plan()) == "none"  # nothing planned
    assert block_augmentation("none", plan(64)) == "none"
    assert block_augmentation("look", plan(4096)) == "look"
    # ...and where the stage with copies fits the free memory (unknown either way: assumed to)
    assert block_augmentation("auto", plan(1024, 512), copies_bytes=2**30, available=2**31) == "copies"
    assert block_augmentation("auto", plan(1024, 512), copies_bytes=2**31, available=2**30) == "none"
    assert block_augmentation("auto", plan(1024, 512), copies_bytes=None, available=1) == "copies"
    assert block_augmentation("copies", plan(1024, 1024), copies_bytes=2**31, available=1) == "copies"


def test_stage_bytes_scales_a_samples_live_peak_in_float32():
    """`stage_bytes`: STAGE_LIVE_FACTOR x the live peak per sample (the analysed batch divided out,
    one-byte maps counted at four), times the samples; unknown without an analysis."""
    from types import SimpleNamespace

    from fmcompress.passes.fit import STAGE_LIVE_FACTOR, stage_bytes

    def report(live: int, batch: int, act_bytes: int | None):
        return SimpleNamespace(input_shapes={"x": [batch, 3, 8, 8]}, peaks={"live": live}, act_bytes=act_bytes)

    assert stage_bytes(report(1000, 1, None), 10) == STAGE_LIVE_FACTOR * 1000 * 10
    assert stage_bytes(report(4000, 4, None), 10) == STAGE_LIVE_FACTOR * 1000 * 10
    assert stage_bytes(report(250, 1, 1), 10) == STAGE_LIVE_FACTOR * 1000 * 10
    assert stage_bytes(None, 10) is None


def test_block_augment_auto_follows_the_ceiling_in_a_compile(tmp_path, monkeypatch):
    """The default (`auto`) hands the tiny classifier's stage its samples alone at a light ceiling and
    copies of them at a heavy one."""
    seen, reports = _stage_runs(tmp_path, monkeypatch, [("2x", {}), ("8x", {})])
    assert [len(samples) for samples in seen] == [24, 72]
    assert [report["training"]["block_stage"]["augment"] for report in reports] == ["none", "copies"]


def test_block_augment_auto_leaves_copies_out_where_memory_is_short(tmp_path, monkeypatch):
    """At 8x with (as monkeypatched) a kilobyte free, `auto` hands the stage its samples alone and
    says why; `copies` named still has them."""
    import fmcompress.backend.devices as devices

    monkeypatch.setattr(devices, "available_memory", lambda device=None: 1024)
    log: list[str] = []
    seen, reports = _stage_runs(tmp_path, monkeypatch, [("8x", {}), ("8x", {"block_augment": "copies"})], log)
    assert [len(samples) for samples in seen] == [24, 72]
    assert [report["training"]["block_stage"]["augment"] for report in reports] == ["none", "copies"]
    assert sum("no copies although the maps are compressed" in line and "0.0 GiB is free" in line
               for line in log) == 1
    # neither stage fits a kilobyte: both compiles warn, in the log and the report
    assert all(any("--max-samples N fits it" in warning for warning in report["warnings"]) for report in reports)


def test_a_flat_block_loss_stops_the_map_early():
    """Rule d: at a learning rate too small to move anything the loss is flat, so each map stops after
    its first epoch and `patience` more; min_gain 0 runs every epoch."""
    model = tiny_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 3)
    fits = {}

    def run(epochs, **kwargs):
        fit_blockwise(OnnxModule(model), TINY_MAPS, list(batches()), epochs=epochs, lr=1e-12, temperature=2.0,
                      progress=lambda i, name, fit: fits.update({name: fit}), **kwargs)
        return {name: (len(fit.losses), fit.stopped_early) for name, fit in fits.items()}

    assert run(10, min_gain=0.01, patience=2) == {"r1": (3, True), "r2": (3, True)}
    assert run(4, min_gain=0.0) == {"r1": (4, False), "r2": (4, False)}


def test_a_falling_block_loss_keeps_going():
    """Rule d: a map whose loss still falls by more than min_gain an epoch runs all its epochs."""
    model = tiny_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 4)
    fits = {}
    fit_blockwise(OnnxModule(model), TINY_MAPS, list(batches()), epochs=3, lr=3e-1, temperature=2.0,
                  min_gain=1e-4, patience=1, init="lstsq", progress=lambda i, name, fit: fits.update({name: fit}))
    assert all(len(fit.losses) == 3 and not fit.stopped_early for fit in fits.values()), fits


def test_each_maps_rate_warms_up_over_its_first_epoch_then_decays(monkeypatch):
    """Rule d (schedule.py's rule b): Adam's first steps from the closed-form start move every entry
    by the full rate whatever its gradient, so each map's rate rises over its first epoch's steps
    from about a third of its peak (three batches) and then only falls."""
    model = tiny_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 3)
    rates: list[float] = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    fit_blockwise(OnnxModule(model), TINY_MAPS, list(batches()), epochs=4, lr=1e-2, temperature=2.0, min_gain=0.0)
    assert len(rates) == 2 * 4 * 3  # two maps, four epochs of three batches
    for map_rates in (rates[:12], rates[12:]):
        peak = max(map_rates)
        assert map_rates.index(peak) == 2 and map_rates[0] < 0.4 * peak
        assert map_rates[0] < map_rates[1] < map_rates[2]
        assert all(a > b for a, b in zip(map_rates[2:-1], map_rates[3:], strict=True))


def test_a_held_out_judge_keeps_each_maps_best_held_out_epoch():
    """Rule d with held-out batches: their loss is taken at the start and after every epoch, and the
    map keeps the epoch where it was least."""
    model = tiny_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 3)
    held_out, _ = make_batches((8, 3, 8, 8), 2, seed=1)
    fits = {}
    fit_blockwise(OnnxModule(model), TINY_MAPS, list(batches()), epochs=5, lr=3e-1, temperature=2.0,
                  held_out=list(held_out()), progress=lambda i, name, fit: fits.update({name: fit}))
    for fit in fits.values():
        assert len(fit.held_out_losses) == len(fit.losses) + 1 == 6 and not fit.stopped_early
        assert fit.best_epoch == int(np.argmin(fit.held_out_losses))


def test_epochs_that_never_beat_the_start_on_held_out_batches_are_undone():
    """Rule d: at a rate that wrecks the projection, the held-out loss only rises, so the first map
    stops after `patience` epochs and keeps its start: the PCA of its map, as with no epochs."""
    model = tiny_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 3)
    held_out, _ = make_batches((8, 3, 8, 8), 2, seed=1)
    fits = {}
    wrecked = fit_blockwise(OnnxModule(model), TINY_MAPS, list(batches()), epochs=6, lr=1e3, temperature=2.0,
                            min_gain=0.01, patience=2, held_out=list(held_out()),
                            progress=lambda i, name, fit: fits.update({name: fit}))
    start = blockwise(model, TINY_MAPS, batches, epochs=0)
    assert fits["r1"].best_epoch == 0 and len(fits["r1"].losses) == 2 and fits["r1"].stopped_early
    np.testing.assert_allclose(wrecked["r1"].P, start["r1"].P, atol=1e-6)
    np.testing.assert_allclose(wrecked["r1"].U, start["r1"].U, atol=1e-6)


def test_compile_judges_the_block_stage_on_its_held_out_part(tmp_path, monkeypatch):
    """The fit pass hands the held-out part to the stage unless --block-judge calibration."""
    import onnx

    import fmcompress.backend.blockwise as module
    from fmcompress.compiler import CompileOptions, compile_model
    from fmcompress.train_config import TrainConfig

    seen = []
    real = module.fit_blockwise

    def recording(executor, maps, batches, **kwargs):
        seen.append(sum(len(batch[0]) for batch in kwargs["held_out"]))
        return real(executor, maps, batches, **kwargs)

    monkeypatch.setattr(module, "fit_blockwise", recording)
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    stages = []
    for judge in ("held-out", "calibration"):
        report = compile_model(str(path), CompileOptions(
            ceiling="4x", num_samples=32, batch_size=4, latency_rounds=1, latency_repeats=1,
            training=TrainConfig(epochs=1, block_epochs=2, batch_size=4, block_judge=judge)))
        stages.append(report.report["training"]["block_stage"])
    assert seen == [8, 0]  # a quarter of the 32 samples is held out
    judged, plain = stages
    assert judged["judge"] == "held-out" and plain["judge"] == "calibration" and judged["block_loss"] == "fisher"
    assert all(len(m["held_out_losses"]) == m["epochs"] + 1 for m in judged["maps"] if m["epochs"])
    assert all(m["held_out_losses"] == [] and m["best_epoch"] is None for m in plain["maps"])


def test_a_fisher_weighted_block_loss_counts_only_the_directions_it_weighs():
    """Rule c: at a map, the error and the target's power are both measured in the metric, so an
    identity metric gives the plain scaled squared error and one that drops a channel ignores
    every error in it."""
    from fmcompress.backend.blockwise import _block_loss, _BlockEnd
    from fmcompress.backend.losses import distillation_loss

    generator = torch.Generator().manual_seed(0)
    target = torch.randn(4, 3, 5, 5, generator=generator)
    value = target + 0.1 * torch.randn(4, 3, 5, 5, generator=generator)
    end = _BlockEnd(1, "m")
    plain = distillation_loss([value], [target], ["regression"], 2.0)
    identity = _block_loss(None, end, 2.0, torch.eye(3))([value], [target])
    torch.testing.assert_close(identity, plain)
    drop_first = torch.diag(torch.tensor([0.0, 1.0, 1.0]))
    off_in_first = value.clone()
    off_in_first[:, 0] += 5.0
    weighted = _block_loss(None, end, 2.0, drop_first)
    torch.testing.assert_close(weighted([off_in_first], [target]), weighted([value], [target]))
    assert float(_block_loss(None, end, 2.0, None)([off_in_first], [target])) > 10 * float(plain)


def test_the_quadratic_form_has_the_value_and_gradient_of_the_squared_root_mixing():
    """Rule c's metric: quadratic_form(M, x), one mixing forward and none backward, against autograd
    through |M^(1/2) x|^2, for a random symmetric positive definite M."""
    from fmcompress.backend.blockwise import quadratic_form
    from fmcompress.backend.fisher import metric_roots
    from fmcompress.backend.projection import mix_channels

    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    root = metric_roots(factor @ factor.T)[0]
    x = torch.randn(3, 6, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    expected = mix_channels(root, x).pow(2).sum()
    (expected_gradient,) = torch.autograd.grad(expected, x)
    value = quadratic_form(root @ root, x)
    (gradient,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(gradient, expected_gradient)


def test_lstsq_projection_is_reduced_rank_least_squares():
    """The closed form against numpy: with k = C it is lstsq's map; with k < C, the best rank-k map
    (lstsq's fitted values projected on their top-k directions), and with y = x it is PCA."""
    from fmcompress.backend.blockwise import lstsq_projection
    from fmcompress.backend.projection import pca_projection

    rng = np.random.default_rng(0)
    channels, n, k = 12, 2000, 4
    x = rng.standard_normal((channels, n)) * rng.uniform(0.2, 3, (channels, 1))
    y = rng.standard_normal((channels, channels)) @ x + 0.1 * rng.standard_normal((channels, n))
    xx, yx = torch.from_numpy(x @ x.T), torch.from_numpy(y @ x.T)
    full = lstsq_projection(xx, yx, channels, ridge=0.0)
    B = np.linalg.lstsq(x.T, y.T, rcond=None)[0].T  # noqa: N806
    np.testing.assert_allclose(full.U.astype(np.float64) @ full.P, B, rtol=1e-3, atol=1e-4)
    low = lstsq_projection(xx, yx, k, ridge=0.0)
    fitted = B @ x
    top = np.linalg.svd(fitted, full_matrices=False)[0][:, :k]
    np.testing.assert_allclose(low.U.astype(np.float64) @ low.P, top @ top.T @ B, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.abs(low.U.T.astype(np.float64) @ top), np.eye(k), atol=1e-4)
    same = lstsq_projection(xx, xx, k)
    pca = pca_projection(xx / n, k)
    np.testing.assert_allclose(same.P, pca.P, atol=1e-4)
    np.testing.assert_allclose(same.U, pca.U, atol=1e-4)


def test_lstsq_projection_with_a_ridge_is_least_squares_on_noisy_inputs():
    """Rule a's damping (`ridge`, ROUNDED_RIDGE under --int8): a ridge of sigma^2 relative to the mean eigenvalue gives the
    least-squares map of an x that arrives with noise of that variance (numpy's lstsq on noisy
    samples), and caps the gain the plain regression puts on x's weakest direction."""
    from fmcompress.backend.blockwise import lstsq_projection

    rng = np.random.default_rng(1)
    channels, n, sigma = 6, 400_000, 0.05
    x = rng.standard_normal((channels, n)) * np.array([[2.0], [1.0], [1.0], [0.5], [0.3], [0.02]])
    y = rng.standard_normal((channels, channels)) @ x + 0.05 * rng.standard_normal((channels, n))
    noisy = x + sigma * rng.standard_normal(x.shape)
    xx, yx = torch.from_numpy(x @ x.T), torch.from_numpy(y @ x.T)
    damped = lstsq_projection(xx, yx, channels, ridge=n * sigma**2 / (np.trace(x @ x.T) / channels))
    B = np.linalg.lstsq(noisy.T, y.T, rcond=None)[0].T  # noqa: N806
    np.testing.assert_allclose(damped.U.astype(np.float64) @ damped.P, B, atol=2e-2)
    plain = lstsq_projection(xx, yx, channels)
    weakest = np.abs(plain.U.astype(np.float64) @ plain.P)[:, -1].max()
    assert np.abs(damped.U.astype(np.float64) @ damped.P)[:, -1].max() < weakest / 3


def test_lstsq_start_reproduces_the_outputs_at_least_as_well_as_pca():
    model = tiny_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 4)
    pca = fit_pca(OnnxModule(model), TINY_MAPS, batches)
    start = fit_blockwise(OnnxModule(model), TINY_MAPS, list(batches()), epochs=0, lr=1e-1, temperature=2.0,
                          init="lstsq")
    np.testing.assert_allclose(start["r1"].P, pca["r1"].P, atol=1e-4)  # the first map: nothing before it
    assert output_error(model, start, batches) <= output_error(model, pca, batches) * 1.001


def test_learned_is_never_worse_than_pca(tmp_path, monkeypatch):
    """The fit pass's rule f: a block stage that returns useless projections (zeros) and training
    that cannot move (lr ~ 0) leave the PCA projections that `--method pca` fits."""
    import onnx

    import fmcompress.backend.blockwise as module
    from fmcompress.compiler import CompileOptions, compile_model
    from fmcompress.train_config import TrainConfig

    def useless(executor, maps, batches, **kwargs):
        return {name: Projection(P=np.zeros((k, c), np.float32), U=np.zeros((c, k), np.float32))
                for name, c, k in maps}

    monkeypatch.setattr(module, "fit_blockwise", useless)
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))

    def run(method):
        return compile_model(str(path), CompileOptions(
            ceiling="4x", method=method, num_samples=32, batch_size=8, latency_rounds=1, latency_repeats=1,
            training=TrainConfig(epochs=1, lr=1e-12, block_epochs=1, batch_size=8, augment="none")))

    learned, pca = run("learned"), run("pca")
    assert learned.report["training"]["best_epoch"] == 0
    assert learned.report["training"]["best_score"] > learned.report["training"]["initial_score"]
    for name, projection in pca.projections.items():
        np.testing.assert_allclose(learned.projections[name].P, projection.P, atol=1e-6)


def test_no_end_to_end_epochs_keep_the_block_stage(tmp_path, monkeypatch):
    """`--epochs 0`: nothing trains end to end; the block stage's projections are kept (or PCA's,
    rule f, where they score better on the held-out part)."""
    import onnx

    import fmcompress.backend.blockwise as module
    import fmcompress.backend.projection as projection_module
    from fmcompress.compiler import CompileOptions, compile_model
    from fmcompress.train_config import TrainConfig

    staged, pca = {}, {}

    def recording(fit, into):
        def wrapper(*args, **kwargs):
            into.update(fit(*args, **kwargs))
            return dict(into)
        return wrapper

    monkeypatch.setattr(module, "fit_blockwise", recording(module.fit_blockwise, staged))
    monkeypatch.setattr(projection_module, "fit_pca", recording(projection_module.fit_pca, pca))
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    result = compile_model(str(path), CompileOptions(
        ceiling="4x", num_samples=32, batch_size=8, latency_rounds=1, latency_repeats=1,
        training=TrainConfig(epochs=0, block_epochs=2, batch_size=8)))
    training = result.report["training"]
    assert training["history"] == [] and training["best_epoch"] == 0 and staged and pca
    assert training["best_score"] >= training["initial_score"]
    kept = [name for name in staged if np.array_equal(result.projections[name].P, staged[name].P)]
    assert len(kept) == len(staged) or all(np.array_equal(result.projections[name].P, pca[name].P) for name in pca)


def test_block_ridge_follows_the_stored_bytes_unless_named():
    """The fit pass damps the lstsq start for maps stored in one byte (--int8, --act-bytes 1);
    --block-ridge overrides; a negative one is a one-line input error."""
    from fmcompress.backend.blockwise import PLAIN_RIDGE, ROUNDED_RIDGE
    from fmcompress.errors import InputError
    from fmcompress.passes.fit import block_ridge
    from fmcompress.train_config import TrainConfig

    assert block_ridge(None, 1) == ROUNDED_RIDGE > PLAIN_RIDGE == block_ridge(None, None) == block_ridge(None, 4)
    assert block_ridge(0.0, 1) == 0.0 and block_ridge(0.5, None) == 0.5
    with pytest.raises(InputError, match="--block-ridge"):
        TrainConfig(block_ridge=-1.0).check()


@pytest.mark.parametrize("int8", [False, True])
def test_block_init_is_fisher_unless_it_is_named(int8):
    """The fit pass starts from the Fisher-weighted regression, with --int8 too; --block-init
    overrides; an unknown one is an input error. The report names the start a compile used."""
    from fmcompress import api
    from fmcompress.errors import InputError
    from fmcompress.train_config import TrainConfig

    with pytest.raises(InputError, match="--block-init"):
        TrainConfig(block_init="svd").check()
    common = {"ceiling": "4x", "num_samples": 32, "latency_rounds": 1, "latency_repeats": 1, "measure_memory": False,
              "int8": int8}
    for named, used in ((None, "fisher"), ("lstsq", "lstsq")):
        training = TrainConfig(epochs=0, block_epochs=1, **({"block_init": named} if named else {}))
        result = api.compile(tiny_classifier(), training=training, **common)
        assert result.report["training"]["block_stage"]["init"] == used


def test_bfloat16_blocks_fit_as_float32_ones_do():
    """Rule d: with `precision` bfloat16 the block's steps round to bfloat16 (the projections differ
    from float32's) and the stage still reproduces the outputs about as well."""
    model = tiny_classifier()
    batches, _ = make_batches((16, 3, 8, 8), 4)
    fitted = {precision: fit_blockwise(OnnxModule(model), TINY_MAPS, list(batches()), epochs=8, lr=1e-1,
                                       temperature=2.0, precision=precision)
              for precision in ("float32", "bfloat16")}
    assert any(not np.allclose(fitted["float32"][name].P, fitted["bfloat16"][name].P, atol=1e-4)
               for name, _, _ in TINY_MAPS)
    errors = {precision: output_error(model, projections, batches) for precision, projections in fitted.items()}
    assert errors["bfloat16"] < 1.25 * errors["float32"], errors


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it(monkeypatch, native, expected):
    """devices.py rule c: emulated bfloat16 is slower than float32, so auto takes it only where native;
    a precision named is taken as it is."""
    from fmcompress.backend.devices import resolve_precision

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("float32", cpu) == "float32" and resolve_precision("bfloat16", cpu) == "bfloat16"


def test_the_report_names_the_block_stage_precision(tmp_path):
    import json

    import onnx
    from click.testing import CliRunner

    from fmcompress.cli import main

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    result = CliRunner().invoke(main, ["compile", str(path), "--ceiling", "4x", "--num-samples", "16",
                                       "--batch-size", "4", "--epochs", "0", "--block-epochs", "1",
                                       "--block-precision", "bfloat16", "--json", str(tmp_path / "r.json"),
                                       "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["training"]["block_stage"]["precision"] == "bfloat16"
    bad = CliRunner().invoke(main, ["compile", str(path), "--ceiling", "4x", "--block-precision", "half",
                                    "-o", str(tmp_path / "bad.onnx")])
    assert bad.exit_code == 2 and not (tmp_path / "bad.onnx").exists()
