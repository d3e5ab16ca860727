"""onnxruntime's live peak under a size: compile --peak (passes/peak_plan.py).

    python examples/peak_sweep.py [--peak mobilenet_v2=512KB,...] [--smallest resnet18,...] [--samples 16] [--int8]

For each `--peak MODEL=SIZE`: `compile --peak SIZE` (pca), then onnxruntime's peak before and
after, computed (the runtime view) and measured (a fresh process, fmcompress.memprobe), at the
report's level (`all`), whether tiling alone got there (lossless), the per-allocation ceiling
the search chose and its trials, the regions cut into 2-D patches, and the latency and FLOPs ratios. A size the planner cannot reach prints
its one-line refusal (the smallest peak found and what is alive there).
For each `--smallest MODEL`: the search run towards an unreachable size (rule b of
passes/peak_plan.py walks down to the smallest ceiling the planner takes), each trial printed
as it ends (an int8 search can take hours), the smallest peak it found, then `compile --peak`
at that figure, measured the same way.
With `--int8` every `--peak` compile is `compile --peak SIZE --int8` (the size holds for the int8
model; the latency ratio is against the float original), and `--smallest` searches int8 probes. Zoo models are untrained: memory and time
figures only.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from benchmodels import model_path

from fmcompress import api
from fmcompress.compiler import CompileOptions, build_context, peak_probe, plan_level, report_level
from fmcompress.errors import FmcError
from fmcompress.modelio import load_model
from fmcompress.passes.peak_plan import highest_ceiling, lowest, peak_facts, peak_search
from fmcompress.passes.quantize import planned_act_bytes
from fmcompress.passes.runtime import analyze_runtime
from fmcompress.units import format_bytes

KIB = 1024


def compile_at(path: Path, shapes: dict, size: str, samples: int, int8: bool = False) -> str:
    """One `compile --peak`, as a line of figures (or its refusal)."""
    started = time.perf_counter()
    try:
        result = api.compile(path, peak=size, input_shapes=[",".join(map(str, s)) for s in shapes.values()],
                             method="pca", num_samples=samples, latency_rounds=3, latency_repeats=5, int8=int8)
    except FmcError as exc:
        return f"refused ({time.perf_counter() - started:.0f} s): {exc}"
    runtime = result.report["runtime"]
    peak, before, after = runtime["peak"], runtime["before"], runtime["after"]
    latency = result.report["latency_ms"]
    facts = runtime["at_peak"]["after"]
    how = "lossless (tiling alone)" if peak["lossless"] else f"{len(result.report['maps'])} map(s) projected"
    patched = [f"{r['bands']}x{r['columns']}" for r in runtime["regions"] if r.get("columns", 1) > 1]
    how += f", 2-D patches (bands x columns) {', '.join(patched)}" if patched else ", row bands only"
    return (f"--peak {size}: {how}, ceiling {format_bytes(peak['ceiling_bytes'])} after {len(peak['trials'])} trials; "
            f"peak computed {format_bytes(before['computed_peak_bytes'])} -> {format_bytes(after['computed_peak_bytes'])}"
            f", measured {_b(before['measured_peak_bytes'])} -> {_b(peak['verified']['measured_peak_bytes'])} "
            f"(report probe {_b(after['measured_peak_bytes'])}); latency ratio {latency.get('ratio') or float('nan'):.2f}, "
            f"FLOPs ratio {result.report['flops']['ratio']:.2f}; "
            f"peak set by long-lived tensors: {facts['set_by_long_lived']}; {time.perf_counter() - started:.0f} s")


def smallest(path: Path, shapes: dict, samples: int, int8: bool = False) -> list[str]:
    """The search towards an unreachable size, then compile at the smallest peak it found."""
    options = CompileOptions(peak=1, int8=int8)
    model = load_model(path)
    ctx = build_context(model, [",".join(map(str, s)) for s in shapes.values()], planned_act_bytes(int8, None))
    level, held = report_level(options), plan_level(options)
    started = time.perf_counter()
    highest = highest_ceiling(analyze_runtime(model, ctx, held), None)
    trials = peak_search(model, ctx, 1, lambda c: peak_probe(c, held, int8), level, highest,
                         log=lambda message: print(f"  {message}", flush=True))  # each trial as it ends
    best = lowest(trials)
    lines = [f"search ({time.perf_counter() - started:.0f} s): " + ", ".join(
        f"{t.ceiling_bytes // KIB}K->{'x' if t.peak_bytes is None else t.peak_bytes // KIB}K"
        f"{'' if t.lossless or t.peak_bytes is None else '(p)'}" for t in trials)]
    if best is None:
        return [*lines, "no ceiling taken"]
    facts = peak_facts(best.view)
    lines.append(f"smallest computed peak {format_bytes(best.peak_bytes)} at ceiling "
                 f"{format_bytes(best.ceiling_bytes)} ({'lossless' if best.lossless else 'projected'}); "
                 f"long-lived {format_bytes(facts['long_lived_bytes'])}; alive: "
                 + ", ".join(f"{t['name']} {t['bytes'] // KIB}K" for t in facts["alive"][:4]))
    size = f"{math.ceil(best.peak_bytes / KIB)}KB"
    return [*lines, compile_at(path, shapes, size, samples, int8)]


def _b(value: int | None) -> str:
    return "n/a" if value is None else format_bytes(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", default="mobilenet_v2=512KB", help="MODEL=SIZE,... ('' for none)")
    parser.add_argument("--smallest", default="resnet18", help="MODEL,... ('' for none)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--int8", action="store_true", help="--peak and --smallest with --int8")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="peak-sweep-") as folder:
        for entry in filter(None, args.peak.split(",")):
            name, _, size = entry.partition("=")
            path, shapes = model_path(name, Path(folder))
            print(f"{name}{' int8' if args.int8 else ''}: {compile_at(path, shapes, size, args.samples, args.int8)}",
                  flush=True)
        for name in filter(None, args.smallest.split(",")):
            path, shapes = model_path(name, Path(folder))
            for line in smallest(path, shapes, args.samples, args.int8):
                print(f"{name}{' int8' if args.int8 else ''}: {line}", flush=True)


if __name__ == "__main__":
    main()
