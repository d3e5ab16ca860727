"""examples/ceiling_sweep.py's `--train KEY=VALUE`: each value parsed as its TrainConfig field's type."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from fmcompress.errors import InputError

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ceiling_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("ceiling_sweep_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_optional_fields_take_their_types(sweep):
    """An optional field's value was passed on as text (`--train block_ridge=1e-3` failed in
    TrainConfig.check); now it is its type, and `none` is None."""
    parsed = sweep.train_overrides(["block_ridge=1e-3", "max_samples=5", "target=none", "fake_quant=true",
                                    "block-init=pca", "epochs=3"])
    assert parsed == {"block_ridge": 1e-3, "max_samples": 5, "target": None, "fake_quant": True,
                      "block_init": "pca", "epochs": 3}
    assert type(parsed["block_ridge"]) is float and type(parsed["max_samples"]) is int


@pytest.mark.parametrize("pair, message", [("epochs=x", "takes int values"), ("nothing=1", "no field")])
def test_bad_pairs_are_input_errors(sweep, pair, message):
    with pytest.raises(InputError, match=message):
        sweep.train_overrides([pair])


def test_batch_size_and_seed_overrides_reach_the_compile(sweep, monkeypatch, tmp_path):
    """compile hands its own batch size and seed to the training settings, so `--train
    batch_size=8` and `--train seed=3` must set those options (they used to be overwritten by
    compile's defaults)."""
    seen = {}

    def compile_model(path, options):
        seen["batch_size"], seen["seed"], seen["training"] = options.batch_size, options.seed, options.training
        raise InputError("stop here")

    monkeypatch.setattr(sweep, "compile_model", compile_model)
    task = sweep.Task("demo", "accuracy", tmp_path / "m.onnx", "", data=str(tmp_path / "d.npz"))
    args = argparse.Namespace(num_samples=8, calibration_set="first", labeled=False, threads=1, int8=False, placement="after",
                              calibrate=sweep.DEFAULT_CALIBRATION, epochs=1, block_epochs=1,
                              train=["batch_size=8", "lr=0.001", "seed=3"])
    row = sweep.run_one(task, "4x", "learned", args, tmp_path)
    assert row["error"] == "stop here"
    assert seen["batch_size"] == 8 and seen["seed"] == 3 and seen["training"].lr == 0.001


def test_training_summary_keeps_each_maps_held_out_losses(sweep):
    """The sweep's rows carry what chose each map's block epoch, so a stop rule can be studied afterwards."""
    stage = {"seconds": 3.0, "maps": [{"name": "a", "epochs": 2, "best_epoch": 0, "seconds": 1.0,
                                        "held_out_losses": [0.5, 0.6, 0.7]},
                                       {"name": "b", "epochs": 0, "best_epoch": None, "seconds": 0.1,
                                        "held_out_losses": []}]}
    training = {"block_stage": stage, "history": [], "initial_score": 0.9, "initial_loss": 0.1,
                "best_score": 0.9, "best_epoch": 0, "stop_reason": "probe"}
    summary = sweep.training_summary(training)
    assert summary["block_epochs"] == 2
    assert [m["held_out_losses"] for m in summary["block_maps"]] == [[0.5, 0.6, 0.7], []]
