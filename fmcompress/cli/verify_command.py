"""`fmcompress verify`: a compressed model against its original, with compile's data options."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import click

# verify_pair is looked up on the module at call time (tests replace it)
from .. import compiler
from ..errors import CeilingError
from .binding import CEILING_HELP, DATA, data_options, field_values
from .failures import handle_errors, warn
from .outputs import check_outputs, not_compressible_note

NUM_SAMPLES = inspect.signature(compiler.verify_pair).parameters["num_samples"].default


@click.command()
@click.argument("original", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("compressed", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ceiling", help=CEILING_HELP + " Default: the ceiling recorded in COMPRESSED's metadata.")
@data_options(num_samples=NUM_SAMPLES, num_samples_help="Samples to run; every one is scored (none is held out).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the figures as JSON.")
@handle_errors
def verify(original: Path, compressed: Path, ceiling: str | None, json_path: Path | None, **bound: Any) -> None:
    """Check COMPRESSED against ORIGINAL: onnx.checker, the ceiling, fidelity. Exit 1 if the ceiling is broken."""
    from ..modelio import write_bytes_atomic

    check_outputs([(json_path, "file")], [original, compressed, bound["data"]])
    figures = compiler.verify_pair(original, compressed, ceiling=ceiling, **field_values(DATA, bound),
                                   log=lambda message: click.echo(message, err=True))
    warn(figures.get("warnings", []))
    if json_path:
        write_bytes_atomic(json.dumps(figures, indent=2).encode(), json_path)
    if figures["over_ceiling"]:
        raise CeilingError(f"{len(figures['over_ceiling'])} stored feature map(s) above the ceiling of "
                           f"{figures['ceiling_bytes']} B: {', '.join(figures['over_ceiling'][:10])}")
    if figures["ceiling_bytes"]:
        blocked = not_compressible_note(figures.get("not_compressible",
                                                    figures.get("not_compressible_over_ceiling")),
                                        figures["ceiling_bytes"])
        click.echo(f"ok: every compressible stored map <= {figures['ceiling_bytes']} B{blocked}")
    else:
        click.echo("ok: no ceiling given or recorded")
