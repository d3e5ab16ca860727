"""Training backend: run ONNX graphs as differentiable torch modules."""
