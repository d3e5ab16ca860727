"""The one graph representation of the passes: a graphsurgeon graph with its model's header.

Every pass reads and writes a `Model`: `model.graph` is an onnx-graphsurgeon `Graph`
that rewriting passes edit in place; the header (ir_version, opset imports, metadata,
local functions, producer) is the loaded model's, kept as it was. ONNX protos exist
only at the edges: loading (`Model.from_proto`), and `Model.proto()` for what needs
ONNX itself (saving, onnxruntime sessions, ONNX shape inference, the torch executor).

Rules:
a. A pass that edits `model.graph` calls `model.touched()`, which removes dead nodes
   and tensors, sorts the nodes topologically (what every later pass may rely on) and
   forgets the cached proto. A pass that keeps the node list in a valid order itself
   (tiling, Concat sinking, conv splitting insert each new node where it runs) passes
   `sort=False`: onnxruntime's execution order, and so its memory peak, follows the
   node order, and a re-sort would move nodes the pass placed on purpose.
b. `model.proto()` exports once per state of the graph and caches the result; the
   proto of a model nobody touched is the very proto it was loaded from, so analyses
   of an unchanged model see exactly the input. Callers never edit the returned proto.
c. Passes edit in place: `model.copy()` first where the caller must keep the input.
d. `model.cache` keeps costly analyses of the graph as it stands (onnxruntime's
   optimised graph, say) for a later pass that asks the same; an edit empties it.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

_HEADER_FIELDS = ("ir_version", "opset_import", "producer_name", "producer_version", "domain",
                  "model_version", "doc_string", "metadata_props", "functions", "training_info")


class Model:
    """A graphsurgeon graph and the header of the ONNX model it came from."""

    def __init__(self, graph: gs.Graph, header: onnx.ModelProto, proto: onnx.ModelProto | None = None):
        self.graph = graph
        self.header = header
        self._proto = proto  # the proto this graph equals (rule b); None once touched
        self.cache: dict = {}  # analyses of this state of the graph (rule d); emptied by any edit

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto) -> Model:
        header = onnx.ModelProto()
        for field in _HEADER_FIELDS:
            if field in ("opset_import", "metadata_props", "functions", "training_info"):
                getattr(header, field).extend(getattr(proto, field))
            elif proto.HasField(field):
                setattr(header, field, getattr(proto, field))
        return cls(gs.import_onnx(proto), header, proto)

    @property
    def opset(self) -> int:
        """The default domain's opset (13 for a model that imports none: it holds no ONNX op)."""
        return next((o.version for o in self.header.opset_import if o.domain in ("", "ai.onnx")), 13)

    @staticmethod
    def of(model: Model | onnx.ModelProto) -> Model:
        """`model` itself, or a new Model of a proto (which is then never edited)."""
        return model if isinstance(model, Model) else Model.from_proto(model)

    def proto(self) -> onnx.ModelProto:
        """The model as ONNX (rule b): cleaned, sorted, exported into a copy of the header."""
        if self._proto is None:
            exported = gs.export_onnx(self.graph, do_type_check=False)
            model = onnx.ModelProto()
            model.CopyFrom(self.header)
            model.graph.CopyFrom(exported.graph)
            self._proto = model
        return self._proto

    def touched(self, sort: bool = True) -> None:
        """Rule a: after an edit of `graph`."""
        self.graph.cleanup()
        if sort:
            self.graph.toposort()
        self._proto = None
        self.cache = {}

    def replace(self, proto: onnx.ModelProto) -> None:
        """Take the graph of a rewritten proto (its header must be this model's)."""
        self.graph = gs.import_onnx(proto)
        self._proto = proto
        self.cache = {}

    def copy(self) -> Model:
        """An independent graph (constant values are shared: passes replace, never mutate them)."""
        return Model(self.graph.copy(), self.header, self._proto)
