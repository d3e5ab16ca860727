"""The teacher's pass of end-to-end training, run by onnxruntime where it can be.

Rules:

a. End-to-end training runs the frozen original on every (augmented) batch, without
   gradients (trainer.py rule a). On the CPU onnxruntime computes that pass in about half the
   torch executor's time (PP-OCR's recognizer, batch 16: 0.23 s against 0.46 s), so the
   trainer's teacher is an onnxruntime session of the original model, its outputs those of
   the executor to rounding. The held-out part's teacher outputs come from it too.
b. Not where the teacher's pass must run in the executor: training on another device, or
   feature distillation against the teacher's maps (`feature_weight` with reference
   `teacher`: the projections read the maps of that very pass). `ort_teacher` returns None
   there, and for a model onnxruntime cannot load.
c. A batch onnxruntime cannot run (a shape the model's declared inputs refuse, a dtype numpy
   lacks): `__call__` returns None, and does so from then on, and the trainer runs the
   executor instead.

Entry point: `ort_teacher(model, input_names, config)`.
"""

from __future__ import annotations

import onnx
import torch

from fmcompress.errors import InputError, onnxruntime_errors
from fmcompress.train_config import TrainConfig

from .devices import resolve_device


class OrtTeacher:
    """The original model's outputs for a batch of the executor's inputs (rules a and c)."""

    def __init__(self, session, input_names: list[str]):
        self.session, self.input_names = session, list(input_names)

    def __call__(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        if self.session is None:
            return None
        try:
            # numpy has no bfloat16 (TypeError): such inputs are the executor's to run too
            feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, tensors, strict=True)}
            outputs = self.session.run(None, feeds)
        except (*onnxruntime_errors(), TypeError):
            self.session = None  # rule c
            return None
        return tuple(torch.from_numpy(out) for out in outputs)


def ort_teacher(model: onnx.ModelProto, input_names: list[str], config: TrainConfig) -> OrtTeacher | None:
    """Rule b: a session of `model` on the CPU's threads, or None where the executor must teach."""
    from fmcompress.ortrun import ort_session

    if resolve_device(config.device).type != "cpu" or (config.feature_weight > 0
                                                        and config.feature_reference == "teacher"):
        return None
    try:
        return OrtTeacher(ort_session(model, threads=torch.get_num_threads()), input_names)
    except InputError:
        return None
