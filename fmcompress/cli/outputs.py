"""Where the commands write, checked before any work, and the notes their last line carries."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import click

REPORT_FILES = ("report.json", "report.md", "memory.png")  # what compiler.write_report writes


def check_outputs(outputs: list[tuple[Path | None, str]], inputs: list[Path | None]) -> None:
    """Every output path checked before any work (modelio.check_output_path), and no two the same."""
    from ..modelio import check_output_path

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


def default_output(model: Path) -> Path:
    """MODEL.fmc.onnx beside MODEL (x.onnx -> x.fmc.onnx)."""
    return model.with_name(model.name[: -len(".onnx")] + ".fmc.onnx" if model.name.endswith(".onnx")
                           else model.name + ".fmc.onnx")


def default_checkpoint(model: Path, output: Path) -> Path:
    """A per-(model, output) file in the user's cache, so that nothing appears beside the output
    before it is written, and `--resume` finds the run again."""
    key = hashlib.sha256(f"{model.resolve()}\0{output.resolve()}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fmcompress" / "checkpoints" / f"{output.name}.{key}.ckpt"


def not_compressible_note(entries: Any, ceiling_bytes: int | None) -> str:
    """`; not compressible and above the ceiling: output 'probs' (1.0 MiB), ...` or ''."""
    from ..units import format_bytes

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
