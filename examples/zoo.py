"""Zoo coverage: every zoo model through export, analyze and compile, as a Markdown table.

Regenerate the table:

    python examples/zoo.py --compact          # the compact architectures: ~15 min on 2 cores
    python examples/zoo.py --compact --input-size 224 --ceilings ort:512KB   # full size
    python examples/zoo.py [--compact | --models NAME,...] [--light] [--real] [--input-size N]
                           [--ceilings 4x,ort:512KB] [--num-samples 8] [--subprocess]

For each model (every name of `fmcompress.models.MODEL_NAMES` at its default input shape,
the 224x224 ones included, which take minutes each; `--compact` only those of
models/catalog.py, at 64x64 mostly, or with `--input-size 224` at 224x224, text lines kept;
`--light` adds the onnx wheel's nine light models, `--real` the test extra's real models)
it runs, through the command line's own code (click's test runner in this process, or with
`--subprocess` a separate `fmcompress` process per step):

  export   `fmcompress export NAME --input-shape DIMS` (zoo models only; checked against torch)
  analyze  `fmcompress analyze MODEL --ceiling 4x`
  C        `fmcompress compile MODEL --ceiling C --method pca --num-samples 8` for each
           ceiling C of --ceilings; `ort:C` is `--runtime ort --ceiling C` (compile verifies
           its output: onnx.checker, onnxruntime, executor agreement, the ceiling); an
           `ort:C` cell gives onnxruntime's peak before and after, measured in a fresh process
           (`fmcompress/memprobe.py`, as examples/runtime_peak.py measures it)
  tiling alone  (--smallest) the smallest ceiling, in KB, at which `compile --runtime ort
           --plan-only` covers every onnxruntime allocation by tiling, projecting nothing:
           what a lossless compile reaches (bisected between 1 KB and 8 MB)

and prints one row per model: each step `ok` with its time, or its exit code and the
one-line message the command printed (exit 1: a failed verification or ceiling, 2: the
input is refused, 3: a bug in fmcompress). The zoo models are untrained: the table is about
coverage (which graphs go through), not accuracy.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model
from fmcompress.models import MODEL_NAMES, default_input_shape
from fmcompress.models.catalog import ARCHITECTURES

DEFAULT_CEILINGS = "4x,ort:512KB"
LIGHT_DIR = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"


@dataclass
class Step:
    code: int
    seconds: float
    message: str = ""

    def cell(self) -> str:
        if self.code == 0 and self.message.startswith("ok "):
            return self.message
        if self.code == 0:
            return (
                f"{self.message} ({self.seconds:.0f}s)"
                if self.message
                else f"ok {self.seconds:.1f}s"
            )
        return f"exit {self.code}: {self.message.replace('|', '/')}"


@dataclass
class Subject:
    """A model to cover: a zoo name to export, or an ONNX file with its input shape."""

    name: str
    shape: tuple[int, ...]
    path: Path | None = None  # None: a zoo model, exported first


def subjects(args: argparse.Namespace) -> list[Subject]:
    names = (
        args.models.split(",")
        if args.models
        else list(ARCHITECTURES if args.compact else MODEL_NAMES)
    )
    chosen = [
        Subject(n, _sized(default_input_shape(n), args.input_size))
        for n in names
        if n in MODEL_NAMES
    ]
    if args.light:
        for path in sorted(LIGHT_DIR.glob("light_*.onnx")):
            chosen.append(Subject(path.stem, _static_shape(path), path))
    if args.real:
        chosen += [Subject(n, spec.input_shape, real_model(n)) for n, spec in REAL_MODELS.items()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        sys.exit(f"unknown zoo model(s): {', '.join(unknown)}; known: {', '.join(MODEL_NAMES)}")
    return chosen


def _sized(shape: tuple[int, ...], size: int | None) -> tuple[int, ...]:
    """A square zoo input resized to `size` x `size`; other shapes (text lines) are kept."""
    if not size or len(shape) != 4 or shape[2] != shape[3]:
        return shape
    return (*shape[:2], size, size)


def _static_shape(path: Path) -> tuple[int, ...]:
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    first = next(i for i in graph.input if i.name not in weights)
    return tuple(d.dim_value or 1 for d in first.type.tensor_type.shape.dim)


def run_cli(argv: list[str], in_process: bool) -> Step:
    """Run `fmcompress ARGV`; the exit code and the last `error:` line of stderr."""
    start = time.perf_counter()
    if in_process:
        from click.testing import CliRunner

        from fmcompress.cli import main

        result = CliRunner().invoke(main, argv, catch_exceptions=True)
        code, stderr = result.exit_code, result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            code, stderr = (
                3,
                f"error: uncaught {type(result.exception).__name__}: {result.exception}",
            )
    else:
        done = subprocess.run(
            [sys.executable, "-m", "fmcompress", *argv], capture_output=True, text=True, check=False
        )
        code, stderr = done.returncode, done.stderr
    return Step(code, time.perf_counter() - start, _error_line(stderr) if code else "")


def _error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "internal error:"))]
    return (errors or lines or ["(no message)"])[-1]


def compile_argv(path: Path, ceiling: str, out: Path, samples: int) -> list[str]:
    argv = [
        "compile",
        str(path),
        "--method",
        "pca",
        "--num-samples",
        str(samples),
        "-o",
        str(out),
        "-q",
    ]
    if ceiling.startswith("ort:"):
        return [*argv, "--runtime", "ort", "--ceiling", ceiling[4:]]
    return [*argv, "--ceiling", ceiling]


def measured_peaks(report: Path) -> str:
    """`peak 3.1 -> 0.6 MiB`: onnxruntime's measured peak (a fresh process, arena off, the
    written file; computed where the platform cannot measure) before and after."""
    runtime = json.loads(report.read_text()).get("runtime", {})

    def peak(side: str) -> float:
        figures = runtime.get(side, {})
        value = figures.get("measured_peak_bytes")
        return (value if value is not None else figures.get("computed_peak_bytes", 0)) / 2**20

    return f"peak {peak('before'):.2f} -> {peak('after'):.2f} MiB"


def cover(
    subject: Subject, ceilings: list[str], workdir: Path, args: argparse.Namespace
) -> dict[str, Step]:
    """Every step for one model; a failed export skips the rest."""
    in_process = not args.subprocess
    dims = ",".join(map(str, subject.shape))
    steps: dict[str, Step] = {}
    path = subject.path
    if path is None:
        path = workdir / f"{subject.name}.onnx"
        steps["export"] = run_cli(
            ["export", subject.name, "--input-shape", dims, "-o", str(path)], in_process
        )
        if steps["export"].code:
            return steps
    shape = ["--input-shape", dims]
    steps["analyze"] = run_cli(["analyze", str(path), "--ceiling", "4x", "-q", *shape], in_process)
    for i, ceiling in enumerate(ceilings):
        out = workdir / f"{subject.name}.{i}.fmc.onnx"
        report = workdir / f"{subject.name}.{i}.json"
        steps[ceiling] = run_cli(
            [*compile_argv(path, ceiling, out, args.num_samples), *shape, "--json", str(report)],
            in_process,
        )
        if steps[ceiling].code == 0 and ceiling.startswith("ort:"):
            steps[ceiling].message = f"ok {steps[ceiling].seconds:.1f}s, {measured_peaks(report)}"
    if args.smallest:
        steps[SMALLEST] = smallest_tiling_ceiling(path, shape, workdir)
    return steps


SMALLEST = "tiling alone"


def tiles_losslessly(path: Path, shape: list[str], kib: int, workdir: Path) -> bool:
    """`compile --runtime ort --plan-only` at `kib` KiB succeeds with nothing to project."""
    report = workdir / "plan.json"
    argv = ["compile", str(path), "--runtime", "ort", "--ceiling", f"{kib}KB", "--plan-only"]
    step = run_cli(
        [*argv, "--json", str(report), "-o", str(workdir / "plan.onnx"), "-q", *shape], True
    )
    if step.code:
        return False
    plan = json.loads(report.read_text())
    return not plan["maps"] and not plan["runtime_plan"]["projected"]


def smallest_tiling_ceiling(path: Path, shape: list[str], workdir: Path) -> Step:
    """The smallest ceiling (KiB, bisected over 1..MAX_KIB) that tiling alone reaches: the
    runtime plan covers every allocation without projecting anything (lossless)."""
    start = time.perf_counter()
    low, high = 0, MAX_KIB  # low fails (or is 0), high is the candidate
    if not tiles_losslessly(path, shape, high, workdir):
        return Step(1, time.perf_counter() - start, f"above {MAX_KIB} KB")
    while high - low > 1:
        middle = (low + high) // 2
        if tiles_losslessly(path, shape, middle, workdir):
            high = middle
        else:
            low = middle
    return Step(0, time.perf_counter() - start, f"{high} KB")


MAX_KIB = 8192


def table(rows: list[tuple[Subject, dict[str, Step]]], columns: list[str]) -> str:
    head = ["model", "input", *columns]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for subject, steps in rows:
        cells = [steps[c].cell() if c in steps else "-" for c in columns]
        lines.append(
            "| " + " | ".join([subject.name, "x".join(map(str, subject.shape)), *cells]) + " |"
        )
    passed = sum(all(s.code == 0 for s in steps.values()) for _, steps in rows)
    lines.append(f"\n{passed}/{len(rows)} models pass every step.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    parser.add_argument(
        "--compact", action="store_true", help="only the architectures of models/catalog.py"
    )
    parser.add_argument(
        "--light", action="store_true", help="add the onnx wheel's light_*.onnx models"
    )
    parser.add_argument("--real", action="store_true", help="add the test extra's real models")
    parser.add_argument(
        "--ceilings",
        default=DEFAULT_CEILINGS,
        help=f"compile ceilings, a column each; ort:C: --runtime ort (default {DEFAULT_CEILINGS})",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="zoo models' input scaled to this shorter side (224: the full-size table)",
    )
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument(
        "--smallest",
        action="store_true",
        help="add the smallest ceiling tiling alone reaches (bisected with --plan-only)",
    )
    parser.add_argument("--subprocess", action="store_true", help="one fmcompress process per step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ceilings = [c.strip() for c in args.ceilings.split(",") if c.strip()]
    columns = ["export", "analyze", *ceilings, *([SMALLEST] if args.smallest else [])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for subject in subjects(args):
            steps = cover(subject, ceilings, Path(tmp), args)
            rows.append((subject, steps))
            summary = ", ".join(f"{k}: {v.cell()}" for k, v in steps.items())
            print(f"{subject.name}: {summary}", file=sys.stderr, flush=True)
    print(
        f"<!-- python examples/zoo.py {shlex.join(argv if argv is not None else sys.argv[1:])} -->"
    )
    print(table(rows, columns))


if __name__ == "__main__":
    main()
