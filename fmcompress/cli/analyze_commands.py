"""`fmcompress analyze` (which maps break a ceiling) and `fmcompress codec` (lossless bits per element)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import EXIT_GATE, InputError
from ..reports.analysis import DEFAULT_ORT_LEVEL, ORT_LEVELS
from .binding import CEILING_HELP, choice, row
from .failures import fail, handle_errors
from .outputs import check_outputs

VIEWS = ("stored", "live", "strict", "runtime")  # analyze --mode


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ceiling", help=CEILING_HELP)
@row("input_shapes").option()
@click.option("--mode", type=choice(VIEWS), default="stored", show_default=True,
              help="Which view the table lists: stored feature maps (kernel groups fused), "
                   "the live set along the execution order, every ONNX tensor, or what onnxruntime "
                   "allocates (after its own fusions, in its execution order; --fail-over-ceiling then "
                   "gates on those).")
@click.option("--ort-level", type=choice(ORT_LEVELS), default=DEFAULT_ORT_LEVEL, show_default=True,
              help="onnxruntime's graph optimisations for the runtime view: extended (its portable fusions), "
                   "all (adds the x86-only NCHWc layout), basic, none.")
@row("act_bytes").option()
@click.option("--top", type=click.IntRange(min=1), help="List only the N largest feature maps.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG of map sizes and live memory.")
@click.option("--fail-over-ceiling", is_flag=True,
              help="Exit 1 when a stored feature map exceeds the ceiling (CI gate).")
@click.option("--include-inputs", is_flag=True,
              help="Let graph inputs, outputs and integer maps above the ceiling trip --fail-over-ceiling.")
@click.option("-q", "--quiet", is_flag=True, help="No table; only errors and the gate's verdict.")
@handle_errors
def analyze(model: Path, ceiling: str | None, input_shapes: tuple[str, ...], mode: str, ort_level: str,
            act_bytes: int | None, top: int | None, json_path: Path | None, plot_path: Path | None,
            fail_over_ceiling: bool, include_inputs: bool, quiet: bool) -> None:
    """Find the feature maps of MODEL above a memory ceiling (the peak-memory analysis pass)."""
    from .. import api
    from ..modelio import output_transaction
    from ..reports.plot import plot_memory
    from ..reports.terminal import print_analysis

    if fail_over_ceiling and not ceiling:
        raise click.UsageError("--fail-over-ceiling needs --ceiling")
    check_outputs([(json_path, "file"), (plot_path, "file")], [model])
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
            plot_memory(result, plot_path)
    if not quiet:
        print_analysis(result, mode=mode, top=top)
    if fail_over_ceiling:
        runtime = mode == "runtime" and result.runtime is not None
        offenders = result.runtime.over_ceiling() if runtime else result.over_ceiling(include_inputs=include_inputs)
        if offenders:
            names = ", ".join(m.name for m in offenders[:10]) + (" ..." if len(offenders) > 10 else "")
            what = "onnxruntime allocation(s)" if runtime else "stored feature map(s)"
            fail(f"{len(offenders)} {what} above the ceiling of {result.ceiling_bytes} bytes: {names}", EXIT_GATE)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@row("input_shapes").option()
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
    from .. import codec as lossless
    from ..data import input_specs, load_dataset
    from ..modelio import load_model, write_bytes_atomic
    from ..reports.terminal import print_codec
    from ..shapes import parse_input_shapes, resolve_input_shapes

    check_outputs([(json_path, "file")], [model, data])
    proto = load_model(model)
    shapes = resolve_input_shapes(proto, parse_input_shapes(list(input_shapes), proto))
    dataset = load_dataset(data, input_specs(proto, shapes), num_samples=num_samples)
    report = lossless.measure_model(proto, dataset.batches(1), window=window, input_shapes=list(input_shapes))
    report.source = str(model)
    if json_path:
        write_bytes_atomic(json.dumps(report.to_dict(), indent=2).encode(), json_path)
    print_codec(report)
