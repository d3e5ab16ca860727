"""examples/ci: the GitHub Actions workflow and gate.sh, the same gate, run as a CI system would.

The fidelity gate is checked on real figures: the tiny model is compiled once without a gate,
and its held-out agreement is then the threshold of a gate that must pass, and just above it
of a gate that must fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from modeltools import tiny_classifier

CI = Path(__file__).resolve().parents[1] / "examples" / "ci"
SCRIPT = CI / "gate.sh"
WORKFLOW = CI / "fmcompress.yml"
MARKER = "# --- the gate: the same lines as the `gate` step of fmcompress.yml ---\n"
needs_cli = pytest.mark.skipif(shutil.which("fmcompress") is None, reason="needs the fmcompress command")

# learned at 1KB keeps 4 channels of 16; pca at 256B keeps 1, so it must lose agreement
LEARNED = "--epochs 1 --num-samples 16"
PCA_RANK_1 = "--method pca --num-samples 64"


def workflow() -> dict:
    import yaml  # PyYAML, from the test extra
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def steps() -> list[dict]:
    return workflow()["jobs"]["gate"]["steps"]


def model_path(tmp_path: Path) -> Path:
    model = tmp_path / "tiny.onnx"
    if not model.exists():
        onnx.save(tiny_classifier(), str(model))
    return model


def gate(tmp_path: Path, ceiling: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(model_path(tmp_path)), ceiling], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


def measured_agreement(tmp_path: Path, ceiling: str, compile_args: str) -> float:
    """Held-out top-1 agreement of a compile without a gate, with the flags the gate will use."""
    report = tmp_path / "ungated.json"
    done = subprocess.run(["fmcompress", "compile", str(model_path(tmp_path)), "--ceiling", ceiling,
                           "-o", str(tmp_path / "ungated.onnx"), "--json", str(report), "--quiet",
                           *compile_args.split()], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(report.read_text())["fidelity"]["top1_agreement"]


# --- the workflow works when copied into another repository ---------------------------------


def test_the_workflow_runs_the_same_gate_as_gate_sh():
    gate_step = next(step for step in steps() if step.get("name") == "gate")
    body = SCRIPT.read_text(encoding="utf-8").split(MARKER, 1)[1]
    assert gate_step["run"] == body, "the `gate` step of fmcompress.yml and gate.sh differ; keep them equal"
    assert gate_step["shell"] == "bash"
    assert "examples/ci" not in json.dumps(workflow()), "a copied workflow cannot read fmcompress's own files"


def test_the_workflow_installs_fmcompress_from_git_with_cpu_torch():
    install = next(step["run"] for step in steps() if "install" in step.get("name", ""))
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    assert '"fmcompress[compile] @ ${FMCOMPRESS}"' in install
    assert workflow()["env"]["FMCOMPRESS"].startswith("git+https://github.com/")


def test_the_workflow_keeps_the_compressed_model_and_the_reports():
    env = workflow()["env"]
    uploads = {step["with"]["name"]: step for step in steps() if "upload-artifact" in step.get("uses", "")}
    assert uploads["compressed-model"]["with"]["path"] == "${{ env.OUT }}/*.fmc.onnx"
    assert uploads["fmcompress-reports"]["with"]["path"] == "${{ env.OUT }}/reports/"
    assert uploads["fmcompress-reports"]["if"] == "always()"
    assert {"MODEL", "CEILING", "DATA", "MIN_AGREEMENT", "OUT"} <= set(env)


# --- gate.sh ------------------------------------------------------------------------------


@needs_cli
def test_a_model_that_fits_passes_without_compiling(tmp_path):
    done = gate(tmp_path, "1MB")
    assert done.returncode == 0, done.stderr
    assert "fits 1MB" in done.stdout
    reports = tmp_path / "fmcompress-out" / "reports"
    assert json.loads((reports / "analysis.json").read_text())["over_ceiling"] == []
    assert not list((tmp_path / "fmcompress-out").glob("*.fmc.onnx"))


@needs_cli
@pytest.mark.slow
def test_a_gate_at_the_measured_agreement_passes(tmp_path):
    agreement = measured_agreement(tmp_path, "1KB", LEARNED)
    done = gate(tmp_path, "1KB", MIN_AGREEMENT=repr(agreement), COMPILE_ARGS=LEARNED)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "fmcompress-out"
    assert (out / "tiny.fmc.onnx").exists()
    compiled = json.loads((out / "reports" / "compile" / "report.json").read_text())
    assert compiled["gate"] == {**compiled["gate"], "min_agreement": agreement, "passed": True}
    assert compiled["fidelity"]["top1_agreement"] == agreement
    assert json.loads((out / "reports" / "verify.json").read_text())["ceiling_ok"] is True
    assert (out / "reports" / "training.jsonl").read_text().count('"event": "epoch_end"') >= 1


@needs_cli
@pytest.mark.slow
def test_a_gate_above_the_measured_agreement_fails_the_job(tmp_path):
    agreement = measured_agreement(tmp_path, "256B", PCA_RANK_1)
    assert agreement < 1, "pca at 1 channel of 16 should lose some decisions of the tiny model"
    done = gate(tmp_path, "256B", MIN_AGREEMENT=repr((agreement + 1) / 2), COMPILE_ARGS=PCA_RANK_1)
    assert done.returncode == 1, done.stderr
    assert "fidelity gate missed" in done.stderr
    assert not list((tmp_path / "fmcompress-out").glob("*.fmc.onnx"))
    # the same compile with the gate at the agreement it reaches passes
    done = gate(tmp_path, "256B", MIN_AGREEMENT=repr(agreement), COMPILE_ARGS=PCA_RANK_1)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fmcompress-out" / "tiny.fmc.onnx").exists()
