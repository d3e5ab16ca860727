"""Ceiling sweep on real trained models: accuracy against labels known by construction.

    python examples/ceiling_sweep.py [--models ppocr-cls,ppocr-rec,demo] [--ceilings 2x,4x,8x]
        [--methods pca,random,learned] [--num-samples 256] [--eval-samples 500] [--out sweep]

For each model x ceiling x method: render calibration text lines (unlabelled for
the recognizer, at most 512) into an .npz, `compile_model` under the ceiling, then
score the compiled model on a separate held-out set of rendered lines (another
seed) with the task's own metric:

* ppocr-cls (rapidocr wheel): the 0/180 degree direction classifier, accuracy;
* ppocr-rec (rapidocr wheel): the PP-OCRv4 recognizer, exact-match string
  accuracy after CTC greedy decoding with the model's dictionary (spaces ignored,
  as PaddleOCR's RecMetric does);
* demo (`models/digits_resnet.onnx` when it exists, `--data mnist`): the compile
  report's held-out accuracy before and after (skipped with a note when absent).

Rendering and scoring are `fmcompress.evaluation.textlines`. Prints a Markdown table (also
written to OUT/ceiling_sweep.md, with OUT/ceiling_sweep.json) and plots the metric
against the ceiling, one line per method and one panel per model, with the
original's figure dashed (OUT/ceiling_sweep.png). Methods that
`fmcompress.passes.fit.METHODS` does not hold are skipped with a note. Latency
figures are not the point here, so compile times them only once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.errors import InputError, VerificationError
from fmcompress.evaluation import textlines
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.passes.fit import METHODS
from fmcompress.train_config import TrainConfig

MAX_CALIBRATION = 512
CALIBRATION_SEED = 0
EVAL_SEED = 1000  # held-out lines: another seed, so no line is shared with calibration
DEMO_PATH = Path(__file__).resolve().parents[1] / "models" / "digits_resnet.onnx"


@dataclass
class Task:
    """One model of the sweep: how to render its data and score a model on it."""

    name: str
    metric: str
    path: Path
    input_shape: str
    data: str | None = None  # calibration source; None: render an npz
    eval_inputs: np.ndarray | None = None
    eval_targets: Any = None
    cache: dict[str, float] = field(default_factory=dict)

    def calibration(self, folder: Path, count: int) -> str:
        if self.data is not None:
            return self.data
        path = folder / f"{self.name}-calibration.npz"
        if not path.exists():
            if self.name == "ppocr-cls":
                inputs, labels = textlines.cls_dataset(count, CALIBRATION_SEED)
                textlines.save_npz(path, inputs, labels)
            else:
                inputs, _ = textlines.rec_dataset(count, CALIBRATION_SEED)  # texts are not class labels
                textlines.save_npz(path, inputs)
        return str(path)

    def score(self, model, threads: int) -> float | None:
        if self.name == "ppocr-cls":
            return textlines.cls_accuracy(model, self.eval_inputs, self.eval_targets, threads=threads)
        if self.name == "ppocr-rec":
            return textlines.rec_exact_match(model, self.eval_inputs, self.eval_targets, threads=threads)
        return None  # demo: read from the compile report


def build_tasks(names: list[str], eval_samples: int, demo_data: str) -> tuple[list[Task], list[str]]:
    tasks, notes = [], []
    for name in names:
        if name == "ppocr-cls":
            task = Task(name, "accuracy", real_model(name), "x=1,3,48,192")
            task.eval_inputs, task.eval_targets = textlines.cls_dataset(eval_samples, EVAL_SEED)
        elif name == "ppocr-rec":
            task = Task(name, "exact match", real_model(name), "x=1,3,48,320")
            task.eval_inputs, task.eval_targets = textlines.rec_dataset(eval_samples, EVAL_SEED)
        elif name == "demo":
            if not DEMO_PATH.exists():
                notes.append(f"demo skipped: {DEMO_PATH.relative_to(DEMO_PATH.parents[1])} does not exist yet")
                continue
            task = Task(name, "accuracy (compile's held-out part)", DEMO_PATH, "", data=demo_data)
        else:
            raise InputError(f"unknown model {name!r}; known: ppocr-cls, ppocr-rec, demo")
        tasks.append(task)
    return tasks, notes


def run_one(task: Task, ceiling: str, method: str, args, folder: Path) -> dict[str, Any]:
    options = CompileOptions(ceiling=ceiling, method=method, data=task.calibration(folder, args.num_samples),
                             num_samples=args.num_samples, input_shapes=[task.input_shape] if task.input_shape else None,
                             latency_repeats=1, latency_rounds=1, threads=args.threads,
                             training=TrainConfig(epochs=args.epochs, block_epochs=args.block_epochs))
    row: dict[str, Any] = {"model": task.name, "ceiling": ceiling, "method": method, "metric": task.metric}
    started = time.perf_counter()
    try:
        result = compile_model(task.path, options)
    except (InputError, VerificationError) as exc:
        row.update(error=str(exc).splitlines()[0], compile_s=time.perf_counter() - started)
        return row
    row["compile_s"] = time.perf_counter() - started
    row["maps"] = len(result.plan.maps)
    if task.eval_inputs is not None:
        if "original" not in task.cache:
            task.cache["original"] = task.score(task.path, args.threads)
        row["original"] = task.cache["original"]
        row["compressed"] = task.score(result.model, args.threads)
    else:
        fid = result.report["fidelity"]
        row["original"], row["compressed"] = fid["accuracy_reference"], fid["accuracy_candidate"]
    if row.get("original") is not None and row.get("compressed") is not None:
        row["drop_points"] = 100 * (row["original"] - row["compressed"])
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | ceiling | method | maps | metric | original | compressed | drop (pts) | compile s |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['ceiling']} | {r['method']} | - | {r['metric']} | - | - | - | "
                         f"{r['compile_s']:.1f} (failed: {r['error']}) |")
            continue
        drop = "-" if r.get("drop_points") is None else f"{r['drop_points']:.1f}"
        lines.append(f"| {r['model']} | {r['ceiling']} | {r['method']} | {r['maps']} | {r['metric']} | "
                     f"{pct(r.get('original'))} | {pct(r.get('compressed'))} | {drop} | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], ceilings: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model and r.get("compressed") is not None]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = [(ceilings.index(r["ceiling"]), 100 * r["compressed"]) for r in mine if r["method"] == method]
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=method)
        original = next((r["original"] for r in mine if r.get("original") is not None), None)
        if original is not None:
            ax.axhline(100 * original, color="gray", linestyle="--", label="original")
        metric = next((r["metric"] for r in rows if r["model"] == model), "")
        ax.set(title=model, xlabel="ceiling", ylabel=f"{metric} (%)", ylim=(0, 102),
               xticks=range(len(ceilings)), xticklabels=ceilings)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ppocr-cls,ppocr-rec,demo")
    parser.add_argument("--ceilings", default="2x,4x,8x")
    parser.add_argument("--methods", default="pca,random,learned")
    parser.add_argument("--num-samples", type=int, default=256, help=f"calibration lines (at most {MAX_CALIBRATION})")
    parser.add_argument("--eval-samples", type=int, default=500, help="held-out lines scored per model")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="training epochs (random, learned)")
    parser.add_argument("--block-epochs", type=int, default=TrainConfig.block_epochs,
                        help="block reconstruction epochs per map before training (learned)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument("--demo-data", default="mnist", help="--data of the demo model")
    parser.add_argument("--out", default="ceiling_sweep", help="folder for the table, JSON and plot")
    args = parser.parse_args(argv)
    if not 1 < args.num_samples <= MAX_CALIBRATION:
        parser.error(f"--num-samples must be between 2 and {MAX_CALIBRATION}")
    if args.eval_samples < 1:
        parser.error("--eval-samples must be at least 1")
    ceilings = [c.strip() for c in args.ceilings.split(",") if c.strip()]
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [m for m in wanted if m in METHODS]
    notes = [f"method {m!r} skipped: not in fmcompress.passes.fit.METHODS {METHODS}" for m in wanted if m not in METHODS]
    tasks, more = build_tasks([m.strip() for m in args.models.split(",") if m.strip()], args.eval_samples,
                              args.demo_data)
    notes += more
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            for ceiling in ceilings:
                for method in methods:
                    row = run_one(task, ceiling, method, args, Path(tmp))
                    rows.append(row)
                    status = row.get("error") or f"{row.get('compressed')}"
                    print(f"{task.name} {ceiling} {method}: {status} ({row['compile_s']:.1f} s)", file=sys.stderr)
    table = markdown(rows)
    print(table)
    for note in notes:
        print(f"note: {note}")
    (out / "ceiling_sweep.md").write_text(table + "".join(f"\nnote: {n}" for n in notes))
    (out / "ceiling_sweep.json").write_text(json.dumps({"rows": rows, "notes": notes, "args": vars(args)}, indent=2))
    if rows:
        plot(rows, ceilings, out / "ceiling_sweep.png")
        print(f"wrote {out / 'ceiling_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
