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
                        progress=lambda i, name, first, last: losses.update({name: (first, last)}))
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
    refined = blockwise(model, maps, batches, epochs=4, progress=lambda i, name, first, last: ends.append(name))
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


def test_max_samples_bounds_the_block_stage(tmp_path, monkeypatch):
    import fmcompress.backend.blockwise as module
    from fmcompress.compiler import CompileOptions, compile_model
    from fmcompress.train_config import TrainConfig

    seen = []
    real = module.fit_blockwise

    def counting(executor, maps, batches, **kwargs):
        seen.append(sum(len(batch[0]) for batch in batches))
        return real(executor, maps, batches, **kwargs)

    monkeypatch.setattr(module, "fit_blockwise", counting)
    import onnx

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    for max_samples in (None, 5):
        compile_model(str(path), CompileOptions(ceiling="4x", num_samples=32, batch_size=4, latency_rounds=1,
                                                latency_repeats=1, training=TrainConfig(
                                                    epochs=1, block_epochs=1, batch_size=4, max_samples=max_samples)))
    assert seen == [24, 5]  # a quarter of the 32 samples is held out
