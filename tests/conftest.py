"""Shared fixtures: zoo models exported once per session, real models from PyPI wheels."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zoo_onnx(tmp_path_factory):
    """zoo_onnx(name, shape) -> path of the zoo model exported to ONNX (cached per session)."""
    cache: dict[tuple, Path] = {}
    folder = tmp_path_factory.mktemp("zoo")

    def export(name: str, shape: tuple[int, ...]) -> Path:
        key = (name, tuple(shape))
        if key not in cache:
            from fmcompress.frontend import export_model

            path = folder / f"{name}_{'x'.join(map(str, shape))}.onnx"
            export_model(name, tuple(shape), path)
            cache[key] = path
        return cache[key]

    return export


@pytest.fixture(scope="session")
def resnet18_224(zoo_onnx) -> Path:
    return zoo_onnx("resnet18", (1, 3, 224, 224))
