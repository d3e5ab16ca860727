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


if __name__ == "__main__":
    main()
