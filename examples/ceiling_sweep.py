"""Ceiling sweep on real trained models: accuracy against labels known by construction.

    python examples/ceiling_sweep.py [--models ppocr-cls,ppocr-rec,demo] [--ceilings 2x,4x,8x]
        [--methods pca,random,learned] [--num-samples 256] [--eval-samples 1200]
        [--eval-set first|second|both] [--calibration-set first|second|mixed] [--labeled] [--int8 [--calibrate M]]
        [--train KEY=VALUE ...] [--out sweep]

For each model x ceiling x method: render calibration text lines (unlabeled unless
`--labeled`, at most 512) into an .npz, `compile_model` under the ceiling, then
score the compiled model on separate held-out rendered lines (another seed) with
the task's own metric, on two independent sets of lines:

* set 1, `fmcompress.evaluation.textlines`: DejaVu faces, random strings of 4-12
  characters, dark on light; the set the defaults were chosen on;
* set 2, `fmcompress.evaluation.otherlines`: STIX and Computer Modern faces, words,
  dates, prices, codes and punctuation, light or dark, gradient and photo backgrounds,
  rotation, blur, JPEG; rendered by another generator so that a figure can be
  confirmed on lines nobody tuned on.

`--eval-set` picks the sets scored (default both: columns "1" and "2" of the table,
`--eval-samples` lines each); `--calibration-set` the set the calibration lines come
from (default first: choose on one set, confirm on the other; mixed: half of each).
`--int8` compiles with `--int8` (and `--calibrate`) and scores the quantized model against
the float original; `--train KEY=VALUE` sets any other TrainConfig field. The models:

* ppocr-cls (rapidocr wheel): the 0/180 degree direction classifier, accuracy;
* ppocr-rec (rapidocr wheel): the PP-OCRv4 recognizer, exact-match string
  accuracy after CTC greedy decoding with the model's dictionary (spaces ignored,
  as PaddleOCR's RecMetric does);
* demo (`models/digits_resnet.onnx` when it exists, `--data mnist`): the compile
  report's held-out accuracy before and after (skipped with a note when absent).

Scoring is `fmcompress.evaluation.textlines`'s for both sets. Each drop comes with its
standard error (`fmcompress.metrics.paired_drop`: the original and the compressed model
score the same lines, so only the lines they score differently carry uncertainty): on 300
lines a recognizer's drop is known to about a point, which is why 1200 lines are scored by
default. Prints a Markdown table
(also written to OUT/ceiling_sweep.md, with OUT/ceiling_sweep.json: per row `original`,
`compressed`, `drop_points`, `drop_se_points` and `hits` (per line, 1 where the original and the
compressed model score it right: a figure on fewer lines is a prefix) for set 1, the same keys with
`_second` for set 2, and
`training`: the block stage's seconds and epochs, the end-to-end epochs, the scores;
`timings_s`: seconds per pass) and
plots the metric against the ceiling, one line per method and set (set 2 dashed) and
one panel per model, with the originals' figures dotted (OUT/ceiling_sweep.png). The
demo has no second set: its figures go in the set 1 columns whatever `--eval-set` says. Methods that
`fmcompress.passes.fit.METHODS` does not hold are skipped with a note. Latency
figures are not the point here, so compile times them only once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.errors import InputError, VerificationError
from fmcompress.evaluation import otherlines, textlines
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.int8 import CALIBRATIONS, DEFAULT_CALIBRATION
from fmcompress.metrics import gated_agreement, paired_drop
from fmcompress.passes.before_activation import PLACEMENTS
from fmcompress.passes.fit import METHODS
from fmcompress.train_config import TrainConfig

MAX_CALIBRATION = 512
CALIBRATION_SEED = 0
EVAL_SEED = 1000  # held-out lines: another seed, so no line is shared with calibration
DEMO_PATH = Path(__file__).resolve().parents[1] / "models" / "digits_resnet.onnx"
SETS = {"first": textlines, "second": otherlines}  # the two independent renderers of text lines
SET_NAMES = {"first": "set 1 (textlines)", "second": "set 2 (otherlines)", "mixed": "half set 1, half set 2"}
SUFFIX = {"first": "", "second": "_second"}  # the JSON keys of a set's figures: original{suffix}, ...
COLUMN = {"first": "1", "second": "2"}


@dataclass
class Task:
    """One model of the sweep: how to render its data and score a model on it."""

    name: str
    metric: str
    path: Path
    input_shape: str
    data: str | None = None  # calibration source; None: render an npz
    evals: dict[str, tuple[np.ndarray, Any]] = field(default_factory=dict)  # eval set -> (inputs, targets)
    cache: dict[str, np.ndarray] = field(default_factory=dict)  # eval set -> the original's hits, per line

    def calibration(self, folder: Path, count: int, which: str = "first", labeled: bool = False) -> str:
        """The calibration .npz: unlabeled, as a user has them, unless `labeled` (the classifier's
        angles: its training then picks epochs by held-out accuracy instead of agreement)."""
        if self.data is not None:
            return self.data
        labeled = labeled and self.name == "ppocr-cls"  # a recognizer's texts are not class labels
        path = folder / f"{self.name}-calibration-{which}{'-labeled' if labeled else ''}.npz"
        if not path.exists():
            parts = {"mixed": (("first", count // 2), ("second", count - count // 2))}.get(which, ((which, count),))
            drawn = [self._lines(SETS[name], part) for name, part in parts]
            inputs = np.concatenate([d[0] for d in drawn])
            textlines.save_npz(path, inputs, np.concatenate([d[1] for d in drawn]) if labeled else None)
        return str(path)

    def _lines(self, lines, count: int):
        if self.name == "ppocr-cls":
            return lines.cls_dataset(count, CALIBRATION_SEED)
        return lines.rec_dataset(count, CALIBRATION_SEED)

    def hits(self, model, threads: int, which: str) -> np.ndarray:
        """Per line of the `which` set, whether `model` scores it right."""
        inputs, targets = self.evals[which]
        if self.name == "ppocr-cls":
            return textlines.cls_hits(model, inputs, targets, threads=threads)
        return textlines.rec_hits(model, inputs, targets, threads=threads)


def build_tasks(names: list[str], eval_samples: int, demo_data: str,
                eval_sets: tuple[str, ...] = ("first", "second")) -> tuple[list[Task], list[str]]:
    tasks, notes = [], []
    for name in names:
        if name == "ppocr-cls":
            task = Task(name, "accuracy", real_model(name), "x=1,3,48,192")
            task.evals = {which: SETS[which].cls_dataset(eval_samples, EVAL_SEED) for which in eval_sets}
        elif name == "ppocr-rec":
            task = Task(name, "exact match", real_model(name), "x=1,3,48,320")
            task.evals = {which: SETS[which].rec_dataset(eval_samples, EVAL_SEED) for which in eval_sets}
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
    calibration = task.calibration(folder, args.num_samples, args.calibration_set, args.labeled)
    overrides = train_overrides(args.train)
    # compile's batch size and seed are its options, which it hands to the training settings
    # (the seed also draws the held-out part, as compile's --seed does)
    batch_size = overrides.pop("batch_size", CompileOptions.batch_size)
    seed = overrides.pop("seed", CompileOptions.seed)
    options = CompileOptions(ceiling=ceiling, method=method, data=calibration, batch_size=batch_size, seed=seed,
                             num_samples=args.num_samples, input_shapes=[task.input_shape] if task.input_shape else None,
                             latency_repeats=1, latency_rounds=1, threads=args.threads, int8=args.int8, placement=args.placement,
                             calibrate=args.calibrate,
                             training=TrainConfig(epochs=args.epochs, block_epochs=args.block_epochs, **overrides))
    row: dict[str, Any] = {"model": task.name, "ceiling": ceiling, "method": method, "metric": task.metric}
    started = time.perf_counter()
    try:
        result = compile_model(task.path, options)
    except (InputError, VerificationError) as exc:
        row.update(error=str(exc).splitlines()[0], compile_s=time.perf_counter() - started)
        return row
    row["compile_s"] = time.perf_counter() - started
    row["maps"] = len(result.plan.maps)
    row["training"] = training_summary(result.report.get("training"))
    row["timings_s"] = result.report.get("timings_s")  # per pass: where the compile's time went
    row["map_costs"] = [{"name": m["name"], "shape": m["shape"], "C": m["C"], "k": m["k"], "cost_alone": m["cost_alone"]}
                        for m in result.report.get("maps", [])]  # which maps the drop comes from
    what, agreement = gated_agreement(result.report["fidelity"])  # the figure compile's own report leads with
    row["held_out_agreement"] = {"metric": what, "value": agreement,
                                 "ignored_classes": list(result.report["fidelity"].get("ignored_classes", ()))}
    if task.evals:
        for which in task.evals:
            if which not in task.cache:
                task.cache[which] = task.hits(task.path, args.threads, which)
            original, compressed = task.cache[which], task.hits(result.model, args.threads, which)
            drop, error = paired_drop(original, compressed)
            suffix = SUFFIX[which]
            row["original" + suffix], row["compressed" + suffix] = float(original.mean()), float(compressed.mean())
            row["drop_points" + suffix] = 100 * drop
            row["drop_se_points" + suffix] = None if error is None else 100 * error
            row["hits" + suffix] = {"original": original.astype(int).tolist(), "compressed": compressed.astype(int).tolist()}
    else:
        fid = result.report["fidelity"]
        row["original"], row["compressed"] = fid["accuracy_reference"], fid["accuracy_candidate"]
        if row["original"] is not None and row["compressed"] is not None:
            row["drop_points"] = 100 * (row["original"] - row["compressed"])
    return row


def training_summary(training: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where a learned compile spent its time: the block stage's seconds and epochs (and each map's, with the
    held-out block losses that chose its epoch), the end-to-end
    epochs run (each epoch's held-out score and distillation loss), the held-out score before
    them (the stage's) and the best."""
    if not training:
        return None
    stage = training.get("block_stage") or {}
    return {"block_s": stage.get("seconds"), "block_epochs": sum(m["epochs"] for m in stage.get("maps", [])),
            "epochs": len(training["history"]), "initial_score": training["initial_score"],
            "initial_loss": training.get("initial_loss"),
            "best_score": training["best_score"], "best_epoch": training["best_epoch"],
            "stop_reason": training["stop_reason"],
            "history": [{"score": e["score"], "held_out_loss": e["held_out_loss"], "seconds": e["seconds"]}
                        for e in training["history"]],
            "block_maps": [{"name": m["name"], "epochs": m["epochs"], "best_epoch": m.get("best_epoch"),
                            "held_out_losses": m.get("held_out_losses", []), "seconds": m["seconds"]}
                           for m in stage.get("maps", [])]}


def markdown(rows: list[dict[str, Any]], eval_sets: tuple[str, ...] = ("first",)) -> str:
    """The table: original, compressed and drop for each scored set (columns "1" and "2")."""
    head, rule = "| model | ceiling | method | maps | metric |", "|---|---|---|---:|---|"
    for which in eval_sets:
        n = COLUMN[which]
        head += f" original {n} | compressed {n} | drop {n} (pts, ± s.e.) |"
        rule += "---:|---:|---:|"
    lines = [head + " compile s |", rule + "---:|"]

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    for r in rows:
        start = f"| {r['model']} | {r['ceiling']} | {r['method']} |"
        if "error" in r:
            lines.append(f"{start} - | {r['metric']} |" + " - | - | - |" * len(eval_sets)
                         + f" {r['compile_s']:.1f} (failed: {r['error']}) |")
            continue
        cells = ""
        for which in eval_sets:
            suffix = SUFFIX[which]
            cells += (f" {pct(r.get('original' + suffix))} | {pct(r.get('compressed' + suffix))} | "
                      f"{points(r.get('drop_points' + suffix), r.get('drop_se_points' + suffix))} |")
        lines.append(f"{start} {r['maps']} | {r['metric']} |{cells} {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def points(drop: float | None, error: float | None) -> str:
    """A drop in points, with its standard error where known: `2.4 ± 0.5`."""
    if drop is None:
        return "-"
    return f"{drop:.1f}" if error is None else f"{drop:.1f} ± {error:.1f}"


def plot(rows: list[dict[str, Any]], ceilings: list[str], path: Path,
         eval_sets: tuple[str, ...] = ("first",)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for which, style, grey in zip(eval_sets, ("-", "--"), ("gray", "silver"), strict=False):
            suffix, name = SUFFIX[which], f"set {COLUMN[which]}"
            mine = [r for r in rows if r["model"] == model and r.get("compressed" + suffix) is not None]
            for method in dict.fromkeys(r["method"] for r in mine):
                points = [(ceilings.index(r["ceiling"]), 100 * r["compressed" + suffix])
                          for r in mine if r["method"] == method]
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", linestyle=style, label=f"{method}, {name}")
            original = next((r["original" + suffix] for r in mine if r.get("original" + suffix) is not None), None)
            if original is not None:
                ax.axhline(100 * original, color=grey, linestyle=":", label=f"original, {name}")
        metric = next((r["metric"] for r in rows if r["model"] == model), "")
        ax.set(title=model, xlabel="ceiling", ylabel=f"{metric} (%)", ylim=(0, 102),
               xticks=range(len(ceilings)), xticklabels=ceilings)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--train KEY=VALUE` pairs as TrainConfig fields, each value parsed as its field's type
    (an optional field's: `--train block_ridge=1e-3` is a float, `none` is None)."""
    hints = typing.get_type_hints(TrainConfig)
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if key not in hints:
            raise InputError(f"--train {pair!r}: TrainConfig has no field {key!r}")
        kind = next((t for t in typing.get_args(hints[key]) if t is not type(None)), hints[key])
        if text.lower() == "none" and type(None) in typing.get_args(hints[key]):
            overrides[key] = None
        elif kind is bool:
            overrides[key] = text.lower() == "true"
        else:
            try:
                overrides[key] = kind(text)
            except ValueError:
                raise InputError(f"--train {pair!r}: {key} takes {kind.__name__} values") from None
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ppocr-cls,ppocr-rec,demo")
    parser.add_argument("--ceilings", default="2x,4x,8x")
    parser.add_argument("--methods", default="pca,random,learned")
    parser.add_argument("--num-samples", type=int, default=256, help=f"calibration lines (at most {MAX_CALIBRATION})")
    parser.add_argument("--eval-samples", type=int, default=1200,
                        help="held-out lines scored per model and set (the drop's standard error falls as its square root)")
    parser.add_argument("--eval-set", choices=("first", "second", "both"), default="both",
                        help="score on set 1 (textlines), set 2 (otherlines) or both")
    parser.add_argument("--calibration-set", choices=("first", "second", "mixed"), default="first",
                        help="the set whose lines calibrate and train the projections (mixed: half of each)")
    parser.add_argument("--labeled", action="store_true",
                        help="give the classifier's calibration lines their angles (default: unlabeled, as the "
                             "issues measure; with labels training picks epochs by held-out accuracy)")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="training epochs (random, learned)")
    parser.add_argument("--block-epochs", type=int, default=TrainConfig.block_epochs,
                        help="block reconstruction epochs per map before training (learned)")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                        help="any other TrainConfig field, e.g. --train patience=0 --train augment=strong")
    parser.add_argument("--int8", action="store_true", help="compile --int8: score the quantized models")
    parser.add_argument("--placement", choices=PLACEMENTS, default=CompileOptions.placement,
                        help="compile --placement: before the activation after 1x1 convs (pointwise), "
                             "wherever allowed (before), or at the stored map (after)")
    parser.add_argument("--calibrate", choices=CALIBRATIONS, default=DEFAULT_CALIBRATION,
                        help="with --int8: onnxruntime's calibrator (compile --calibrate)")
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
    eval_sets = ("first", "second") if args.eval_set == "both" else (args.eval_set,)
    tasks, more = build_tasks([m.strip() for m in args.models.split(",") if m.strip()], args.eval_samples,
                              args.demo_data, eval_sets)
    notes += more
    notes.append(f"calibrated on {SET_NAMES[args.calibration_set]} (seed {CALIBRATION_SEED}); scored on "
                 + ", ".join(f"{COLUMN[w]} = {SET_NAMES[w]}" for w in eval_sets)
                 + f" ({args.eval_samples} lines each, seed {EVAL_SEED})")
    if any(t.name == "demo" for t in tasks) and eval_sets != ("first",):
        notes.append("demo: scored on its own held-out digits, shown in the set 1 columns")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            for ceiling in ceilings:
                for method in methods:
                    row = run_one(task, ceiling, method, args, Path(tmp))
                    rows.append(row)
                    status = row.get("error") or ", ".join(
                        f"{COLUMN[w]}: {row.get('compressed' + SUFFIX[w])}" for w in eval_sets)
                    print(f"{task.name} {ceiling} {method}: {status} ({row['compile_s']:.1f} s)", file=sys.stderr)
    has_demo = any(not t.evals for t in tasks)  # the demo's figures are in the set 1 columns
    shown = tuple(w for w in SETS if w in eval_sets or (w == "first" and has_demo))
    table = markdown(rows, shown)
    print(table)
    for note in notes:
        print(f"note: {note}")
    (out / "ceiling_sweep.md").write_text(table + "".join(f"\nnote: {n}" for n in notes))
    (out / "ceiling_sweep.json").write_text(json.dumps({"rows": rows, "notes": notes, "args": vars(args)}, indent=2))
    if rows:
        plot(rows, ceilings, out / "ceiling_sweep.png", shown)
        print(f"wrote {out / 'ceiling_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
