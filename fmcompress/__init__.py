"""fmcompress: make every feature map of a CNN fit under a memory ceiling."""

__version__ = "0.1.0"
