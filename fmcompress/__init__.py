"""fmcompress: make every feature map of a CNN fit under a memory ceiling."""

from .api import analyze

__all__ = ["analyze"]

__version__ = "0.1.0"
