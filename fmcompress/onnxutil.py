"""Small ONNX helpers shared by the passes, the backend and the front end (no onnxruntime here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")  # the names of ONNX's default operator set

# the attribute forms of a Constant node, with the dtype of the list forms
_LIST_FORMS = {"value_float": np.float32, "value_floats": np.float32,
               "value_int": np.int64, "value_ints": np.int64}


def constant_attr_value(attrs: Mapping[str, Any]) -> np.ndarray | None:
    """The value a Constant node holds, from its attributes (name -> Python value).

    Takes both onnx's decoded attributes (`value` is a TensorProto) and
    onnx-graphsurgeon's (`value` is a gs.Constant); None for the forms that hold no
    numeric array (strings, sparse tensors).
    """
    if "value" in attrs:
        value = attrs["value"]
        return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value.values)
    for key, dtype in _LIST_FORMS.items():
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node (any attribute form); None for other nodes."""
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return None
    return constant_attr_value(node_attrs(node))
