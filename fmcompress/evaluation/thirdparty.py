"""Real third-party ONNX models that PyPI wheels ship (used by tests, examples and demos).

Nothing is downloaded: each model comes from an installed wheel, listed in the
`test` extra. `real_model(name)` returns its path, or raises InputError naming
the wheel to install.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fmcompress.errors import InputError


@dataclass(frozen=True)
class RealModel:
    package: str  # importable module of the wheel
    wheel: str  # pip name
    relpath: str  # path inside the package
    input_shape: tuple[int, ...]  # the shape we use for it


REAL_MODELS: dict[str, RealModel] = {
    "ppocr-cls": RealModel("rapidocr_onnxruntime", "rapidocr-onnxruntime",
                           "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192)),
    "ppocr-det": RealModel("rapidocr_onnxruntime", "rapidocr-onnxruntime",
                           "models/ch_PP-OCRv4_det_infer.onnx", (1, 3, 640, 640)),
    "ppocr-rec": RealModel("rapidocr_onnxruntime", "rapidocr-onnxruntime",
                           "models/ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
    "yolov8n": RealModel("nudenet", "nudenet", "320n.onnx", (1, 3, 320, 320)),
}


def real_model(name: str) -> Path:
    """Path of a real model shipped by an installed wheel."""
    if name not in REAL_MODELS:
        raise InputError(f"unknown real model {name!r}; known: {', '.join(REAL_MODELS)}")
    entry = REAL_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{name} needs the {entry.wheel} wheel: pip install {entry.wheel}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.relpath
    if not path.exists():
        raise InputError(f"{name}: {path} is missing from the installed {entry.wheel} wheel")
    return path


def ort_quantize_static(model, feeds: list[dict]):
    """`model` through onnxruntime's documented static quantization, as a user who wants only int8
    runs it: `quant_pre_process`, then `quantize_static` (QDQ, per-channel int8 weights, uint8
    activations, MinMax on `feeds`, default options). The baseline int8 peaks are judged against."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from fmcompress.int8 import calibration_reader

    with tempfile.TemporaryDirectory() as folder:
        source, prepared, quantized = (str(Path(folder) / f"{n}.onnx") for n in ("float", "pre", "int8"))
        onnx.save(model, source)
        quant_pre_process(source, prepared)
        quantize_static(prepared, quantized, calibration_reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        return onnx.load(quantized)
