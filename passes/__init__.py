"""Graph passes of fmcompress (importable as `fmcompress.passes`), one pass a module."""

from .base import Pass, PassContext, PassResult, Pipeline

__all__ = ["Pass", "PassContext", "PassResult", "Pipeline"]
