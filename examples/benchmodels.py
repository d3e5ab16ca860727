"""The models the runtime benchmarks measure, by name: zoo exports or the test extra's wheels.

Imported by examples/runtime_peak.py and examples/runtime_sweep.py (run from anywhere:
Python puts a script's own folder on the path).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model
from fmcompress.shapes import graph_inputs

# zoo models (untrained weights: memory and time figures only) and the shape they are exported at
ZOO = {"resnet18": (1, 3, 224, 224), "mobilenet_v2": (1, 3, 224, 224), "vgg16_bn_small": (1, 3, 32, 32),
       "unet": (1, 3, 256, 256), "mobilenet_v3_small": (1, 3, 224, 224)}


def model_path(name: str, workdir: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The ONNX file for `name` (zoo models are exported into `workdir`) and its input shapes."""
    if name in REAL_MODELS:
        path, shape = real_model(name), REAL_MODELS[name].input_shape
    else:
        from fmcompress.frontend import export_model

        path, shape = workdir / f"{name}.onnx", ZOO[name]
        export_model(name, shape, path)
    model = onnx.load(str(path), load_external_data=False)
    return path, {graph_inputs(model)[0].name: shape}
