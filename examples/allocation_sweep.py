"""Rank allocation under a traffic budget: uniform against greedy (passes/allocate.py).

    python examples/allocation_sweep.py [--models demo,ppocr-cls,mobilenet_v2] [--budgets 2x,3x]
        [--methods pca] [--num-samples 384] [--epochs 10] [--out allocation_sweep]

For each model x budget x method, three allocations of the same total stored traffic
(the bytes of every stored map between kernel groups, inputs and outputs excluded):

* uniform: the same ratio k/C on every compressible map, rounded so the total fits;
* greedy: `--traffic` with `--objective traffic` (least estimated fidelity cost per byte);
* greedy+latency: `--objective traffic+latency` (explicit U/P convs penalised), once
  per `--latency-weights` value (labelled greedy+latency@w when more than one).

Each is run through the pipeline compile runs (fit, fold, verify, measure) on the
same data and split; the greedy proxies are measured once per model and budget and
shared by both greedy rows. Fidelity is on the held-out quarter: accuracy for the
trained demo (`--data mnist`) and PP-OCR's direction classifier (rendered text lines
rotated 0/180 degrees, labels known by construction, fmcompress.evaluation.textlines); for
MobileNetV2 (zoo, untrained weights: no accuracy means anything) top-1 agreement with
the original and output cosine. Latency: onnxruntime, interleaved rounds, median
ratio (compressed / original); FLOPs ratio likewise. Prints a Markdown table (also
OUT/allocation_sweep.md, with OUT/allocation_sweep.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from fmcompress.compiler import NO_CEILING, build_context
from fmcompress.data import Dataset, input_specs, load_dataset
from fmcompress.evaluation import textlines
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.passes import Pipeline
from fmcompress.passes.allocate import AllocatePass, stored_traffic
from fmcompress.passes.fit import FitProjectionsPass
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.fold_bn import FoldBatchNormPass
from fmcompress.passes.measure import MeasurePass
from fmcompress.passes.memory import MemoryAnalysisPass
from fmcompress.passes.plan import PlanPass
from fmcompress.passes.verify import VerifyPass
from fmcompress.train_config import TrainConfig

DEMO_PATH = Path(__file__).resolve().parents[1] / "models" / "digits_resnet.onnx"
ALLOCATIONS = (("uniform", "uniform", "traffic"), ("greedy", "greedy", "traffic"),
               ("greedy+latency", "greedy", "traffic+latency"))


def allocations(weights: list[float]) -> list[tuple[str, str, str, float]]:
    """(label, strategy, objective, latency weight) of each row, the latency one per weight."""
    rows = [(label, strategy, objective, 1.0) for label, strategy, objective in ALLOCATIONS[:2]]
    label, strategy, objective = ALLOCATIONS[2]
    for weight in weights:
        rows.append((f"{label}@{weight:g}" if len(weights) > 1 else label, strategy, objective, weight))
    return rows


@dataclass
class Task:
    name: str
    path: Path
    data: str | None  # compile's --data: an npz, `mnist`, or None (surrogate photographs)
    input_shape: list[str] | None
    metric: str  # "accuracy" or "agreement"


def build_task(name: str, folder: Path, samples: int) -> Task:
    if name == "demo":
        return Task(name, DEMO_PATH, "mnist", None, "accuracy")
    if name == "ppocr-cls":
        path = folder / "cls.npz"
        inputs, labels = textlines.cls_dataset(samples, 0)
        textlines.save_npz(path, inputs, labels)
        return Task(name, real_model(name), str(path), ["x=1,3,48,192"], "accuracy")
    if name == "mobilenet_v2":
        from fmcompress.frontend import export_model

        path = folder / "mobilenet_v2.onnx"
        export_model("mobilenet_v2", (1, 3, 224, 224), path)
        return Task(name, path, None, None, "agreement")
    raise SystemExit(f"unknown model {name!r}; known: demo, ppocr-cls, mobilenet_v2")


def run_task(task: Task, args, rows: list[dict[str, Any]]) -> None:
    model = onnx.load(task.path)
    base = build_context(model, task.input_shape, None)
    dataset = load_dataset(task.data, input_specs(model, base.input_shapes), num_samples=args.num_samples)
    calibration, held_out = dataset.split()
    Pipeline([MemoryAnalysisPass(NO_CEILING), PlanPass(NO_CEILING)]).run(model, base)
    for budget in args.budgets:
        proxies = None  # the greedy proxies, measured once per budget
        for label, strategy, objective, weight in allocations(args.latency_weights):
            ctx = replace(base, results=dict(base.results), timings={})
            started = time.perf_counter()
            allocate = AllocatePass(budget, calibration, strategy=strategy, objective=objective,
                                    batch_size=args.batch_size, proxies=proxies, latency_weight=weight)
            Pipeline([allocate]).run(model, ctx)
            allocation = ctx.allocation
            if strategy == "greedy" and proxies is None:
                proxies = allocation.proxies
            for method in args.methods:
                row = compile_rest(model, ctx, calibration, held_out, method, args)
                row.update(model=task.name, budget=budget, allocation=label, method=method, metric=task.metric,
                           ranks={p.name: allocation.ranks[p.name] for p in allocation.proxies},
                           traffic_ratio=allocation.traffic_before / row["traffic_after"],
                           estimated_rel_error=allocation.estimated_rel_error,
                           measured_rel_error=allocation.measured_rel_error,
                           seconds=time.perf_counter() - started)
                rows.append(row)
                print(f"{task.name} {budget} {label} {method}: {fidelity_text(row)} "
                      f"({row['seconds']:.1f} s)", file=sys.stderr)


def compile_rest(model: onnx.ModelProto, ctx, calibration: Dataset, held_out: Dataset, method: str,
                 args) -> dict[str, Any]:
    """fit -> fold BatchNorm -> fold projections -> verify -> measure, as compile runs them."""
    ctx = replace(ctx, timings={}, warnings=list(ctx.warnings))
    fit = FitProjectionsPass(calibration, held_out, method=method, batch_size=args.batch_size,
                             training=TrainConfig(epochs=args.epochs, batch_size=args.batch_size))
    _, ctx = Pipeline([fit, FoldBatchNormPass(), FoldProjectionsPass(),
                       VerifyPass(model, held_out, batch_size=args.batch_size),
                       MeasurePass(model, held_out, batch_size=args.batch_size, threads=args.threads,
                                   rounds=args.rounds, repeats=args.repeats)]).run(model, ctx)
    measured = ctx.measurement
    fid = measured["fidelity"]
    return {"traffic_after": stored_traffic(ctx.verification["after"]),
            "accuracy": fid["accuracy_candidate"], "accuracy_original": fid["accuracy_reference"],
            "agreement": fid["top1_agreement"], "cosine": fid["cosine_similarity"],
            "latency_ratio": measured["latency_ms"]["ratio"], "flops_ratio": measured["flops"]["ratio"],
            "maps": len(ctx.plan.maps)}


def fidelity_text(row: dict[str, Any]) -> str:
    if row["metric"] == "accuracy" and row["accuracy"] is not None:
        return f"accuracy {100 * row['accuracy']:.1f}% (original {100 * row['accuracy_original']:.1f}%)"
    agreement = "-" if row["agreement"] is None else f"{100 * row['agreement']:.1f}%"
    return f"agreement {agreement}, cosine {row['cosine']:.3f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | budget | method | allocation | maps cut | traffic ratio | fidelity (held-out) | "
             "latency ratio | FLOPs ratio |", "|---|---|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['budget']} | {r['method']} | {r['allocation']} | {r['maps']} | "
                     f"{r['traffic_ratio']:.2f}x | {fidelity_text(r)} | {r['latency_ratio']:.2f} | "
                     f"{r['flops_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,ppocr-cls,mobilenet_v2")
    parser.add_argument("--budgets", default="2x,3x")
    parser.add_argument("--methods", default="pca", help="pca, learned or both (comma-separated)")
    parser.add_argument("--num-samples", type=int, default=384, help="samples per model (a quarter held out)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of learned")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the latency figures")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per model per round")
    parser.add_argument("--latency-weights", default="1",
                        help="weights of the latency term, comma-separated: one greedy+latency row each")
    parser.add_argument("--out", default="allocation_sweep")
    args = parser.parse_args(argv)
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.latency_weights = [float(w) for w in args.latency_weights.split(",") if w.strip()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            run_task(build_task(name, Path(tmp), args.num_samples), args, rows)
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocation_sweep.md").write_text(table)
    (out / "allocation_sweep.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
