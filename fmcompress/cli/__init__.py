"""The `fmcompress` command line (click): the group, its --debug flag, and the commands.

Exit codes (fmcompress.errors): 0 success; 1 a broken ceiling or failed verification (CI
gate); 2 usage or input error; 3 internal error (a bug in fmcompress); 130 interrupted.
Errors are one line on stderr; `fmcompress --debug ...` (or FMCOMPRESS_DEBUG=1) prints
the traceback too.

Modules: failures (error lines and exit codes), binding (options bound to the option
dataclasses), outputs (output paths and notes), and one module per command or pair.
"""

from __future__ import annotations

import click

from .analyze_commands import analyze, codec
from .compile_command import compile_command
from .export_command import export
from .failures import DEBUG_KEY, OneLineGroup, handle_errors
from .verify_command import verify

__all__ = ["analyze", "codec", "compile_command", "export", "handle_errors", "main", "verify"]


@click.group(cls=OneLineGroup, no_args_is_help=False, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmcompress")
@click.option("--debug", is_flag=True,
              help="On an error, print the traceback (with its causes) before the one-line message; "
                   "the environment variable FMCOMPRESS_DEBUG=1 does the same.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Make every feature map of a CNN fit under a memory ceiling.

    \b
    fmcompress analyze model.onnx --ceiling 256KB   # which maps break it
    fmcompress compile model.onnx --ceiling 256KB   # -> model.fmc.onnx
    fmcompress verify model.onnx model.fmc.onnx     # checks and fidelity
    fmcompress export resnet18 --input-shape 1,3,224,224 -o r18.onnx
    """
    ctx.meta[DEBUG_KEY] = debug


for _command in (analyze, codec, compile_command, export, verify):
    main.add_command(_command)
