"""What a loaded model must satisfy before any analysis reads it, checked cheaply: each
violation is a one-line InputError naming the initializer or node (never a numpy or
onnx traceback deeper in a pass).

Rules:
a. An initializer's data matches its data type and dims: no negative dim, a known data
   type, as many bytes (raw_data) or values as the dims hold; nothing is converted.
b. An attribute of a default-domain node has the type its op's schema declares at the
   model's opset (an `axis` given as a list is refused); unknown ops and opsets out of
   range are left to the checks that name them.
c. `initializer_array` converts one initializer, turning a conversion error into rule a's
   InputError.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError


def initializer_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The initializer's value; InputError when its data does not match its dtype and dims."""
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"initializer {tensor.name!r} (data type {tensor.data_type}, dims {list(tensor.dims)}): "
                         f"its data does not match its data type and dims ({reason})") from exc


_T = onnx.TensorProto
# bytes per element in raw_data; data types not listed (sub-byte, strings) are not size-checked
_RAW_BYTES = {_T.FLOAT: 4, _T.UINT8: 1, _T.INT8: 1, _T.UINT16: 2, _T.INT16: 2, _T.INT32: 4, _T.INT64: 8,
              _T.BOOL: 1, _T.FLOAT16: 2, _T.DOUBLE: 8, _T.UINT32: 4, _T.UINT64: 8, _T.COMPLEX64: 8,
              _T.COMPLEX128: 16, _T.BFLOAT16: 2, _T.FLOAT8E4M3FN: 1, _T.FLOAT8E4M3FNUZ: 1, _T.FLOAT8E5M2: 1,
              _T.FLOAT8E5M2FNUZ: 1}


def check_initializers(graph: onnx.GraphProto) -> None:
    """InputError naming the first initializer whose data cannot be its data type and dims
    (a dim below 0, an unknown data type, more or fewer elements or bytes than the dims
    hold); cheap: nothing is converted."""
    for init in graph.initializer:
        where = f"initializer {init.name!r} (dims {list(init.dims)})"
        if any(d < 0 for d in init.dims):
            raise InputError(f"{where}: a negative dimension")
        if init.data_type not in _T.DataType.values() or init.data_type == _T.UNDEFINED:
            raise InputError(f"{where}: unknown data type {init.data_type}")
        if init.data_type == _T.STRING and init.HasField("raw_data"):
            raise InputError(f"{where}: STRING data in raw_data (strings are stored in string_data)")
        if init.data_location == _T.EXTERNAL or init.data_type not in _RAW_BYTES:
            continue
        numel = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
        if init.HasField("raw_data"):
            have, want, unit = len(init.raw_data), numel * _RAW_BYTES[init.data_type], "bytes"
        else:
            field = onnx.helper.tensor_dtype_to_field(init.data_type)
            per = 2 if init.data_type in (_T.COMPLEX64, _T.COMPLEX128) else 1
            have, want, unit = len(getattr(init, field)), numel * per, f"values in {field}"
        if have != want:
            name = _T.DataType.Name(init.data_type)
            raise InputError(f"{where}: {have} {unit} of data, but {name} with these dims needs {want}")


def check_attribute_types(model: onnx.ModelProto) -> None:
    """InputError naming the first node of the default domain whose attribute has another
    type than its op's schema declares (an `axis` given as a list, `kernel_shape` as an int)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        return
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        declared = _schema_attribute_types(node.op_type, version)
        for attr in node.attribute:
            want = declared.get(attr.name)
            if want is not None and attr.type != want and not attr.ref_attr_name:
                got = onnx.AttributeProto.AttributeType.Name(attr.type) \
                    if attr.type in onnx.AttributeProto.AttributeType.values() else str(attr.type)
                raise InputError(f"node {node.name or ','.join(node.output)!r} ({node.op_type}): attribute {attr.name!r} "
                                 f"is {got}, but {node.op_type} takes "
                                 f"{onnx.AttributeProto.AttributeType.Name(want)}")


@functools.cache
def _schema_attribute_types(op_type: str, version: int) -> dict[str, int]:
    try:
        schema = onnx.defs.get_schema(op_type, max_inclusive_version=version, domain="")
    except (onnx.defs.SchemaError, TypeError, OverflowError):  # an unknown op, or an opset out of range:
        return {}                                                 # named elsewhere
    return {name: int(attr.type) for name, attr in schema.attributes.items()}
