"""Learned projections: loss per output kind, schedules, checkpoints and resume, two-process DDP, flags."""

from __future__ import annotations

import os
import socket
from collections import Counter
from itertools import groupby

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from modeltools import sequence_head, tiny_classifier

from fmcompress.backend import OnnxModule
from fmcompress.backend.losses import distillation_loss, output_kinds
from fmcompress.backend.schedule import plan_epochs
from fmcompress.backend.trainer import ProjectionTrainer, random_projections
from fmcompress.cli import main
from fmcompress.errors import InputError
from fmcompress.ortrun import ort_session
from fmcompress.train_config import TrainConfig

MAPS = [("r1", 16, 4), ("r2", 16, 4)]


def data(count: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)}


def train(config: TrainConfig, **kwargs):
    trainer = ProjectionTrainer(OnnxModule(tiny_classifier()), [m[0] for m in MAPS], random_projections(MAPS, 1),
                                config, **kwargs)
    return trainer.fit(data(24, 0), None, data(8, 1), None)


# ------------------------------------------------------------------------ output kinds


def test_loss_kind_follows_the_output():
    logits = torch.randn(4, 10)
    probs = torch.softmax(torch.randn(4, 10), -1)
    sequence = torch.softmax(torch.randn(4, 40, 97), -1)
    detection = torch.rand(4, 84, 100) * 300  # YOLO-style [N, 4 + classes, anchors]: not distributions
    feature = torch.randn(4, 8, 5, 5)
    assert output_kinds([logits, probs, sequence, detection, feature]) == \
        ["logits", "probs", "seq_probs", "regression", "regression"]


def test_distillation_loss_is_zero_on_agreement_and_grows_with_disagreement():
    for teacher in (torch.randn(6, 10), torch.softmax(torch.randn(6, 30, 12), -1), torch.rand(6, 84, 20)):
        kinds = output_kinds([teacher])
        same = distillation_loss([teacher], [teacher], kinds, temperature=2.0)
        assert float(same) == pytest.approx(0.0, abs=1e-6)
        near = distillation_loss([0.9 * teacher + 0.1 * teacher.mean(-1, keepdim=True)], [teacher], kinds, 2.0)
        far = distillation_loss([teacher.flip(0)], [teacher], kinds, 2.0)
        assert 0 < float(near) < float(far)


def test_regression_loss_is_scale_free():
    teacher = torch.rand(4, 84, 50)
    kinds = output_kinds([teacher])
    small = distillation_loss([teacher * 1.1], [teacher], kinds, 1.0)
    large = distillation_loss([teacher * 1000 * 1.1], [teacher * 1000], kinds, 1.0)
    assert float(small) == pytest.approx(float(large), rel=1e-4)


@pytest.mark.parametrize("reference", ["teacher", "self"])
def test_feature_distillation_compares_with_its_reference(reference):
    """Rule c: `teacher` measures the student's projected map against the map the teacher's
    (bypassed, gradient-free) pass saw at the same place; `self` against the student's own input."""
    from fmcompress.backend.trainer import LearnedProjection

    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((8, 3)))
    module = LearnedProjection(q.T.astype(np.float32), q.astype(np.float32), reference)
    teacher_map, student_map = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    module.bypass = True
    with torch.no_grad():
        assert module(teacher_map) is teacher_map
    module.bypass = False
    out = module(student_map)
    expected = teacher_map if reference == "teacher" else student_map
    error = (out - expected).pow(2).sum() / expected.pow(2).sum()
    assert float(module.reconstruction.detach()) == pytest.approx(float(error.detach()), rel=1e-5)
    module.reconstruction.backward()
    assert module.P.grad is not None and module.P.grad.abs().sum() > 0


# ------------------------------------------------------------------------- schedules


def test_greedy_schedule_adds_one_map_a_stage():
    config = TrainConfig(schedule="greedy", stage_epochs=2, epochs=3)
    assert plan_epochs(3, config) == [("greedy 1/3", 1)] * 2 + [("greedy 2/3", 2)] * 2 + \
        [("greedy 3/3", 3)] * 2 + [("joint", 3)] * 3
    result = train(TrainConfig(schedule="greedy", epochs=1, batch_size=8, augment="none"))
    assert [r.active_maps for r in result.history] == [1, 2, 2]
    assert all(r.seconds > 0 for r in result.history)  # each epoch's wall time, for reports and benchmarks
    # the initialisation or an epoch with every map active
    assert result.best_epoch == 0 or result.history[result.best_epoch - 1].active_maps == 2


def test_training_improves_on_random_projections():
    result = train(TrainConfig(epochs=8, lr=1e-2, batch_size=8, patience=0, probe=0))
    losses = [r.loss for r in result.history]
    assert losses[-1] < losses[0] * 0.7
    assert result.best_score >= result.history[0].score


def test_the_initialisation_is_kept_when_training_only_hurts():
    """An absurd learning rate: the held-out figures must not fall below the start's."""
    result = train(TrainConfig(epochs=3, lr=50.0, batch_size=8, augment="none"))
    assert result.best_score >= result.initial_score
    assert result.best_epoch == 0 or result.history[result.best_epoch - 1].score == result.best_score


def test_a_diverged_epoch_backtracks_to_the_best_at_a_lower_rate():
    trainer = ProjectionTrainer(OnnxModule(tiny_classifier()), [m[0] for m in MAPS], random_projections(MAPS, 1),
                                TrainConfig(epochs=1))
    best = trainer._snapshot()
    optimizer = torch.optim.Adam([{"params": list(m.parameters()), "lr": 0.1} for m in trainer.projections.values()])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with torch.no_grad():
        for module in trainer.projections.values():
            module.P.add_(1.0)
    trainer._backtrack(optimizer, scheduler, best)
    for name, module in trainer.projections.items():
        np.testing.assert_array_equal(module.P.detach().numpy(), best[name].P)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.03, 0.03])
    assert scheduler.base_lrs == pytest.approx([0.03, 0.03])


def test_an_epoch_that_leaves_nan_projections_is_never_kept(monkeypatch):
    """Rule f': a non-finite held-out loss is a divergence, whatever the score says."""
    from fmcompress.backend import trainer as train_module

    def poisoned_epoch(self, *args, **kwargs):
        with torch.no_grad():
            for module in self.projections.values():
                module.P.fill_(float("nan"))
        return float("nan")

    backtracks = []
    original_backtrack = train_module.ProjectionTrainer._backtrack
    monkeypatch.setattr(train_module.ProjectionTrainer, "_train_epoch", poisoned_epoch)
    monkeypatch.setattr(train_module.ProjectionTrainer, "_backtrack",
                        lambda self, *a: backtracks.append(1) or original_backtrack(self, *a))
    result = train(TrainConfig(epochs=2, batch_size=8, augment="none", probe=0))  # no probe: both epochs run
    assert result.best_epoch == 0 and len(backtracks) == 2
    assert all(np.isfinite(p.P).all() for p in result.projections.values())


def test_a_transient_rise_is_not_a_divergence():
    from fmcompress.backend.schedule import DIVERGED, diverged

    assert not diverged(4.0, 1.0)  # what leaving the block stage's optimum costs for an epoch or two
    assert diverged(DIVERGED * 1.01, 1.0) and diverged(float("nan"), 1.0) and diverged(float("inf"), 1.0)


def test_splice_takes_a_span_of_columns_from_another_sample_reproducibly():
    from fmcompress.backend.augment import augment_batch

    batch = torch.stack([torch.full((3, 16, 40), float(i + 1)) for i in range(6)])  # sample i holds i + 1
    seeds = [11, 12, 13, 14, 15, 16]
    once, again = augment_batch(batch, "splice", seeds), augment_batch(batch, "splice", seeds)
    torch.testing.assert_close(once, again)  # the seeds decide everything (resume repeats it)
    spliced = 0
    for i in range(len(batch)):
        # per column the value most rows hold (shifts zero-fill at most 2 rows; noise is 2%)
        column = torch.round(once[i]).median(dim=0).values.median(dim=0).values
        partners = {int(v) for v in column.unique()} - {i + 1, 0}
        if partners:
            spliced += 1
            assert len(partners) == 1
            assert 8 - 2 <= int(torch.isin(column, torch.tensor(sorted(partners), dtype=column.dtype)).sum()) <= 20
    assert spliced >= 1
    assert torch.equal(augment_batch(batch, "none", seeds), batch)
    result = train(TrainConfig(epochs=1, batch_size=8, augment="splice"))
    assert result.history


def test_strong_augmentation_stretches_and_changes_contrast_reproducibly():
    from fmcompress.backend.augment import photometric, stretch

    ramp = torch.linspace(0, 1, 40).expand(3, 16, 40).contiguous()  # one image: brightness rises with x
    stretched = [stretch(ramp, torch.Generator().manual_seed(seed)) for seed in range(8)]
    assert all(out.shape == ramp.shape for out in stretched)
    # narrower (zero padding on the right) or wider (the ramp cut, so it rises faster) than the original
    assert any(out[0, 0, -1] == 0 for out in stretched) and any(out[0, 0, 20] > ramp[0, 0, 20] + 0.05
                                                                for out in stretched)
    changed = photometric(ramp, torch.Generator().manual_seed(3))
    ratio = (changed.std() / ramp.std()).item()
    assert 0.7 - 1e-4 <= ratio <= 1.3 + 1e-4 and abs(ratio - 1) > 1e-3
    batch = torch.rand(4, 3, 16, 40)
    torch.testing.assert_close(_augment_batch(batch, "strong"), _augment_batch(batch, "strong"))
    result = train(TrainConfig(epochs=1, batch_size=8, augment="strong"))
    assert result.history


def test_other_looks_keep_the_range_and_change_half_the_samples_reproducibly():
    from fmcompress.backend.augment import look_variants, new_look

    text = torch.ones(3, 16, 40)
    text[:, 6:10, 8:30] = -1.0  # dark strokes on a light line, in the model's [-1, 1]
    batch = text.expand(64, 3, 16, 40).contiguous()
    seeds = list(range(100, 164))
    once, again = look_variants(batch, seeds), look_variants(batch, seeds)
    torch.testing.assert_close(once, again)
    changed = [i for i in range(len(batch)) if not torch.equal(once[i], batch[i])]
    assert 20 <= len(changed) <= 44  # about half
    assert once.min() >= -1.0 and once.max() <= 1.0
    inverted = [new_look(text, torch.Generator().manual_seed(s)) for s in range(40)]
    # some draws invert the polarity: the strokes end up lighter than the paper
    assert any(out[:, 6:10, 8:30].mean() > out[:, :4].mean() for out in inverted)
    assert torch.equal(look_variants(batch, seeds, share=0.0), batch)
    codes = torch.arange(12).reshape(1, 12)
    assert torch.equal(look_variants(codes, [0]), codes)  # integer inputs are left alone


def _augment_batch(batch: torch.Tensor, kind: str) -> torch.Tensor:
    from fmcompress.backend.augment import augment_batch

    return augment_batch(batch, kind, list(range(len(batch))))


def test_target_stops_early():
    result = train(TrainConfig(epochs=20, lr=1e-2, batch_size=8, target=1e-3))
    assert result.stopped_early and len(result.history) == 1


def scripted(monkeypatch, figures):
    """The trainer's held-out (score, loss) follow `figures`: the initialisation's first, then one per epoch."""
    calls = iter(figures)
    monkeypatch.setattr(ProjectionTrainer, "_score", lambda self, *args: next(calls))


def test_patience_stops_after_that_many_epochs_without_a_better_score(monkeypatch):
    """Rule h: a tie on the score is no gain (even at a lower loss); a gain restarts the count."""
    scripted(monkeypatch, [(0.5, 1.0), (0.4, 2.0), (0.6, 1.0), (0.6, 0.5), (0.55, 1.0), (0.9, 1.0)])
    result = train(TrainConfig(epochs=10, batch_size=8, patience=2, probe=0))
    assert result.stop_reason == "patience" and not result.stopped_early
    assert [r.score for r in result.history] == [0.4, 0.6, 0.6, 0.55]
    assert result.best_epoch == 3 and result.best_score == 0.6  # the tie at the lower loss is still kept


def test_the_probe_keeps_the_start_when_the_first_epoch_does_not_pay(monkeypatch):
    """Rule h: after the probe epoch, no better score and a held-out loss more than PROBE_LOSS_RATIO
    times the start's: the start is kept. A rise below that ratio goes on (patience decides)."""
    from fmcompress.backend.schedule import PROBE_LOSS_RATIO

    scripted(monkeypatch, [(0.8, 0.2), (0.7, 0.2 * PROBE_LOSS_RATIO * 1.5)])
    result = train(TrainConfig(epochs=10, batch_size=8, probe=1, patience=3))
    assert result.stop_reason == "probe" and len(result.history) == 1 and result.best_epoch == 0
    scripted(monkeypatch, [(0.8, 0.2), (0.7, 0.2 * PROBE_LOSS_RATIO * 0.5), (0.7, 0.5), (0.7, 0.5), (0.9, 0.1)])
    result = train(TrainConfig(epochs=10, batch_size=8, probe=1, patience=2))
    assert result.stop_reason == "patience" and len(result.history) == 3  # the probe's epoch not counted


def test_the_probe_stops_at_the_first_epoch_that_scores_far_below_the_start(monkeypatch):
    """Rule h: a probe epoch that leaves the probe's best more than PROBE_SCORE_SHORTFALL below the
    start's score (PP-OCR's recognizer: 0.45 against 0.68) stops training there, even where the
    held-out loss stays under the ratio; epochs within it (its classifier: 0.86 against 0.88) go on,
    and a later one can pay."""
    from fmcompress.backend.schedule import PROBE_SCORE_SHORTFALL

    low = 0.8 * (1 - PROBE_SCORE_SHORTFALL) - 0.05
    scripted(monkeypatch, [(0.8, 0.5), (low, 1.0), (0.9, 0.1)])
    result = train(TrainConfig(epochs=10, batch_size=8, probe=3, patience=3))
    assert result.stop_reason == "probe" and len(result.history) == 1 and result.best_epoch == 0
    near = 0.8 * (1 - PROBE_SCORE_SHORTFALL) + 0.05
    scripted(monkeypatch, [(0.8, 0.5), (near, 1.4), (near - 0.02, 1.2), (near, 1.3), (0.9, 0.1),
                           *[(0.85, 0.2)] * 3])
    result = train(TrainConfig(epochs=10, batch_size=8, probe=3, patience=3))
    assert result.stop_reason == "patience" and len(result.history) == 7 and result.best_epoch == 4
    # the probe's best so far counts, not its last epoch
    scripted(monkeypatch, [(0.8, 0.5), (near, 1.4), (low, 1.2), (0.9, 0.1), *[(0.85, 0.2)] * 3])
    result = train(TrainConfig(epochs=10, batch_size=8, probe=3, patience=3))
    assert result.stop_reason == "patience" and len(result.history) == 6 and result.best_epoch == 3


def test_the_probe_stops_after_the_first_steps_that_score_far_below_the_start(monkeypatch):
    """Rule h's `probe_steps`: the held-out part is scored after the first epoch's first steps, and
    a score more than PROBE_SCORE_SHORTFALL below the start's stops training there (PP-OCR's
    recognizer after four steps: 0.54 against 0.77), nothing of it kept; within it (its
    classifier: 0.945 against 0.953) the epoch goes on."""
    from fmcompress.backend.schedule import PROBE_SCORE_SHORTFALL

    def run(config):
        steps = []
        trainer = ProjectionTrainer(OnnxModule(tiny_classifier()), [m[0] for m in MAPS],
                                    random_projections(MAPS, 1), config,
                                    monitor=lambda event, fields: steps.append(event) if event == "step" else None)
        return trainer.fit(data(64, 0), None, data(8, 1), None), len(steps)

    low = 0.8 * (1 - PROBE_SCORE_SHORTFALL) - 0.05
    scripted(monkeypatch, [(0.8, 0.5), (low, 1.0)])
    result, steps = run(TrainConfig(epochs=10, batch_size=8, probe=3, probe_steps=4))
    assert result.stop_reason == "probe" and result.stopped_at_step == 4 and steps == 4
    assert result.history == [] and result.best_epoch == 0
    start = random_projections(MAPS, 1)
    for name, projection in result.projections.items():
        np.testing.assert_array_equal(projection.P, start[name].P)
    near = 0.8 * (1 - PROBE_SCORE_SHORTFALL) + 0.05
    scripted(monkeypatch, [(0.8, 0.5), (near, 1.0), (0.9, 0.1), *[(0.85, 0.2)] * 4])
    result, steps = run(TrainConfig(epochs=10, batch_size=8, probe=1, patience=4, probe_steps=4))
    assert result.stopped_at_step is None and result.best_epoch == 1 and steps == 8 * len(result.history)
    for config in (TrainConfig(epochs=10, batch_size=8, probe=1, patience=4, probe_steps=0),
                   TrainConfig(epochs=10, batch_size=8, probe=0, patience=4, probe_steps=4)):
        scripted(monkeypatch, [(0.8, 0.5), (0.9, 0.1), *[(0.85, 0.2)] * 4])  # no check: probe_steps or probe 0
        result, _ = run(config)
        assert result.stopped_at_step is None and result.best_epoch == 1


def test_patience_counts_after_the_probes_epochs(monkeypatch):
    """Rule h: leaving the block stage, the first epochs may score below it and raise the held-out
    loss (PP-OCR's classifier: three epochs) before one beats it; patience waits for the probe."""
    start, rising = (0.8, 0.2), [(0.7, 1.4), (0.7, 1.0), (0.75, 0.6)]
    scripted(monkeypatch, [start, *rising, (0.9, 0.1), (0.85, 0.2), (0.85, 0.2), (0.85, 0.2)])
    result = train(TrainConfig(epochs=10, batch_size=8, probe=3, patience=3))
    assert result.stop_reason == "patience" and len(result.history) == 7 and result.best_epoch == 4
    scripted(monkeypatch, [start, *rising])
    result = train(TrainConfig(epochs=10, batch_size=8, probe=0, patience=3))  # counted from the start
    assert result.stop_reason == "patience" and len(result.history) == 3 and result.best_epoch == 0


def test_the_default_patience_reaches_the_classifiers_seventh_epoch(monkeypatch):
    """The default patience (4) after the default probe (3): PP-OCR's classifier at 8x (seed 1,
    its held-out scores and losses as recorded) ties its start at the sixth epoch and scores above
    it at the seventh, which a patience of 3 never ran. Rule e keeps the start all the same: the
    seventh agrees on one more held-out sample at a higher held-out loss (0.11 against 0.10)."""
    recorded = [(0.984, 0.10), (0.961, 0.36), (0.961, 0.38), (0.977, 0.25), (0.977, 0.20), (0.922, 0.35),
                (0.984, 0.13), (0.992, 0.11), (0.992, 0.12), (0.984, 0.12), (0.984, 0.12)]
    scripted(monkeypatch, recorded)
    result = train(TrainConfig(epochs=10, batch_size=8))
    assert result.best_epoch == 0 and result.stop_reason == "epochs" and len(result.history) == 10
    recorded[7] = (0.992, 0.09)  # the same score at a lower loss is kept
    scripted(monkeypatch, recorded)
    assert train(TrainConfig(epochs=10, batch_size=8)).best_epoch == 7
    scripted(monkeypatch, recorded)
    result = train(TrainConfig(epochs=10, batch_size=8, patience=3))
    assert result.best_epoch == 0 and result.stop_reason == "patience" and len(result.history) == 6


def test_no_patience_runs_every_epoch(monkeypatch):
    scripted(monkeypatch, [(0.5, 1.0)] + [(0.4, 1.0)] * 4)
    result = train(TrainConfig(epochs=4, batch_size=8, patience=0, probe=0))
    assert result.stop_reason == "epochs" and len(result.history) == 4 and result.best_epoch == 0


def test_a_better_fallback_is_kept_when_training_never_beats_it():
    """Rule e (the fit pass's rule f): PCA is the fallback of a block-stage start; a start that scores
    worse than it, and epochs that cannot move (lr ~ 0), leave PCA's projections."""
    from fmcompress.backend.projection import fit_pca

    model = tiny_classifier()
    batches = [(torch.from_numpy(data(24, 0)["x"][i:i + 8]),) for i in range(0, 24, 8)]
    pca = fit_pca(OnnxModule(model), MAPS, lambda: batches)
    bad = {name: type(p)(P=p.P * 0, U=p.U * 0) for name, p in pca.items()}
    trainer = ProjectionTrainer(OnnxModule(model), [m[0] for m in MAPS], bad,
                                TrainConfig(epochs=1, lr=1e-12, batch_size=8, augment="none"), fallback=pca)
    result = trainer.fit(data(24, 0), None, data(8, 1), None)
    assert result.best_epoch == 0 and result.best_score > result.initial_score
    for name in pca:
        np.testing.assert_array_equal(result.projections[name].P, pca[name].P)


# ------------------------------------------------------------------ checkpoints, resume


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    config = TrainConfig(epochs=4, lr=5e-3, batch_size=8, patience=0, probe=0)
    whole = train(config)

    def stop_at_third(event: str, fields: dict) -> None:
        if event == "epoch_start" and fields["epoch"] == 3:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(config, checkpoint=checkpoint, monitor=stop_at_third)
    assert checkpoint.exists()
    resumed = train(config, checkpoint=checkpoint, resume=True)
    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4]
    for name, _, _ in MAPS:
        np.testing.assert_allclose(resumed.projections[name].P, whole.projections[name].P, atol=1e-6)
        np.testing.assert_allclose(resumed.projections[name].U, whole.projections[name].U, atol=1e-6)


def test_resume_refuses_a_foreign_or_missing_checkpoint(tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    train(TrainConfig(epochs=1, batch_size=8), checkpoint=checkpoint)
    with pytest.raises(InputError, match="other maps, ranks or training settings"):
        train(TrainConfig(epochs=1, batch_size=8, lr=0.5), checkpoint=checkpoint, resume=True)
    with pytest.raises(InputError, match="no checkpoint"):
        train(TrainConfig(epochs=1), checkpoint=tmp_path / "none.ckpt", resume=True)
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        train(TrainConfig(epochs=1), checkpoint=tmp_path / "junk.ckpt", resume=True)


# -------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    result = train(TrainConfig(epochs=3, lr=5e-3, batch_size=8, device="cpu"))
    if rank == 0:
        torch.save({n: (p.P, p.U) for n, p in result.projections.items()}, out)
    import torch.distributed as dist

    dist.barrier()  # both ranks done before the group goes: gloo aborts a process torn down mid-call
    dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    single = train(TrainConfig(epochs=3, lr=5e-3, batch_size=8, device="cpu"))
    out = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=False)
    for name, (P, U) in distributed.items():  # noqa: N806
        np.testing.assert_allclose(P, single.projections[name].P, atol=1e-4)
        np.testing.assert_allclose(U, single.projections[name].U, atol=1e-4)


# ------------------------------------------------------------------------------ flags


@pytest.mark.parametrize(("flags", "expected"), [
    (["--epochs", "-1"], "--epochs"), (["--lr", "-1"], "--lr"), (["--device", "tpu"], "--device"),
    (["--loss", "magic"], "--loss"), (["--schedule", "random"], "--schedule"),
    (["--feature-reference", "student"], "--feature-reference"), (["--patience", "-1"], "--patience"),
    (["--block-init", "svd"], "--block-init"), (["--block-min-gain", "1"], "--block-min-gain"),
    (["--block-augment", "wild"], "--block-augment")])
def test_bad_training_flags_are_one_line_usage_errors(tmp_path, flags, expected):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    result = CliRunner().invoke(main, ["compile", str(path), "--ceiling", "4x", *flags])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    result = CliRunner().invoke(main, ["compile", str(path), "--ceiling", "4x", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_ctrl_c_keeps_the_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    import fmcompress.backend.trainer as train_module

    path, out, checkpoint = tmp_path / "tiny.onnx", tmp_path / "tiny.fmc.onnx", tmp_path / "run.ckpt"
    onnx.save(tiny_classifier(), str(path))
    save = train_module.ProjectionTrainer._save

    def save_then_interrupt(self, epoch, *args):
        save(self, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt

    args = ["compile", str(path), "--ceiling", "1KB", "-o", str(out), "--checkpoint", str(checkpoint),
            "--epochs", "2", "--num-samples", "16", "-q"]
    monkeypatch.setattr(train_module.ProjectionTrainer, "_save", save_then_interrupt)
    stopped = CliRunner().invoke(main, args)
    assert stopped.exit_code == 130 and "--resume" in stopped.output
    assert checkpoint.exists() and not out.exists()
    monkeypatch.setattr(train_module.ProjectionTrainer, "_save", save)
    resumed = CliRunner().invoke(main, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert out.exists() and not checkpoint.exists()


def test_fake_quant_rounds_as_onnxruntime_quantizes_an_activation():
    """compile --int8's training rounding: the scale and zero point onnxruntime's own
    quantize_static computes from a MinMax range, and its uint8 rounding."""
    from onnxruntime.quantization import quant_utils

    from fmcompress.backend.projection import fake_quant_uint8

    x = torch.randn(2, 5, 7, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    zero_point, scale = quant_utils.compute_scale_zp(np.float32(min(0.0, x.min())), np.float32(max(0.0, x.max())),
                                                     np.uint8(0), np.uint8(255))
    stored = quant_utils.quantize_nparray(onnx.TensorProto.UINT8, x.numpy(), scale, zero_point)
    expected = (stored.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
    np.testing.assert_allclose(fake_quant_uint8(x).numpy(), expected, atol=1e-5)
    assert not np.allclose(fake_quant_uint8(x).numpy(), x.numpy(), atol=1e-3)  # it does round


def test_fake_quant_passes_gradients_straight_through():
    from fmcompress.backend.projection import ChannelProjection

    eye = np.eye(4, dtype=np.float32)
    projection = ChannelProjection(eye, eye, quantized=True)
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    projection(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))  # inside the range the rounding's gradient is 1
    assert projection.P.grad is not None and projection.P.grad.abs().sum() > 0


def test_a_sequence_head_is_scored_by_its_decodings():
    """Rule e: a CTC-shaped output scores the share of equal greedy decodings with the teacher,
    checked against the decodings of onnxruntime's outputs, not the share of equal steps."""
    model = sequence_head()
    held_out = data(32, 3)
    trainer = ProjectionTrainer(OnnxModule(model), [m[0] for m in MAPS], random_projections(MAPS, 2),
                                TrainConfig(epochs=0, batch_size=8))
    result = trainer.fit(data(8, 0), None, held_out, None)
    teacher = ort_session(model).run(None, held_out)[0]
    with torch.no_grad():
        student = trainer.executor(torch.from_numpy(held_out["x"]))[0].numpy()
    blank = Counter(teacher.argmax(-1).ravel().tolist()).most_common(1)[0][0]

    def decode(path: np.ndarray) -> list[int]:  # repeats merged, then blanks dropped
        return [label for label, _ in groupby(path.tolist()) if label != blank]

    same = [decode(t) == decode(s) for t, s in zip(teacher.argmax(-1), student.argmax(-1), strict=True)]
    per_step = float((teacher.argmax(-1) == student.argmax(-1)).mean())
    assert result.metric == "sequence"
    assert result.initial_score == pytest.approx(np.mean(same), abs=1e-6)
    assert abs(result.initial_score - per_step) > 0.05


def test_the_log_says_how_far_the_probe_ran():
    """The fit pass's log line: an epoch count, or the first epoch's steps when those stopped it."""
    from fmcompress.backend.trainer import TrainResult
    from fmcompress.passes.fit import probe_length

    assert probe_length(TrainResult(projections={}, stop_reason="probe", stopped_at_step=4)) == \
        "the first 4 step(s) of the first epoch"
    assert probe_length(TrainResult(projections={}, stop_reason="probe")) == "0 probe epoch(s)"


@pytest.mark.parametrize(("candidate", "expected"), [
    ((0.9, 0.2), True),    # higher score, same loss
    ((0.9, 0.1), True),    # higher score, lower loss
    ((0.9, 0.3), False),   # higher score at a higher loss: a few samples' luck
    ((0.8, 0.1), True),    # a tie broken by the lower loss
    ((0.8, 0.2), False),   # no change
    ((0.7, 0.1), False),   # lower score
    ((0.9, float("nan")), False),
])
def test_an_epoch_improves_when_score_and_loss_agree(candidate, expected):
    """Rule e's comparison against a best of score 0.8 and loss 0.2."""
    from fmcompress.backend.trainer import improves

    assert improves(*candidate, 0.8, 0.2) is expected
