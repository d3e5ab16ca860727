"""`fmcompress export`: a PyTorch model to ONNX, checked against torch."""

from __future__ import annotations

from pathlib import Path

import click

from .failures import handle_errors, warn
from .outputs import check_outputs


@click.command()
@click.argument("source")
@click.option("--input-shape", required=True, metavar="DIMS", help="Input shape to export with, e.g. 1,3,224,224.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the ONNX file.")
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
    from .. import frontend
    from ..shapes import parse_dims

    check_outputs([(output, "file")], [weights])
    result = frontend.export_model(source, parse_dims(input_shape), output, weights=weights, opset=opset)
    warn(result.warnings)
    click.echo(f"wrote {result.path} (onnxruntime vs torch: max abs difference {result.max_abs_diff:.3g})")
