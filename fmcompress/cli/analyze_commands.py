"""`fmcompress analyze` (which maps break a ceiling, whether onnxruntime's peak breaks a size) and
`fmcompress codec` (lossless bits per element)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import EXIT_GATE, InputError
from ..reports.analysis import DEFAULT_ORT_LEVEL, ORT_LEVELS, RuntimeView
from ..units import format_bytes, parse_size
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
@click.option("--peak", "peak", metavar="SIZE",
              help="A size for onnxruntime's live peak (the runtime view at --ort-level: every allocation alive "
                   "at once, graph inputs excepted): show the peak and the tensors alive at it.")
@click.option("--fail-over-peak", is_flag=True, help="Exit 1 when onnxruntime's live peak exceeds --peak (CI gate).")
@click.option("--include-inputs", is_flag=True,
              help="Let graph inputs, outputs and integer maps above the ceiling trip --fail-over-ceiling.")
@click.option("-q", "--quiet", is_flag=True, help="No table; only errors and the gate's verdict.")
@handle_errors
def analyze(model: Path, ceiling: str | None, input_shapes: tuple[str, ...], mode: str, ort_level: str,
            act_bytes: int | None, top: int | None, json_path: Path | None, plot_path: Path | None,
            fail_over_ceiling: bool, peak: str | None, fail_over_peak: bool, include_inputs: bool,
            quiet: bool) -> None:
    """Find the feature maps of MODEL above a memory ceiling (the peak-memory analysis pass)."""
    from .. import api
    from ..modelio import output_transaction
    from ..reports.plot import plot_memory
    from ..reports.terminal import print_analysis

    if fail_over_ceiling and not ceiling:
        raise click.UsageError("--fail-over-ceiling needs --ceiling")
    if fail_over_peak and not peak:
        raise click.UsageError("--fail-over-peak needs --peak")
    peak_bytes = parse_size(peak) if peak else None
    check_outputs([(json_path, "file"), (plot_path, "file")], [model])
    options = {"ceiling": ceiling, "input_shapes": list(input_shapes), "act_bytes": act_bytes}
    try:  # the runtime view is in every summary; only --mode runtime needs onnxruntime to load the model
        result = api.analyze(model, runtime=ort_level, **options)
    except InputError:
        if mode == "runtime" or peak_bytes is not None:
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
    if peak_bytes is not None:
        _peak_verdict(result.runtime, peak_bytes, fail_over_peak, quiet)


def _peak_verdict(view: RuntimeView, peak_bytes: int, gate: bool, quiet: bool) -> None:
    """--peak: the runtime view's live peak against the size and the tensors alive at it; with
    --fail-over-peak, exit 1 when it is over."""
    from ..passes.peak_plan import peak_facts

    facts = peak_facts(view)
    over = view.peak_bytes > peak_bytes
    if not quiet:
        click.echo(_peak_lines(facts, view.level, peak_bytes))
    if over and gate:
        lasting = "; set by long-lived tensors (skip connections)" if facts["set_by_long_lived"] else ""
        names = ", ".join(t["name"] for t in facts["alive"][:5])
        fail(f"onnxruntime's live peak {view.peak_bytes} bytes ({view.level}) is above --peak {peak_bytes} bytes; "
             f"alive at step {facts['step']}: {names}{lasting}", EXIT_GATE)


def _peak_lines(facts: dict, level: str, peak_bytes: int) -> str:
    verdict = ">" if facts["peak_bytes"] > peak_bytes else "<="
    lines = [f"onnxruntime live peak ({level}): {format_bytes(facts['peak_bytes'])} {verdict} --peak "
             f"{format_bytes(peak_bytes)}, at step {facts['step']} ({facts['node']}); {facts['alive_count']} "
             f"tensor(s) alive, long-lived ones {format_bytes(facts['long_lived_bytes'])}"
             + (" (they set the peak)" if facts["set_by_long_lived"] else "") + ":"]
    lines += [f"  {format_bytes(t['bytes']):>10}  {t['name']}  {t['op'] or t['role']}"
              f"{'  long-lived (steps ' + str(t['step']) + '-' + str(t['last_use']) + ')' if t['long_lived'] else ''}"
              for t in facts["alive"]]
    return "\n".join(lines)


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
