"""Does a compressed recognizer lose its lines by overfitting, or on the lines it trained on too?

    python examples/rec_fit_check.py COMPRESSED.onnx [--num-samples 512] [--eval-samples 300]
        [--held-out-fraction 0.25] [--seed 0]

COMPRESSED is PP-OCRv4's recognizer compiled from the lines that
`examples/ceiling_sweep.py` renders for calibration (`--num-samples` of them, seed
0). This script renders the same lines again, with their texts, splits them as
compile does (`Dataset.split`), and prints the exact match of the original and of
COMPRESSED on the part that trained the projections, on the part compile held out,
and on the sweep's separate evaluation lines. A drop as large on the training part
as on the others means the projections cannot fit even the lines they saw: more or
newer lines will not help, capacity or optimisation will.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ceiling_sweep import CALIBRATION_SEED, EVAL_SEED

from fmcompress.data import Dataset
from fmcompress.evaluation import textlines
from fmcompress.evaluation.thirdparty import real_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("compressed", type=Path)
    parser.add_argument("--num-samples", type=int, default=512, help="calibration lines compile was given")
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--held-out-fraction", type=float, default=0.25, help="compile's held-out share")
    parser.add_argument("--seed", type=int, default=0, help="compile's --seed (it draws the split)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    inputs, texts = textlines.rec_dataset(args.num_samples, CALIBRATION_SEED)
    indices = Dataset({"index": np.arange(len(texts))})
    trained, held_out = (part.inputs["index"] for part in indices.split(args.held_out_fraction, args.seed))
    eval_inputs, eval_texts = textlines.rec_dataset(args.eval_samples, EVAL_SEED)
    parts = {"trained on": (inputs[trained], [texts[i] for i in trained]),
             "held out by compile": (inputs[held_out], [texts[i] for i in held_out]),
             "evaluation lines": (eval_inputs, eval_texts)}
    original = real_model("ppocr-rec")
    print("| lines | count | original | compressed | drop (points) |")
    print("| --- | --- | --- | --- | --- |")
    for name, (lines, labels) in parts.items():
        before = textlines.rec_exact_match(original, lines, labels, threads=args.threads)
        after = textlines.rec_exact_match(args.compressed, lines, labels, threads=args.threads)
        print(f"| {name} | {len(labels)} | {before:.1%} | {after:.1%} | {100 * (before - after):.1f} |")


if __name__ == "__main__":
    main()
