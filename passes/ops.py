"""Op categories of the rewriting passes, in one place, named by what each rule may do with them.

Rules:
a. A table belongs to the rule that reads it: its name says which pass and what the pass
   may assume of the op. The same op may sit in different tables of different passes,
   because each rule asks something else of it.
b. Tiling (passes/tile.py, rule a) needs ops whose rows map to the same rows. Its
   single-map ops read one region map (input 0) and constants: Clip (min and max are
   constants), Dropout and BatchNormalization belong here. Its same-shape ops combine
   region maps of the output's exact shape with constants that do not vary along the
   rows. Its row-local ops act off the row axis of a channel-last tensor (LayerNormalization
   over trailing axes, MatMul by a constant on the last axis), its layout ops move the row
   axis (Transpose) or merge it with the axes after it (Reshape): tile rule a''.
c. Concat sinking (passes/sink_concat.py, rule c) needs ops that act on every position of
   the sunk axis independently, with numpy broadcasting. There Clip is n-ary (its min and
   max may be computed tensors, sunk or sliced like any operand), and comparisons, logic,
   Where, Pow and Mod are included, as are the rounding and trigonometric unary ops.
   Dropout and BatchNormalization are not (a Concat above the ceiling is sunk at a
   detection head, where they do not occur).
d. The memory analysis (passes/memory.py, section 3.3 of docs/design.md) groups ops into
   kernels: activations, elementwise and view ops chain onto the op before them.
e. Folding (passes/fold.py rules c, d) pushes U through ops that commute with channel
   mixing; the plan (carried planes), the allocation (its folding prediction) and the
   memory analysis (what a reader chain stops at) read the same tables, so they predict
   what fold does.
f. Each table keeps the membership its pass had before the tables moved here: growing
   one changes what that pass rewrites.
"""

from __future__ import annotations

# unary elementwise ops that both passes treat alike
_ELEMENTWISE_UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish",
    "ThresholdedRelu", "Identity", "Cast",
})

# ---------------------------------------------------------------- tiling (rule b)

TILE_WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})  # a kernel along H
TILE_SINGLE_MAP_OPS = _ELEMENTWISE_UNARY | {"Clip", "Dropout", "BatchNormalization", "LRN"}  # LRN: across C only
TILE_SAME_SHAPE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu"})
TILE_CHANNEL_OPS = frozenset({"Concat", "Split"})  # along channels: rows map to the same rows
TILE_ROW_LOCAL_OPS = frozenset({"LayerNormalization", "MatMul"})  # off the row axis (rule a'')
TILE_LAYOUT_OPS = frozenset({"Transpose", "Reshape"})  # move or merge the row axis (rule a'')
# constant-only nodes whose outputs a region reads as constants (tile rule a): an old model's
# scale reshaped or unsqueezed for a Mul; small shape arithmetic, never a weight producer
CONSTANT_FOLDABLE_OPS = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Cast", "Identity",
                                   "Transpose", "Expand", "Concat", "Neg", "Reciprocal", "Sqrt"})

# ---------------------------------------------------------------- concat sinking (rule c)

SINK_UNARY_OPS = _ELEMENTWISE_UNARY | {"Floor", "Ceil", "Round", "Sign", "Not", "Sin", "Cos",
                                       "IsNaN", "IsInf"}
SINK_NARY_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Clip", "Mod",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
})
SINK_SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})  # per position off their axis
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})  # same values, another shape
SINK_VIEW_OPS = VIEW_OPS
# whose value is not a function of the input shapes: never evaluated as known values (sink rule b)
UNFOLDABLE_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                            "RandomUniformLike", "Multinomial", "Bernoulli", "If", "Loop", "Scan"})

# ---------------------------------------------------------------- folding (rule e)

CONV_OPS = frozenset({"Conv", "ConvTranspose"})  # P and U fold into their weights (fold rules a, b)
FOLD_IDENTITY_OPS = frozenset({"Identity", "Dropout"})  # U passes through unchanged
FOLD_AFFINE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})  # P folds through them by a constant (rule a')
CARRYING_OPS = FOLD_IDENTITY_OPS | {"Resize", "Upsample"}  # the op then runs on k channels (plan)
FOLD_SIMPLE_PUSH_OPS = frozenset({"GlobalAveragePool", "AveragePool", "Identity"})  # fold rule c as is
# every reader U is pushed through (rules c, d): what their own readers need decides
FOLD_PUSH_OPS = CARRYING_OPS | FOLD_SIMPLE_PUSH_OPS | {"Pad", "Slice", "Split"}

# ---------------------------------------------------------------- memory analysis (rule d)

ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Clip", "Sigmoid", "HardSigmoid",
                         "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf",
                         "ThresholdedRelu", "Celu"})
STORED_UNARY_OPS = ACTIVATIONS | {
    "BatchNormalization", "Identity", "Dropout", "Cast", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf", "QuantizeLinear", "Sin", "Cos",
    "InstanceNormalization", "LayerNormalization", "LpNormalization", "Softmax", "LogSoftmax",
}
STORED_BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Min", "Max", "Mod", "Where", "Equal",
                               "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
                               "Sum", "Mean"})
POOLING_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})
AFFINE_PER_CHANNEL_OPS = frozenset({"BatchNormalization", "Identity", "Add", "Sub", "Mul", "Div"})
SHAPE_OPS = frozenset({"Shape", "Size"})  # read a tensor's shape, not its values
CHAINABLE_OPS = STORED_UNARY_OPS | STORED_BINARY_OPS | VIEW_OPS

# ---------------------------------------------------------------- runtime view

RUNTIME_ALIAS_OPS = VIEW_OPS | FOLD_IDENTITY_OPS  # onnxruntime reuses the input's buffer

# ---------------------------------------------------------------- position chunking

# what passes/chunk_positions.py (rule b) computes per chunk of positions after the product:
# unary ops act on each element, binary ones with a constant that does not vary along the
# positions, the softmax family over the last axis only
CHUNK_UNARY_OPS = _ELEMENTWISE_UNARY | {"Clip", "Dropout"}
CHUNK_BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu"})
CHUNK_SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
