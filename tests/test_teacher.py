"""The teacher's pass by onnxruntime (fmcompress/backend/teacher.py rules a-c): the executor's
outputs to rounding, the executor where it must teach, and a fallback for batches
onnxruntime refuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from modeltools import tiny_classifier

from fmcompress.backend.executor import OnnxModule
from fmcompress.backend.teacher import ort_teacher
from fmcompress.backend.trainer import ProjectionTrainer, random_projections
from fmcompress.train_config import TrainConfig

MAPS = [("r1", 16, 4), ("r2", 16, 4)]


def _batch(n: int = 4) -> list[torch.Tensor]:
    return [torch.from_numpy(np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32))]


def test_onnxruntime_teaches_what_the_executor_computes():
    """Rule a, on a model nobody here wrote: PP-OCR's direction classifier."""
    from fmcompress.evaluation.thirdparty import real_model

    model = onnx.load(str(real_model("ppocr-cls")))
    executor = OnnxModule(model).eval()
    teacher = ort_teacher(model, list(executor.input_names), TrainConfig())
    assert teacher is not None
    x = torch.rand(3, 3, 48, 192)
    with torch.no_grad():
        expected = executor(x)
    found = teacher([x])
    assert len(found) == len(expected)
    for got, want in zip(found, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [TrainConfig(device="meta"), TrainConfig(feature_weight=1.0)],
                         ids=["another device", "feature distillation against the teacher"])
def test_the_executor_teaches_where_it_must(config, monkeypatch):
    """Rule b: another device, or feature distillation reading the teacher's maps."""
    import fmcompress.backend.teacher as teacher_module

    monkeypatch.setattr(teacher_module, "resolve_device",
                        lambda name: torch.device("cuda" if name == "meta" else "cpu"))
    assert ort_teacher(tiny_classifier(), ["x"], config) is None


def test_a_model_onnxruntime_cannot_load_has_no_onnxruntime_teacher():
    model = tiny_classifier()
    model.graph.node[1].op_type = "NoSuchOp"
    assert ort_teacher(model, ["x"], TrainConfig()) is None


def test_a_batch_onnxruntime_refuses_falls_back_to_the_executor():
    """Rule c: the model declares batch 1; the trainer's teacher pass still gives the executor's
    outputs for a batch of 4, and onnxruntime is not asked again."""
    model = tiny_classifier()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    executor = OnnxModule(model)
    teacher = ort_teacher(model, ["x"], TrainConfig())
    assert teacher is not None and teacher(_batch(1)) is not None
    trainer = ProjectionTrainer(executor, [m[0] for m in MAPS], random_projections(MAPS, 1), TrainConfig(),
                                teacher=teacher)
    with torch.no_grad():
        expected = trainer._run(executor, _batch(), bypass=True)
    torch.testing.assert_close(trainer._teach(_batch())[0], expected[0])
    assert teacher.session is None and teacher(_batch(1)) is None
