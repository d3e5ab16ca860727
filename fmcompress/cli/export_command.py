"""`fmcompress export`: a PyTorch model to ONNX, checked against torch."""

from __future__ import annotations

from pathlib import Path

import click

from .failures import handle_errors, warn
from .outputs import check_outputs


@click.command()
@click.argument("source", required=False)
@click.option("--list", "list_zoo", is_flag=True, help="List the zoo models with their input shapes and exit.")
@click.option("--input-shape", metavar="DIMS",
              help="Input shape to export with, e.g. 1,3,224,224. Default for a zoo model: its own "
                   "(`fmcompress export --list` shows them); required for a factory.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the ONNX file.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="A state_dict file, loaded with torch.load(weights_only=True). Without it the zoo "
                   "models are untrained (seeded random weights).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17 to 23).")
@handle_errors
def export(source: str | None, list_zoo: bool, input_shape: str | None, output: Path | None,
           weights: Path | None, opset: int) -> None:
    """Export a PyTorch model to ONNX (eval mode, BatchNorm folded), checked against torch.

    SOURCE is a zoo name (resnet18, mobilenet_v3_small, convnext_atto, ...:
    `--list` shows them all) or an importable factory `package.module:function`.
    The zoo models are untrained (seeded random weights) unless --weights is given.

    The batch dim is dynamic unless the graph fixes it (checked by one run at
    another batch size): then it is exported with the given batch, and a warning says so.
    """
    from .. import frontend, models
    from ..shapes import parse_dims

    if list_zoo:
        for name in models.MODEL_NAMES:
            click.echo(f"{name:<24} {','.join(map(str, models.default_input_shape(name)))}")
        return
    if source is None or output is None:
        raise click.UsageError("export needs SOURCE and -o/--output (or --list)")
    if input_shape is None:
        if source not in models.MODEL_NAMES:
            raise click.UsageError("--input-shape is required for a factory (the zoo models have their own)")
        input_shape = ",".join(map(str, models.default_input_shape(source)))
    check_outputs([(output, "file")], [weights])
    result = frontend.export_model(source, parse_dims(input_shape), output, weights=weights, opset=opset)
    warn(result.warnings)
    click.echo(f"wrote {result.path} (onnxruntime vs torch: max abs difference {result.max_abs_diff:.3g})")
