"""fmcompress: make every feature map of a CNN fit under a memory ceiling."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "analyze", "compile", "export"]


def __getattr__(name: str) -> Any:
    # The API is imported on first use, so that light modules (fmcompress.units, .errors)
    # load without onnxruntime or torch.
    if name in ("analyze", "compile", "export"):
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
