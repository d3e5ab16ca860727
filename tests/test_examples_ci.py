"""examples/ci/gate.sh, the ready CI job: run as a CI system would, on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from modeltools import tiny_classifier

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ci" / "gate.sh"
pytestmark = pytest.mark.skipif(shutil.which("fmcompress") is None, reason="needs the fmcompress command")


def gate(tmp_path: Path, ceiling: str, **env: str) -> subprocess.CompletedProcess:
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(model))
    return subprocess.run(["bash", str(SCRIPT), str(model), ceiling], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "COMPILE_ARGS": "--epochs 1 --num-samples 16", **env}, timeout=600)


def test_a_model_that_fits_passes_without_compiling(tmp_path):
    done = gate(tmp_path, "1MB")
    assert done.returncode == 0, done.stderr
    assert "fits 1MB" in done.stdout
    assert json.loads((tmp_path / "fmcompress-reports" / "analysis.json").read_text())["over_ceiling"] == []
    assert not (tmp_path / "tiny.fmc.onnx").exists()


def test_a_model_over_the_ceiling_is_compiled_gated_and_verified(tmp_path):
    done = gate(tmp_path, "1KB", MIN_AGREEMENT="0.0")
    assert done.returncode == 0, done.stderr
    reports = tmp_path / "fmcompress-reports"
    assert (tmp_path / "tiny.fmc.onnx").exists()
    assert json.loads((reports / "compile" / "report.json").read_text())["gate"]["passed"] is True
    assert json.loads((reports / "verify.json").read_text())["ceiling_ok"] is True
    assert (reports / "training.jsonl").read_text().count('"event": "epoch_end"') >= 1


def test_a_missed_fidelity_gate_fails_the_job(tmp_path):
    # plain PCA at 1 channel of 16: learned's block stage can keep every decision of the tiny model
    done = gate(tmp_path, "256B", MIN_AGREEMENT="1.0", COMPILE_ARGS="--method pca --num-samples 64")
    assert done.returncode == 1 and "fidelity gate missed" in done.stderr
    assert not (tmp_path / "tiny.fmc.onnx").exists()
