"""The `fmcompress` command line (click).

Exit codes: 0 success; 1 a broken ceiling or failed verification (CI gate);
2 usage or input error; 130 interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_INTERRUPTED, EXIT_USAGE, FmcError, InputError
from .report import DEFAULT_ORT_LEVEL, ORT_LEVELS
from .training import AUGMENTATIONS, DEVICES, FEATURE_REFERENCES, LOSSES, OPTIMIZERS, SCHEDULES

CEILING_HELP = (
    "Memory ceiling per stored feature map: a size (256KB, 256KiB, 0.25MB, 262144) "
    "or a ratio of the largest compressible stored map (4x; graph inputs, outputs and integer "
    "maps do not count). KB = KiB = 1024 bytes."
)
INPUT_SHAPE_HELP = (
    "Pin an input's shape: NAME=1,3,224,224, or bare dims (1,3,224,224) for a "
    "single-input model. Repeat for several inputs."
)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _warn(messages: Any) -> None:
    """Every warning as `warning: ...` on stderr (also with -q)."""
    for message in messages or []:
        click.echo(f"warning: {_one_line(message)}", err=True)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn FmcError into a one-line message and its exit code; Ctrl-C into 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FmcError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", EXIT_INTERRUPTED)
        except MemoryError:
            _fail("out of memory", EXIT_USAGE)
        except OSError as exc:  # a safety net: an OS failure is one line, not a traceback
            if exc.errno == errno.EPIPE:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}", EXIT_USAGE)

    return wrapper


def _click_message(exc: click.ClickException) -> str:
    """click's message on one line, lower-case like ours, with where to find help."""
    message = _one_line(exc.format_message()).rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


class _Group(click.Group):
    """Shows click's own errors (usage, bad values, unknown options or commands) as one
    `error: ...` line with click's exit code (2 for usage errors); --help stays as it is."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            _fail(_click_message(exc), exc.exit_code)
        except click.Abort:
            _fail("interrupted; nothing was written", EXIT_INTERRUPTED)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            sys.exit(1)  # stdout closed early (`| head`): click's behaviour
        sys.exit(code if isinstance(code, int) else 0)  # --help and --version return their exit code


@click.group(cls=_Group, no_args_is_help=False, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmcompress")
def main() -> None:
    """Make every feature map of a CNN fit under a memory ceiling.

    \b
    fmcompress analyze model.onnx --ceiling 256KB   # which maps break it
    fmcompress compile model.onnx --ceiling 256KB   # -> model.fmc.onnx
    fmcompress verify model.onnx model.fmc.onnx     # checks and fidelity
    fmcompress export resnet18 --input-shape 1,3,224,224 -o r18.onnx
    """


REPORT_FILES = ("report.json", "report.md", "memory.png")  # what compiler.write_report writes


def _check_outputs(outputs: list[tuple[Path | None, str]], inputs: list[Path | None]) -> None:
    """Every output path checked before any work (modelio.check_output_path), and no two the same."""
    from .modelio import check_output_path

    seen: dict[str, Path] = {}
    for path, kind in outputs:
        if path is None:
            continue
        check_output_path(path, kind, inputs=inputs)
        files = [path] if kind == "file" else [path / name for name in REPORT_FILES]
        if kind == "dir":
            for file in files:
                check_output_path(file, "file", inputs=inputs)
        for file in files:
            key = os.path.realpath(file)
            if key in seen:
                raise click.UsageError(f"{seen[key]} and {file} are the same file; give different outputs")
            seen[key] = file


def _options(*declarations: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(command: Any) -> Any:
        for declaration in reversed(declarations):
            command = declaration(command)
        return command

    return apply


def data_options(num_samples: int) -> Callable[[Any], Any]:
    """The input and data options `compile` and `verify` share (one declaration for both)."""
    return _options(
        click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]DIMS", help=INPUT_SHAPE_HELP),
        click.option("--act-bytes", type=click.IntRange(min=1, max=8),
                     help="Bytes per element instead of the stored dtype's (1 to plan int8)."),
        click.option("--data", type=click.Path(path_type=Path),
                     help="Data: an .npz (one array per input, optional `labels`), a folder of images (class "
                          "subfolders give labels), or `mnist` (the trained demo's labelled test split; it carries "
                          "its own normalisation). Default: surrogate photographs shipped with scikit-image."),
        click.option("--num-samples", type=click.IntRange(min=2), default=num_samples, show_default=True,
                     help="Samples to use (a quarter is held out for the fidelity figures)."),
        click.option("--mean", help="Image normalisation mean per channel [default: 0.485,0.456,0.406]."),
        click.option("--std", help="Image normalisation std per channel [default: 0.229,0.224,0.225]."),
        click.option("--scale", type=float, help="Pixel scale before normalisation [default: 1/255]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the data split and subsampling."),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="onnxruntime intra-op threads (latency figures)."),
    )


def training_options() -> Callable[[Any], Any]:
    """The settings of `--method learned|random` (fmcompress.training.TrainConfig)."""
    return _options(
        click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Training epochs over the calibration part (after the greedy stages)."),
        click.option("--block-epochs", type=click.IntRange(min=0), default=12, show_default=True,
                     help="learned: first refine each projection, in network order, to reproduce what the "
                          "original computes after its block (the next compressed map, or the outputs), "
                          "for this many epochs per map; 0 starts end-to-end training from plain PCA. "
                          "Harder ceilings need more (PP-OCR's recognizer at 8x: 64)."),
        click.option("--block-lr", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True,
                     help="The block stage's learning rate, relative as --lr is, cosine decay over each map's "
                          "epochs."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True,
                     help="Learning rate relative to each map's scale (a map of C channels steps at "
                          "lr/sqrt(C)), cosine decay to 0 over the run."),
        click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="adam", show_default=True),
        click.option("--loss", type=click.Choice(list(LOSSES)), default="kd", show_default=True,
                     help="kd: distillation from the original's outputs (KL for class scores, per time step "
                          "for sequences, MSE otherwise); ce: cross-entropy on the labels; kd+ce: both."),
        click.option("--schedule", type=click.Choice(list(SCHEDULES)), default="joint", show_default=True,
                     help="joint: all maps at once; greedy: add one map a stage (--stage-epochs), then joint."),
        click.option("--stage-epochs", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Greedy schedule: epochs per added map."),
        click.option("--max-samples", type=click.IntRange(min=1),
                     help="Samples per epoch (a seeded subset of the calibration part) [default: all]."),
        click.option("--augment", type=click.Choice(list(AUGMENTATIONS)), default="light", show_default=True,
                     help="light: shifts of up to 2 positions and 2% noise on every training batch; splice: "
                          "also half the samples take 20-50% of their width from another sample (new text "
                          "lines for distillation), then light; strong: splice, then each image stretched "
                          "0.8-1.25x along its width and its contrast and brightness changed, then light."),
        click.option("--feature-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Weight of feature distillation at the projected maps: each projected map's "
                          "relative error against --feature-reference."),
        click.option("--feature-reference", type=click.Choice(list(FEATURE_REFERENCES)), default="teacher",
                     show_default=True,
                     help="teacher: the map the original computes there from the same input; self: the "
                          "map's own input (each projection's reconstruction error alone)."),
        click.option("--device", type=click.Choice(list(DEVICES)), default="auto", show_default=True,
                     help="Where to train: auto = CUDA when available."),
        click.option("--target", type=click.FloatRange(0, 1, min_open=True), metavar="FLOAT",
                     help="Stop once the held-out score (accuracy with labels, else top-1 agreement, else "
                          "cosine) reaches this; otherwise the best epoch is kept."),
        click.option("--resume", is_flag=True,
                     help="Continue a stopped run from its checkpoint (OUTPUT.ckpt, or --checkpoint)."),
        click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                     help="Training checkpoint, written after every epoch [default: OUTPUT.ckpt; removed "
                          "after a successful compile]."),
        click.option("--json-log", type=click.Path(dir_okay=False, path_type=Path),
                     help="Write training progress as JSON lines (one event a line) to this file."),
    )


def _normalisation(mean: str | None, std: str | None, scale: float | None) -> dict[str, Any]:
    from .data import DEFAULT_MEAN, DEFAULT_SCALE, DEFAULT_STD

    return {"mean": _floats(mean, "--mean") or DEFAULT_MEAN, "std": _floats(std, "--std") or DEFAULT_STD,
            "scale": DEFAULT_SCALE if scale is None else scale}


def _not_compressible_note(entries: Any, ceiling_bytes: int | None) -> str:
    """`; not compressible and above the ceiling: output 'probs' (1.0 MiB), ...` or ''."""
    from .units import format_bytes

    parts = []
    for entry in entries or []:
        if isinstance(entry, str):
            parts.append(f"'{entry}'")
            continue
        size = entry.get("bytes")
        if ceiling_bytes is not None and size is not None and size <= ceiling_bytes:
            continue
        role = entry.get("role", "tensor")
        parts.append(f"{role} '{entry.get('name')}'" + (f" ({format_bytes(size)})" if size is not None else ""))
    if not parts:
        return ""
    shown = ", ".join(parts[:5]) + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")
    return f"; not compressible and above the ceiling: {shown}"


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ceiling", help=CEILING_HELP)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]DIMS", help=INPUT_SHAPE_HELP)
@click.option("--mode", type=click.Choice(["stored", "live", "strict", "runtime"]), default="stored",
              show_default=True,
              help="Which view the table lists: stored feature maps (kernel groups fused), "
                   "the live set along the execution order, every ONNX tensor, or what onnxruntime "
                   "allocates (after its own fusions, in its execution order; --fail-over-ceiling then "
                   "gates on those).")
@click.option("--ort-level", type=click.Choice(ORT_LEVELS), default=DEFAULT_ORT_LEVEL, show_default=True,
              help="onnxruntime's graph optimisations for the runtime view: extended (its portable fusions), "
                   "all (adds the x86-only NCHWc layout), basic, none.")
@click.option("--act-bytes", type=click.IntRange(min=1, max=8), help="Bytes per element instead of the stored dtype's (1 to plan int8).")
@click.option("--top", type=click.IntRange(min=1), help="List only the N largest feature maps.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG of map sizes and live memory.")
@click.option("--fail-over-ceiling", is_flag=True, help="Exit 1 when a stored feature map exceeds the ceiling (CI gate).")
@click.option("--include-inputs", is_flag=True, help="Let graph inputs, outputs and integer maps above the ceiling trip --fail-over-ceiling.")
@click.option("-q", "--quiet", is_flag=True, help="No table; only errors and the gate's verdict.")
@handle_errors
def analyze(model: Path, ceiling: str | None, input_shapes: tuple[str, ...], mode: str, ort_level: str,
            act_bytes: int | None, top: int | None, json_path: Path | None, plot_path: Path | None, fail_over_ceiling: bool,
            include_inputs: bool, quiet: bool) -> None:
    """Find the feature maps of MODEL above a memory ceiling (the peak-memory analysis pass)."""
    from . import api
    from . import render as report
    from .modelio import output_transaction

    if fail_over_ceiling and not ceiling:
        raise click.UsageError("--fail-over-ceiling needs --ceiling")
    _check_outputs([(json_path, "file"), (plot_path, "file")], [model])
    options = {"ceiling": ceiling, "input_shapes": list(input_shapes), "act_bytes": act_bytes}
    try:  # the runtime view is in every summary; only --mode runtime needs onnxruntime to load the model
        result = api.analyze(model, runtime=ort_level, **options)
    except InputError:
        if mode == "runtime":
            raise
        result = api.analyze(model, **options)
    with output_transaction():  # the JSON and the plot land together or not at all
        if json_path:
            result.write_json(json_path)
        if plot_path:
            report.plot_memory(result, plot_path)
    if not quiet:
        report.print_analysis(result, mode=mode, top=top)
    if fail_over_ceiling:
        runtime = mode == "runtime" and result.runtime is not None
        offenders = result.runtime.over_ceiling() if runtime else result.over_ceiling(include_inputs=include_inputs)
        if offenders:
            names = ", ".join(m.name for m in offenders[:10]) + (" ..." if len(offenders) > 10 else "")
            what = "onnxruntime allocation(s)" if runtime else "stored feature map(s)"
            _fail(f"{len(offenders)} {what} above the ceiling of {result.ceiling_bytes} bytes: {names}", 1)


@main.command()
@click.argument("source")
@click.option("--input-shape", required=True, metavar="DIMS", help="Input shape to export with, e.g. 1,3,224,224.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Where to write the ONNX file.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="A state_dict file, loaded with torch.load(weights_only=True). Without it the zoo "
                   "models are untrained (seeded random weights).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17 to 23).")
@handle_errors
def export(source: str, input_shape: str, output: Path, weights: Path | None, opset: int) -> None:
    """Export a PyTorch model to ONNX (eval mode, BatchNorm folded), checked against torch.

    SOURCE is a zoo name (resnet18, vgg16_bn, mobilenet_v2, and their _small
    variants) or an importable factory `package.module:function`. The zoo models
    are untrained (seeded random weights) unless --weights is given.

    The batch dim is dynamic unless the graph fixes it (checked by one run at
    another batch size): then it is exported with the given batch, and a warning says so.
    """
    from . import frontend
    from .shapes import parse_dims

    _check_outputs([(output, "file")], [weights])
    result = frontend.export_model(source, parse_dims(input_shape), output, weights=weights, opset=opset)
    _warn(result.warnings)
    click.echo(f"wrote {result.path} (onnxruntime vs torch: max abs difference {result.max_abs_diff:.3g})")


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, got {text!r}",
                                 ctx=click.get_current_context(silent=True)) from None
    if what == "--std" and any(v <= 0 for v in values):
        raise click.BadParameter("--std values must be positive", ctx=click.get_current_context(silent=True))
    return values


def _default_output(model: Path) -> Path:
    return model.with_name(model.name[: -len(".onnx")] + ".fmc.onnx" if model.name.endswith(".onnx")
                           else model.name + ".fmc.onnx")


@main.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ceiling", help=CEILING_HELP + " Required unless --traffic is given.")
@click.option("--traffic", help="Budget on the total bytes of the stored feature maps (every stored map between "
                                "kernel groups; graph inputs and outputs excluded): a ratio of that total (3x) or a "
                                "size (2MB). Ranks are allocated greedily per map; with --ceiling both hold.")
@click.option("--objective", type=click.Choice(["traffic", "traffic+latency"]), default="traffic",
              show_default=True, help="With --traffic: traffic+latency prefers maps whose projections fold into "
                                      "convs (no explicit 1x1 U before a depthwise conv or other non-foldable reader).")
@click.option("--latency-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="With --objective traffic+latency: how much a projection that needs explicit 1x1 convs "
                   "costs, per unit of its MACs as a share of the model's, against held-out fidelity (0 is "
                   "--objective traffic; lower it where small models lose accuracy to the latency term).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the compressed model [default: MODEL.fmc.onnx].")
@click.option("--method", type=click.Choice(["learned", "pca", "random"]), default="learned", show_default=True,
              help="How projections are found: pca = top-k eigenvectors of the channel second moment; "
                   "learned = pca, then trained end to end through the frozen network; random = random "
                   "orthonormal, then trained.")
@data_options(num_samples=256)
@training_options()
@click.option("--min-agreement", type=click.FloatRange(0, 1), metavar="FLOAT",
              help="Fidelity gate: fail (exit 1, nothing written) when the held-out top-1 agreement with "
                   "the original (for [N, T, classes] sequence heads: the share of equal greedy CTC "
                   "decodings) is below this (0..1, e.g. 0.99).")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), metavar="POINTS",
              help="Fidelity gate: fail (exit 1, nothing written) when accuracy drops by more than this many "
                   "points (needs labels in --data).")
@click.option("--runtime", type=click.Choice(["ort"]),
              help="Make the ceiling hold for what this runtime allocates, not only for the stored maps: "
                   "ort = onnxruntime. Spatially local chains are computed in row bands (exact), and only the "
                   "ends of bands that cannot fit are projected; the report gives the runtime peak before and "
                   "after, computed and measured.")
@click.option("--ort-level", type=click.Choice(ORT_LEVELS), default=DEFAULT_ORT_LEVEL, show_default=True,
              help="onnxruntime's graph optimisations that --runtime ort plans for.")
@click.option("--plan-only", is_flag=True, help="Only plan (maps and ranks); with --json, write the plan there.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report (or the plan with --plan-only) as JSON.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write report.json, report.md and memory.png into this folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@handle_errors
def compile_command(model: Path, ceiling: str | None, traffic: str | None, objective: str, latency_weight: float,
                    output: Path | None, method: str, input_shapes: tuple[str, ...],
                    act_bytes: int | None, data: Path | None, num_samples: int, mean: str | None,
                    std: str | None, scale: float | None, batch_size: int, seed: int, threads: int,
                    epochs: int, block_epochs: int, block_lr: float, lr: float, optimizer: str, loss: str,
                    schedule: str, stage_epochs: int, max_samples: int | None, augment: str, feature_weight: float,
                    feature_reference: str, device: str,
                    target: float | None, resume: bool, checkpoint: Path | None, json_log: Path | None,
                    min_agreement: float | None, max_accuracy_drop: float | None, runtime: str | None,
                    ort_level: str, plan_only: bool,
                    json_path: Path | None, report_dir: Path | None, quiet: bool) -> None:
    """Compress MODEL so that every stored feature map fits under --ceiling (and/or their total under --traffic).

    Plans a rank per map above the ceiling, fits projections on calibration data,
    folds them into the graph, verifies the result (onnx.checker, onnxruntime,
    agreement with the training backend, the ceiling, the fidelity gates) and writes it
    atomically. Graph inputs and outputs are never compressed: the last line names those
    above the ceiling.
    """

    from .compiler import CompileOptions
    from .errors import Interrupted
    from .render import training_monitor
    from .training import TrainConfig

    if ceiling is None and traffic is None:
        raise click.UsageError("missing option '--ceiling' (or '--traffic')", ctx=click.get_current_context())
    output = output or _default_output(model)
    trains = method != "pca" and not plan_only
    checkpoint = (checkpoint or _default_checkpoint(model, output)) if trains else None
    primary = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes and talks
    quiet = quiet or not primary
    _check_outputs([(None if plan_only else output, "file"), (json_path, "file"),
                    (None if plan_only else report_dir, "dir"), (checkpoint, "file"), (json_log, "file")],
                   [model, data])
    training = TrainConfig(epochs=epochs, block_epochs=block_epochs, block_lr=block_lr, lr=lr, optimizer=optimizer,
                           loss=loss, schedule=schedule, stage_epochs=stage_epochs, max_samples=max_samples, augment=augment,
                           feature_weight=feature_weight, feature_reference=feature_reference, device=device,
                           target=target)
    log = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    interrupted = False
    try:
        with training_monitor(quiet=quiet, json_log=json_log if primary else None, log=log) as monitor:
            options = CompileOptions(
                ceiling=ceiling, input_shapes=list(input_shapes), act_bytes=act_bytes, method=method, data=data,
                num_samples=num_samples, **_normalisation(mean, std, scale), batch_size=batch_size, seed=seed,
                threads=threads, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop,
                training=training, checkpoint=checkpoint if primary else None, resume=resume, monitor=monitor,
                runtime=runtime, ort_level=ort_level, traffic=traffic, objective=objective,
                latency_weight=latency_weight)
            result = _compile_resumably(model, options, plan_only, log, checkpoint)
        if primary:
            _write_compile_outputs(result, output, json_path, report_dir, plan_only)
    except Interrupted:
        interrupted = True
        raise
    finally:
        if checkpoint is not None and primary and not interrupted:
            checkpoint.unlink(missing_ok=True)  # only an interrupted run keeps its checkpoint


def _write_compile_outputs(result: Any, output: Path, json_path: Path | None, report_dir: Path | None,
                           plan_only: bool) -> None:
    import json

    from .compiler import write_report
    from .modelio import output_transaction, save_model_atomic, write_bytes_atomic

    _warn(result.report.get("warnings", []))
    ceiling_bytes = result.plan.ceiling_bytes
    blocked = _not_compressible_note(result.report.get("not_compressible", result.plan.not_compressible),
                                     ceiling_bytes)
    if plan_only:
        if json_path:
            plan = result.plan.to_dict()
            for key in ("runtime_plan", "allocation"):
                if key in result.report:
                    plan[key] = result.report[key]
            write_bytes_atomic(json.dumps(plan, indent=2).encode(), json_path)
        for entry in result.plan.maps:
            click.echo(f"{entry.name}  {'x'.join(map(str, entry.shape))}  k={entry.k}")
        if not result.plan.maps:
            click.echo(f"nothing to compress: every compressible stored map is at or under {ceiling_bytes} B"
                       f"{blocked}")
        return
    with output_transaction():  # the model, the JSON and the report land together or not at all
        save_model_atomic(result.model, output)
        if json_path:
            write_bytes_atomic(json.dumps(result.report, indent=2).encode(), json_path)
        if report_dir:
            write_report(result, report_dir)
    click.echo(f"wrote {output}: {len(result.plan.maps)} map(s) compressed; every compressible stored map <= "
               f"{ceiling_bytes} B{_traffic_note(result.report.get('allocation'))}{blocked}")


def _traffic_note(allocation: dict[str, Any] | None) -> str:
    """`; stored traffic 229.0 KiB -> 76.1 KiB (3.01x, budget 3x)` or ''."""
    if not allocation:
        return ""
    from .units import format_bytes

    return (f"; stored traffic {format_bytes(allocation['traffic_before_bytes'])} -> "
            f"{format_bytes(allocation['traffic_after_bytes'])} ({allocation['traffic_ratio']:.2f}x, budget "
            f"{allocation['budget']})")


def _compile_resumably(model: Path, options: Any, plan_only: bool, log: Callable[[str], None],
                       checkpoint: Path | None) -> Any:
    """compile_model; on Ctrl-C during training, say where the checkpoint is and how to resume."""
    from .compiler import compile_model
    from .errors import Interrupted

    try:
        return compile_model(model, options, plan_only=plan_only, log=log)
    except KeyboardInterrupt:
        if checkpoint is not None and checkpoint.exists():
            raise Interrupted(f"interrupted; no model was written. The training checkpoint {checkpoint} holds the "
                              "last finished epoch: run the same command with --resume to continue") from None
        raise


def _default_checkpoint(model: Path, output: Path) -> Path:
    """A per-(model, output) file in the user's cache, so that nothing appears beside the output
    before it is written, and `--resume` finds the run again."""
    key = hashlib.sha256(f"{model.resolve()}\0{output.resolve()}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fmcompress" / "checkpoints" / f"{output.name}.{key}.ckpt"


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]DIMS", help=INPUT_SHAPE_HELP)
@click.option("--data", type=click.Path(path_type=Path),
              help="Inputs to run: an .npz, a folder of images, or `mnist`; default: surrogate photographs.")
@click.option("--num-samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples to run (every stored map of each is coded).")
@click.option("--window", type=click.IntRange(1, 255), default=8, show_default=True,
              help="DC-AC: how many previous planes of the same map may serve as a plane's reference.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the codec report as JSON.")
@handle_errors
def codec(model: Path, input_shapes: tuple[str, ...], data: Path | None, num_samples: int, window: int,
          json_path: Path | None) -> None:
    """How many bits per element MODEL's stored maps need under lossless int8 coding.

    Each stored feature map is quantised to int8 (per-tensor scale from these samples)
    and coded plane by plane: raw (8 bits), zstd, a per-plane entropy coder (baseline)
    and DC-AC (each plane as the residual from the most similar of the previous
    --window planes, where that is shorter). Works on compiled models too, so projection
    and lossless coding stack. See docs/codec.md.
    """
    from . import codec as lossless
    from .data import input_specs, load_dataset
    from .modelio import load_model, write_bytes_atomic
    from .render import print_codec
    from .shapes import parse_input_shapes, resolve_input_shapes

    _check_outputs([(json_path, "file")], [model, data])
    proto = load_model(model)
    shapes = resolve_input_shapes(proto, parse_input_shapes(list(input_shapes), proto))
    dataset = load_dataset(data, input_specs(proto, shapes), num_samples=num_samples)
    report = lossless.measure_model(proto, dataset.batches(1), window=window, input_shapes=list(input_shapes))
    report.source = str(model)
    if json_path:
        import json

        write_bytes_atomic(json.dumps(report.to_dict(), indent=2).encode(), json_path)
    print_codec(report)


@main.command()
@click.argument("original", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("compressed", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ceiling", help=CEILING_HELP + " Default: the ceiling recorded in COMPRESSED's metadata.")
@data_options(num_samples=64)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the figures as JSON.")
@handle_errors
def verify(original: Path, compressed: Path, ceiling: str | None, input_shapes: tuple[str, ...],
           act_bytes: int | None, data: Path | None, num_samples: int, mean: str | None, std: str | None,
           scale: float | None, batch_size: int, seed: int, threads: int, json_path: Path | None) -> None:
    """Check COMPRESSED against ORIGINAL: onnx.checker, the ceiling, fidelity. Exit 1 if the ceiling is broken."""
    import json

    from .compiler import verify_pair
    from .errors import CeilingError
    from .modelio import write_bytes_atomic

    _check_outputs([(json_path, "file")], [original, compressed, data])
    figures = verify_pair(original, compressed, ceiling=ceiling, input_shapes=list(input_shapes), data=data,
                          num_samples=num_samples, batch_size=batch_size, act_bytes=act_bytes,
                          **_normalisation(mean, std, scale), seed=seed, threads=threads,
                          log=lambda message: click.echo(message, err=True))
    _warn(figures.get("warnings", []))
    if json_path:
        write_bytes_atomic(json.dumps(figures, indent=2).encode(), json_path)
    if figures["over_ceiling"]:
        raise CeilingError(f"{len(figures['over_ceiling'])} stored feature map(s) above the ceiling of "
                           f"{figures['ceiling_bytes']} B: {', '.join(figures['over_ceiling'][:10])}")
    if figures["ceiling_bytes"]:
        blocked = _not_compressible_note(figures.get("not_compressible", figures.get("not_compressible_over_ceiling")),
                                         figures["ceiling_bytes"])
        click.echo(f"ok: every compressible stored map <= {figures['ceiling_bytes']} B{blocked}")
    else:
        click.echo("ok: no ceiling given or recorded")


if __name__ == "__main__":
    main()
