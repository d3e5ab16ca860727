"""Training backend: run ONNX graphs as differentiable torch modules."""

from .executor import OnnxModule, check_supported, unsupported_ops
from .registry import OPS

SUPPORTED_OPS = frozenset(OPS) | {"Constant"}

__all__ = ["SUPPORTED_OPS", "OnnxModule", "check_supported", "unsupported_ops"]
