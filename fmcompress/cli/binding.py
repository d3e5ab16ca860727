"""Options bound to the fields of the option dataclasses (CompileOptions, TrainConfig).

Each option is declared once, in a table row that names the dataclass field it fills (the
field's name is also the click parameter's name), with its click type and help. Defaults
come from the dataclass defaults and choices from the tuples the code checks against, so
the CLI cannot drift from them; `compile_options` builds both dataclasses from the values
click collected, in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..compiler import RUNTIMES, CompileOptions
from ..int8 import CALIBRATIONS
from ..passes.allocate import OBJECTIVES
from ..passes.before_activation import PLACEMENTS
from ..passes.fit import METHODS
from ..reports.analysis import ORT_LEVELS
from ..train_config import (
    AUGMENTATIONS,
    BLOCK_AUGMENTATIONS,
    BLOCK_INITS,
    BLOCK_JUDGES,
    BLOCK_LOSSES,
    BLOCK_PRECISIONS,
    DEVICES,
    FEATURE_REFERENCES,
    LOSSES,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
)

CEILING_HELP = (
    "Memory ceiling per stored feature map: a size (256KB, 256KiB, 0.25MB, 262144) "
    "or a ratio of the largest compressible stored map (4x; graph inputs, outputs and integer "
    "maps do not count). KB = KiB = 1024 bytes."
)
INPUT_SHAPE_HELP = (
    "Pin an input's shape: NAME=1,3,224,224, or bare dims (1,3,224,224) for a "
    "single-input model. Repeat for several inputs."
)
FROM_FIELD: Any = object()  # Bound.option's default: the dataclass field's


class FloatList(click.ParamType):
    """Comma-separated numbers (--mean 0.5,0.5,0.5) as a tuple of floats."""

    name = "floats"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):  # the default, already a tuple
            return value
        try:
            values = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"must be comma-separated numbers, got {value!r}", param, ctx)
        if self.positive and any(v <= 0 for v in values):
            self.fail("values must be positive", param, ctx)
        return values


@dataclass(frozen=True)
class Bound:
    """One option bound to one dataclass field."""

    flag: str  # "--block-epochs"
    owner: type  # the dataclass the value goes to
    field: str  # its field, and the click parameter's name
    type: Any = None
    help: str | None = None
    metavar: str | None = None
    shown_default: str | None = None  # how to show a default click would not show well (1/255)
    multiple: bool = False
    is_flag: bool = False
    to_field: Callable[[Any], Any] | None = None  # click's value -> the field's (a tuple -> a list)

    def default(self) -> Any:
        field = next(f for f in dataclasses.fields(self.owner) if f.name == self.field)
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        return None  # a required field (the ceiling): the command checks it

    def option(self, default: Any = FROM_FIELD, help: str | None = None) -> Callable[[Any], Any]:
        value = self.default() if default is FROM_FIELD else default
        text = help or self.help
        if self.shown_default:  # in the text: click would bracket it as "(...)"
            text = f"{text} [default: {self.shown_default}]"
        return click.option(self.flag, self.field, type=self.type, default=value, help=text,
                            show_default=not self.shown_default and value is not None and not self.is_flag,
                            metavar=self.metavar, multiple=self.multiple, is_flag=self.is_flag)

    def value(self, collected: dict[str, Any]) -> Any:
        raw = collected[self.field]
        return self.to_field(raw) if self.to_field is not None and raw is not None else raw


def choice(values: Iterable[str]) -> click.Choice:
    return click.Choice(list(values))


def _one_over(value: float) -> str:
    """1/255 rather than 0.00392156862745098."""
    return f"1/{round(1 / value)}" if value > 0 and 1 / round(1 / value) == value else str(value)


def _numbers(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


C, T = CompileOptions, TrainConfig
_defaults = CompileOptions(ceiling=None)

DATA = (  # what `compile` and `verify` share (verify_pair takes the same names)
    Bound("--input-shape", C, "input_shapes", multiple=True, metavar="[NAME=]DIMS", help=INPUT_SHAPE_HELP,
         to_field=list),
    Bound("--act-bytes", C, "act_bytes", type=click.IntRange(min=1, max=8),
         help="Bytes per element instead of the stored dtype's (1 to plan int8)."),
    Bound("--data", C, "data", type=click.Path(path_type=Path),
         help="Data: an .npz (one array per input, optional `labels`), a folder of images (class "
              "subfolders give labels), or `mnist` (the trained demo's labelled test split; it carries "
              "its own normalisation). Default: surrogate photographs shipped with scikit-image."),
    Bound("--num-samples", C, "num_samples", type=click.IntRange(min=2),
         help="Samples to use (a quarter is held out for the fidelity figures)."),
    Bound("--mean", C, "mean", type=FloatList(), shown_default=_numbers(_defaults.mean),
         help="Image normalisation mean per channel."),
    Bound("--std", C, "std", type=FloatList(positive=True), shown_default=_numbers(_defaults.std),
         help="Image normalisation std per channel."),
    Bound("--scale", C, "scale", type=float, shown_default=_one_over(_defaults.scale),
         help="Pixel scale before normalisation."),
    Bound("--batch-size", C, "batch_size", type=click.IntRange(min=1)),
    Bound("--seed", C, "seed", type=int, help="Seed of the data split and subsampling."),
    Bound("--threads", C, "threads", type=click.IntRange(min=1),
         help="onnxruntime intra-op threads (latency figures)."),
)

TRAINING = (  # `--method learned|random`
    Bound("--epochs", T, "epochs", type=click.IntRange(min=0),
         help="End-to-end training epochs over the calibration part (after the greedy stages); 0 keeps "
              "the starting projections (learned: the block stage's, or PCA's where they score better)."),
    Bound("--block-epochs", T, "block_epochs", type=click.IntRange(min=0),
         help="learned: first refine each projection, in network order, to reproduce what the original "
              "computes after its block (the next compressed map, or the outputs), for this many epochs "
              "per map; 0 starts end-to-end training from the stage's starts (--block-init). Harder ceilings "
              "need more."),
    Bound("--block-min-gain", T, "block_min_gain", type=click.FloatRange(0, 1, max_open=True),
         help="learned: a map's block stage stops once its epochs' mean block loss has fallen by less than "
              "this share of its best for --block-patience epochs in a row (--block-epochs stays the "
              "maximum); 0 runs every epoch."),
    Bound("--block-patience", T, "block_patience", type=click.IntRange(min=1),
         help="Epochs in a row without a --block-min-gain gain that stop a map's block stage."),
    Bound("--block-judge", T, "block_judge", type=choice(BLOCK_JUDGES),
         help="learned: whose block loss stops a map's block stage: held-out, the held-out part's (the map "
              "keeps its best held-out epoch, or its start); calibration, the training batches' own (the last "
              "epoch is kept)."),
    Bound("--block-loss", T, "block_loss", type=choice(BLOCK_LOSSES),
         help="learned: a block that ends at a later map scores its squared error there: mse, plain (over the "
              "map's mean square); fisher, weighted by the network's output Fisher information at that map (the "
              "directions its predictions depend on). Blocks ending at the outputs "
              "score the distillation loss either way."),
    Bound("--block-init", T, "block_init", type=choice(BLOCK_INITS), shown_default="fisher",
         help="The block stage's start per map: fisher, the closed-form rank-k least-squares map from the map "
              "as the compressed network computes it to the original's map, its error weighted by the "
              "network's output Fisher information there (the directions its predictions depend on); "
              "lstsq, the same map unweighted; or pca, the map's own principal components."),
    Bound("--block-ridge", T, "block_ridge", type=click.FloatRange(min=0), metavar="FLOAT",
         shown_default="1e-3 with --int8 or --act-bytes 1, else 1e-6",
         help="Damping of the fisher and lstsq starts, relative to each map's mean eigenvalue: larger bounds the gains "
              "it puts on the map's weak directions, which int8 rounding needs (docs/results.md, section 7)."),
    Bound("--block-augment", T, "block_augment", type=choice(BLOCK_AUGMENTATIONS),
         help="look: half the block stage's calibration samples are given another look (polarity, colours, "
              "contrast, a shading ramp, blur, noise), so that projections fitted on lines of one look hold "
              "on others; copies: the stage also fits to a light and a strong (--augment's kinds, made for text "
              "lines) copy of every sample, for three times its time and memory; none: the samples as given; auto: copies "
              "where the plan compresses the maps five-fold or more (a recognizer at 8x) and the memory they take "
              "is free (the log says when it is not), else none."),
    Bound("--block-precision", T, "block_precision", type=choice(BLOCK_PRECISIONS),
         help="The block stage's arithmetic: bfloat16 runs its forward and backward under autocast (the "
              "projections stay float32); auto is bfloat16 where the device has it natively (AVX-512 BF16 or "
              "AMX, CUDA), else float32. On a CPU it bought little (docs/results.md, section 3)."),
    Bound("--block-lr", T, "block_lr", type=click.FloatRange(min=0, min_open=True),
         help="The block stage's learning rate, relative as --lr is: warmed up over each map's first epoch, "
              "then a cosine decay over its epochs."),
    Bound("--lr", T, "lr", type=click.FloatRange(min=0, min_open=True),
         help="Learning rate relative to each map's scale (a map of C channels steps at lr/sqrt(C)), "
              "cosine decay to 0 over the run."),
    Bound("--optimizer", T, "optimizer", type=choice(OPTIMIZERS)),
    Bound("--loss", T, "loss", type=choice(LOSSES),
         help="kd: distillation from the original's outputs (KL for class scores, per time step for "
              "sequences, MSE otherwise); ce: cross-entropy on the labels; kd+ce: both."),
    Bound("--schedule", T, "schedule", type=choice(SCHEDULES),
         help="joint: all maps at once; greedy: add one map a stage (--stage-epochs), then joint."),
    Bound("--stage-epochs", T, "stage_epochs", type=click.IntRange(min=1),
         help="Greedy schedule: epochs per added map."),
    Bound("--max-samples", T, "max_samples", type=click.IntRange(min=1),
         help="Samples per epoch (a seeded subset of the calibration part) [default: all]."),
    Bound("--augment", T, "augment", type=choice(AUGMENTATIONS),
         help="light: small shifts and noise on every training batch; splice: also half the samples take "
              "part of their width from another sample (new text lines for distillation), then light; "
              "strong: splice, then each image stretched along its width and its contrast and brightness "
              "changed, then light (the README gives the ranges)."),
    Bound("--feature-weight", T, "feature_weight", type=click.FloatRange(min=0),
         help="Weight of feature distillation at the projected maps: each projected map's relative error "
              "against --feature-reference."),
    Bound("--feature-reference", T, "feature_reference", type=choice(FEATURE_REFERENCES),
         help="teacher: the map the original computes there from the same input; self: the map's own "
              "input (each projection's reconstruction error alone)."),
    Bound("--device", T, "device", type=choice(DEVICES), help="Where to train: auto = CUDA when available."),
    Bound("--target", T, "target", type=click.FloatRange(0, 1, min_open=True), metavar="FLOAT",
         help="Stop once the held-out score (accuracy with labels, else top-1 agreement, else cosine) "
              "reaches this; otherwise the best epoch is kept."),
    Bound("--patience", T, "patience", type=click.IntRange(min=0),
         help="Stop training once this many epochs in a row, after the --probe epochs, have not raised "
              "the best held-out score (0: never)."),
    Bound("--probe", T, "probe", type=click.IntRange(min=0),
         help="After this many epochs, stop training and keep the start when none beat its held-out score "
              "and the held-out distillation loss has risen several times over; at once after any of them, "
              "or after the first epoch's first four steps, that scores more than 0.15 of the start's score below "
              "it (0: never probe)."),
    Bound("--fake-quant", T, "fake_quant", is_flag=True,
         help="learned/random: round every stored map P x as --int8 stores it while training "
              "(quantization-aware, straight-through gradient). Measured on PP-OCR's classifier it did not pay "
              "on the lines it was tuned on (docs/results.md), so it is off by default."),
    Bound("--resume", C, "resume", is_flag=True,
         help="Continue a stopped run from its checkpoint (the default one of the same MODEL and output, "
              "or --checkpoint)."),
    Bound("--checkpoint", C, "checkpoint", type=click.Path(dir_okay=False, path_type=Path),
         shown_default="a file per MODEL and output under $XDG_CACHE_HOME/fmcompress/checkpoints, "
                       "~/.cache when unset",
         help="Training checkpoint, written after every epoch; deleted when the run ends, unless it was "
              "interrupted (Ctrl-C)."),
)

BUDGET = (  # what `compile` fits to
    Bound("--ceiling", C, "ceiling", help=CEILING_HELP + " Required unless --traffic is given."),
    Bound("--traffic", C, "traffic",
         help="Budget on the total bytes of the stored feature maps (every stored map between kernel "
              "groups; graph inputs and outputs excluded): a ratio of that total (3x) or a size (2MB). "
              "Ranks are allocated greedily per map; with --ceiling both hold."),
    Bound("--peak", C, "peak", metavar="SIZE",
         help="Keep onnxruntime's live peak (every allocation alive at once in its execution order; graph "
              "inputs excepted, outputs counted) at or under SIZE (512KB): the per-allocation ceiling that "
              "tiling works to is searched, projections only where tiling alone cannot get there; 'lossless': "
              "the smallest peak tiling alone reaches, nothing projected (what --int8 alone does). Implies "
              "--runtime ort; with --ceiling, that is the largest ceiling allowed; with --int8, the int8 model's "
              "peak. The emitted model's peak is measured in a fresh process (--ort-level, default all): over "
              "SIZE fails, nothing written."),
    Bound("--objective", C, "objective", type=choice(OBJECTIVES),
         help="With --traffic: traffic+latency prefers maps whose projections fold into convs (no "
              "explicit 1x1 U before a depthwise conv or other non-foldable reader)."),
    Bound("--latency-weight", C, "latency_weight", type=click.FloatRange(min=0),
         help="With --objective traffic+latency: how much a projection that needs explicit 1x1 convs "
              "costs, per unit of its MACs as a share of the model's, against held-out fidelity (0 is "
              "--objective traffic; lower it where small models lose accuracy to the latency term)."),
)

METHOD = Bound("--method", C, "method", type=choice(METHODS),
              help="How projections are found: pca = top-k eigenvectors of the channel second moment; "
                   "learned = pca, then trained end to end through the frozen network; random = random "
                   "orthonormal, then trained.")

GATES = (
    Bound("--min-agreement", C, "min_agreement", type=click.FloatRange(0, 1), metavar="FLOAT",
         help="Fidelity gate: fail (exit 1, nothing written) when the held-out top-1 agreement with the "
              "original (for [N, T, classes] sequence heads: the share of equal greedy CTC decodings, spaces left "
              "out where the model's metadata names its dictionary, as PaddleOCR's recognizers do) is "
              "below this (0..1, e.g. 0.99)."),
    Bound("--max-accuracy-drop", C, "max_accuracy_drop", type=click.FloatRange(min=0), metavar="POINTS",
         help="Fidelity gate: fail (exit 1, nothing written) when accuracy drops by more than this many "
              "points (needs labels in --data)."),
    Bound("--runtime", C, "runtime", type=choice(RUNTIMES),
         help="Make the ceiling hold for what this runtime allocates, not only for the stored maps: ort = "
              "onnxruntime. Spatially local chains are computed in row bands (exact), and only the ends "
              "of bands that cannot fit are projected; the report gives the runtime peak before and "
              "after, computed and measured."),
    Bound("--ort-level", C, "ort_level", type=choice(ORT_LEVELS),
         help="onnxruntime's graph optimisations: the level of the report's runtime figures (default all, "
              "what a session a user opens runs) and the level --runtime ort plans for (default extended)."),
    Bound("--int8", C, "int8", is_flag=True,
         help="Emit an int8 model: plan every stored map at one byte, then quantize the verified model with "
              "onnxruntime's quantize_static (QDQ, per-channel int8 weights, uint8 activations, calibrated on the "
              "calibration samples). The fidelity gates apply to the int8 model; the report's int8 section lists "
              "the nodes onnxruntime still runs in float on feature maps. Alone (no --ceiling, --traffic or "
              "--peak): --peak lossless, the original quantized and tiled for its smallest lossless peak."),
    Bound("--calibrate", C, "calibrate", type=choice(CALIBRATIONS),
         help="With --int8: how activation ranges are set from the calibration samples (onnxruntime's "
              "calibrators): minmax = the extremes seen; percentile = the 99.999th percentile of |x|, so that "
              "rare outliers do not stretch the range; entropy = the range that keeps the histogram's "
              "information (slow); auto = minmax and percentile both tried, the one whose int8 model scores "
              "better on the held-out part kept (docs/int8.md)."),
)

PLACEMENT = Bound("--placement", C, "placement", type=choice(PLACEMENTS),
                  help="Where a map whose kernel group ends in an activation (Conv, BatchNorm, ReLU or "
                       "HardSwish) is projected. pointwise (default) = before the activation where the "
                       "group's conv is a 1x1 conv (its output is low-rank there), at the map elsewhere; "
                       "before = before the activation wherever the graph allows; after = at the stored map "
                       "itself, as the paper does. Before the activation the stored map is P T and U plus the "
                       "activation run in the map's reader (an explicit 1x1 U, which no longer folds into the "
                       "next conv). --runtime, --peak and --traffic project after.")

ALL = (*DATA, *TRAINING, *BUDGET, METHOD, PLACEMENT, *GATES)


def apply(*declarations: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Several click decorators as one, listed in the order --help shows them."""

    def decorate(command: Any) -> Any:
        for declaration in reversed(declarations):
            command = declaration(command)
        return command

    return decorate


def bound_options(rows: Iterable[Bound]) -> Callable[[Any], Any]:
    return apply(*(row.option() for row in rows))


def data_options(num_samples: int | None = None, num_samples_help: str | None = None) -> Callable[[Any], Any]:
    """DATA, with another default and help for --num-samples where a command needs one (verify)."""
    return apply(*(row.option(default=FROM_FIELD if num_samples is None else num_samples, help=num_samples_help)
                   if row.field == "num_samples" else row.option() for row in DATA))


def field_values(rows: Iterable[Bound], collected: dict[str, Any]) -> dict[str, Any]:
    """The collected values of these rows, converted for their fields (input_shapes -> a list)."""
    return {row.field: row.value(collected) for row in rows}


def compile_options(collected: dict[str, Any], **fixed: Any) -> CompileOptions:
    """CompileOptions (with its TrainConfig) from every bound option; `fixed` gives the fields the
    command derives (the checkpoint it chose, the progress monitor)."""
    training = TrainConfig(**field_values((row for row in ALL if row.owner is TrainConfig), collected))
    values = field_values((row for row in ALL if row.owner is CompileOptions), collected)
    return CompileOptions(**{**values, "training": training, **fixed})


def row(field: str) -> Bound:
    """The row of a field, for a command that takes the same option for another purpose (analyze)."""
    return next(bound for bound in ALL if bound.field == field)
