"""The `fmcompress` command line (click).

Exit codes: 0 success; 1 a broken ceiling or failed verification (CI gate);
2 usage or input error; 130 interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_INTERRUPTED, EXIT_USAGE, FmcError

CEILING_HELP = (
    "Memory ceiling per stored feature map: a size (256KB, 256KiB, 0.25MB, 262144) "
    "or a ratio of the largest stored feature map (4x). KB = KiB = 1024 bytes."
)
INPUT_SHAPE_HELP = (
    "Pin an input's shape: NAME=1,3,224,224, or bare dims (1,3,224,224) for a "
    "single-input model. Repeat for several inputs."
)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


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

    return wrapper


class _Group(click.Group):
    """Shows click usage errors as one line, exit 2 (click's default code too)."""


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmcompress")
def main() -> None:
    """Make every feature map of a CNN fit under a memory ceiling.

    \b
    fmcompress analyze model.onnx --ceiling 256KB   # which maps break it
    fmcompress compile model.onnx --ceiling 256KB   # -> model.fmc.onnx
    fmcompress verify model.onnx model.fmc.onnx     # checks and fidelity
    fmcompress export resnet18 --input-shape 1,3,224,224 -o r18.onnx
    """


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ceiling", help=CEILING_HELP)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]DIMS", help=INPUT_SHAPE_HELP)
@click.option("--mode", type=click.Choice(["stored", "live", "strict"]), default="stored", show_default=True,
              help="Which view the table lists: stored feature maps (kernel groups fused), "
                   "the live set along the execution order, or every ONNX tensor.")
@click.option("--act-bytes", type=click.IntRange(min=1, max=8), help="Bytes per element instead of the stored dtype's (1 to plan int8).")
@click.option("--top", type=click.IntRange(min=1), help="List only the N largest feature maps.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG of map sizes and live memory.")
@click.option("--fail-over-ceiling", is_flag=True, help="Exit 1 when a stored feature map exceeds the ceiling (CI gate).")
@click.option("--include-inputs", is_flag=True, help="Let graph inputs above the ceiling trip --fail-over-ceiling.")
@click.option("-q", "--quiet", is_flag=True, help="No table; only errors and the gate's verdict.")
@handle_errors
def analyze(model: Path, ceiling: str | None, input_shapes: tuple[str, ...], mode: str, act_bytes: int | None,
            top: int | None, json_path: Path | None, plot_path: Path | None, fail_over_ceiling: bool,
            include_inputs: bool, quiet: bool) -> None:
    """Find the feature maps of MODEL above a memory ceiling (the peak-memory analysis pass)."""
    from . import api, report

    if fail_over_ceiling and not ceiling:
        raise click.UsageError("--fail-over-ceiling needs --ceiling")
    result = api.analyze(model, ceiling=ceiling, input_shapes=list(input_shapes), act_bytes=act_bytes)
    if json_path:
        result.write_json(json_path)
    if plot_path:
        report.plot_memory(result, plot_path)
    if not quiet:
        report.print_analysis(result, mode=mode, top=top)
    if fail_over_ceiling:
        offenders = result.over_ceiling(include_inputs=include_inputs)
        if offenders:
            names = ", ".join(m.name for m in offenders[:10]) + (" ..." if len(offenders) > 10 else "")
            _fail(f"{len(offenders)} stored feature map(s) above the ceiling of {result.ceiling_bytes} bytes: {names}", 1)


@main.command()
@click.argument("source")
@click.option("--input-shape", required=True, metavar="DIMS", help="Input shape to export with, e.g. 1,3,224,224.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Where to write the ONNX file.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="A state_dict file, loaded with torch.load(weights_only=True).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17 to 23).")
@handle_errors
def export(source: str, input_shape: str, output: Path, weights: Path | None, opset: int) -> None:
    """Export a PyTorch model to ONNX (eval mode, BatchNorm folded), checked against torch.

    SOURCE is a zoo name (resnet18, vgg16_bn, mobilenet_v2, and their _small
    variants) or an importable factory `package.module:function`.
    """
    from . import frontend
    from .shapes import parse_dims

    result = frontend.export_model(source, parse_dims(input_shape), output, weights=weights, opset=opset)
    click.echo(f"wrote {result.path} (onnxruntime vs torch: max abs difference {result.max_abs_diff:.3g})")


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if what == "--std" and any(v <= 0 for v in values):
        raise click.BadParameter("--std values must be positive")
    return values


def _default_output(model: Path) -> Path:
    return model.with_name(model.name[: -len(".onnx")] + ".fmc.onnx" if model.name.endswith(".onnx")
                           else model.name + ".fmc.onnx")


@main.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ceiling", required=True, help=CEILING_HELP)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the compressed model [default: MODEL.fmc.onnx].")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]DIMS", help=INPUT_SHAPE_HELP)
@click.option("--act-bytes", type=click.IntRange(min=1, max=8), help="Bytes per element instead of the stored dtype's.")
@click.option("--method", type=click.Choice(["pca"]), default="pca", show_default=True,
              help="How projections are found: pca = top-k eigenvectors of the channel second moment.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Calibration data: an .npz (one array per input, optional `labels`) or a folder of images "
                   "(class subfolders give labels). Default: surrogate photographs shipped with scikit-image.")
@click.option("--num-samples", type=click.IntRange(min=2), default=256, show_default=True,
              help="Samples to use (a quarter is held out for the fidelity figures).")
@click.option("--mean", help="Image normalisation mean per channel [default: 0.485,0.456,0.406].")
@click.option("--std", help="Image normalisation std per channel [default: 0.229,0.224,0.225].")
@click.option("--scale", type=float, help="Pixel scale before normalisation [default: 1/255].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data split and subsampling.")
@click.option("--plan-only", is_flag=True, help="Only plan (maps and ranks); with --json, write the plan there.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report (or the plan with --plan-only) as JSON.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write report.json, report.md and memory.png into this folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@handle_errors
def compile_command(model: Path, ceiling: str, output: Path | None, input_shapes: tuple[str, ...],
                    act_bytes: int | None, method: str, data: Path | None, num_samples: int, mean: str | None,
                    std: str | None, scale: float | None, batch_size: int, seed: int, plan_only: bool,
                    json_path: Path | None, report_dir: Path | None, quiet: bool) -> None:
    """Compress MODEL so that every stored feature map fits under --ceiling.

    Plans a rank per map above the ceiling, fits projections on calibration data,
    folds them into the graph, verifies the result (onnx.checker, onnxruntime,
    agreement with the training backend, the ceiling) and writes it atomically.
    """
    import json

    from .compiler import CompileOptions, compile_model, write_report
    from .data import DEFAULT_MEAN, DEFAULT_SCALE, DEFAULT_STD
    from .modelio import save_model_atomic, write_bytes_atomic

    output = output or _default_output(model)
    if not plan_only and output.resolve() == model.resolve():
        raise click.UsageError("the output would overwrite the input model; choose another -o")
    options = CompileOptions(
        ceiling=ceiling, input_shapes=list(input_shapes), act_bytes=act_bytes, method=method, data=data,
        num_samples=num_samples, mean=_floats(mean, "--mean") or DEFAULT_MEAN,
        std=_floats(std, "--std") or DEFAULT_STD, scale=DEFAULT_SCALE if scale is None else scale,
        batch_size=batch_size, seed=seed)
    log = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    result = compile_model(model, options, plan_only=plan_only, log=log)
    if plan_only:
        if json_path:
            write_bytes_atomic(json.dumps(result.plan.to_dict(), indent=2).encode(), json_path)
        for entry in result.plan.maps:
            click.echo(f"{entry.name}  {'x'.join(map(str, entry.shape))}  k={entry.k}")
        if not result.plan.maps:
            click.echo(f"nothing to compress: every stored map is at or under {result.plan.ceiling_bytes} B")
        return
    save_model_atomic(result.model, output)
    if json_path:
        write_bytes_atomic(json.dumps(result.report, indent=2).encode(), json_path)
    if report_dir:
        write_report(result, report_dir)
    click.echo(f"wrote {output}: {len(result.plan.maps)} map(s) compressed, every stored map <= "
               f"{result.plan.ceiling_bytes} B")


@main.command()
@click.argument("original", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("compressed", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ceiling", help=CEILING_HELP + " Default: the ceiling recorded in COMPRESSED's metadata.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]DIMS", help=INPUT_SHAPE_HELP)
@click.option("--data", type=click.Path(path_type=Path), help="Data as for compile (default: surrogate photographs).")
@click.option("--num-samples", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--act-bytes", type=click.IntRange(min=1, max=8), help="Bytes per element instead of the stored dtype's.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the figures as JSON.")
@handle_errors
def verify(original: Path, compressed: Path, ceiling: str | None, input_shapes: tuple[str, ...], data: Path | None,
           num_samples: int, act_bytes: int | None, json_path: Path | None) -> None:
    """Check COMPRESSED against ORIGINAL: onnx.checker, the ceiling, fidelity. Exit 1 if the ceiling is broken."""
    import json

    from .compiler import verify_pair
    from .errors import CeilingError
    from .modelio import write_bytes_atomic

    figures = verify_pair(original, compressed, ceiling=ceiling, input_shapes=list(input_shapes), data=data,
                          num_samples=num_samples, act_bytes=act_bytes,
                          log=lambda message: click.echo(message, err=True))
    if json_path:
        write_bytes_atomic(json.dumps(figures, indent=2).encode(), json_path)
    if figures["over_ceiling"]:
        raise CeilingError(f"{len(figures['over_ceiling'])} stored feature map(s) above the ceiling of "
                           f"{figures['ceiling_bytes']} B: {', '.join(figures['over_ceiling'][:10])}")
    ceiling_note = f"every stored map <= {figures['ceiling_bytes']} B" if figures["ceiling_bytes"] else "no ceiling given"
    click.echo(f"ok: {ceiling_note}")


if __name__ == "__main__":
    main()
