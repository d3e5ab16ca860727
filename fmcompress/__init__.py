"""fmcompress: make every feature map of a CNN fit under a memory ceiling."""

__version__ = "0.1.0"

from .api import analyze, compile, export  # noqa: E402 - the API needs __version__ first

__all__ = ["__version__", "analyze", "compile", "export"]
