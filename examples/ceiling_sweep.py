"""Ceiling sweep: how many maps each ceiling compresses, to what ranks, and which are infeasible.

    python examples/ceiling_sweep.py MODEL.onnx [--input-shape 1,3,224,224] [--ceilings 2x,4x,8x,256KB]

Runs only the analysis and plan passes (no data, no torch), so it is quick: use it to
pick a ceiling before paying for `compile`.
"""

from __future__ import annotations

import argparse
from collections import Counter

from fmcompress.errors import InputError
from fmcompress.modelio import load_model
from fmcompress.passes import PassContext
from fmcompress.passes.plan import PlanPass
from fmcompress.shapes import parse_input_shapes, resolve_input_shapes
from fmcompress.units import format_bytes, parse_ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--input-shape", action="append", default=[])
    parser.add_argument("--ceilings", default="2x,4x,8x,16x,512KB,256KB,128KB")
    args = parser.parse_args()
    model = load_model(args.model)
    shapes = resolve_input_shapes(model, parse_input_shapes(args.input_shape, model))
    print(f"{'ceiling':>9} {'bytes':>11} {'maps':>5}  ranks (C->k: count)")
    for text in args.ceilings.split(","):
        try:
            plan = PlanPass(parse_ceiling(text)).run(model, PassContext(input_shapes=shapes)).data
        except InputError as exc:
            print(f"{text:>9} {'':>11} {'-':>5}  {exc}")
            continue
        ranks = Counter(f"{m.channels}->{m.k}" for m in plan.maps)
        print(f"{text:>9} {format_bytes(plan.ceiling_bytes):>11} {len(plan.maps):>5}  "
              + ", ".join(f"{r}: {n}" for r, n in ranks.items()))


if __name__ == "__main__":
    main()
