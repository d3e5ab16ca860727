"""Benchmark of the lossless int8 codec (fmcompress.codec): speed, and bits on a real model.

Speed (default): ResNet-like int8 maps at batch 1 (64x56x56, 128x28x28, 256x14x14,
512x7x7): smooth random fields mixed across channels (so that neighbouring channels
correlate, as real maps do), ReLU, quantised with one per-tensor scale. Each round
encodes and decodes every map with each method; the figures are the median MB/s
(1 MB = 10^6 int8 elements) over the rounds, with the smallest and largest.

Bits (--model): every stored map of an ONNX model on real inputs, coded raw, with
zstd, with the baseline and with dcac (docs/codec.md explains the table).

    python examples/bench_codec.py                          # speed, 7 rounds
    python examples/bench_codec.py --rounds 15
    python examples/bench_codec.py --model models/digits_resnet.onnx --data mnist --samples 16
    python examples/bench_codec.py --model ppocr-det --input-shape x=1,3,640,640 --samples 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fmcompress import codec

RESNET_MAPS = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7))
PAPER_GAIN = 14.2  # percent, DC-AC over the same entropy coder without the correlation step


def resnet_like_maps(seed: int = 0) -> list[np.ndarray]:
    """int8 maps [1, C, H, W] with spatial smoothness, channel correlation and ReLU sparsity."""
    rng = np.random.default_rng(seed)
    maps = []
    for channels, height, width in RESNET_MAPS:
        sources = rng.standard_normal((channels // 4, height, width))
        # a cheap blur: average with the shifted copies along both axes
        for axis in (1, 2):
            sources = (sources + np.roll(sources, 1, axis) + np.roll(sources, -1, axis)) / 3
        mix = rng.standard_normal((channels, channels // 4)) * (rng.random((channels, channels // 4)) < 0.1)
        values = np.maximum(np.einsum("ck,khw->chw", mix, sources) - 0.1, 0)[None]
        maps.append(codec.quantize(values, codec.calibrate_scale([values])))
    return maps


def decoder_line() -> str:
    """Which decoder runs: the compiled one (numba, the `codec` extra) or numpy's, and what
    loading it costs once per process (not in the MB/s figures)."""
    start = time.perf_counter()
    jit = codec.compiled_kernels()
    if jit is None:
        return "decoder: numpy (install the `codec` extra for the compiled one)"
    return (f"decoder: compiled (numba {jit.numba.__version__}), loaded in "
            f"{time.perf_counter() - start:.2f} s once per process")


def bench_speed(rounds: int, window: int) -> None:
    print(decoder_line())
    maps = resnet_like_maps()
    megabytes = sum(m.size for m in maps) / 1e6
    print(f"{len(maps)} maps, {megabytes:.2f} MB of int8 per round, {rounds} rounds, window {window}")
    for method in codec.METHODS:
        encode_rates, decode_rates, bits = [], [], 0
        for _ in range(rounds):
            start = time.perf_counter()
            streams = [codec.encode(m, method=method, window=window) for m in maps]
            middle = time.perf_counter()
            decoded = [codec.decode(s) for s in streams]
            end = time.perf_counter()
            assert all(np.array_equal(a, b) for a, b in zip(maps, decoded, strict=True))
            encode_rates.append(megabytes / (middle - start))
            decode_rates.append(megabytes / (end - middle))
            bits = 8 * sum(len(s) for s in streams)
        print(f"{method:>8}: encode {_rate(encode_rates)}  decode {_rate(decode_rates)}  "
              f"{bits / (megabytes * 1e6):.3f} bits/element")
    zstd = sum(codec.zstd_bits(m) for m in maps) / (megabytes * 1e6)
    print(f"{'zstd':>8}: {zstd:.3f} bits/element (level {codec.ZSTD_LEVEL})")


def _rate(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} MB/s [{min(values):.1f}..{max(values):.1f}]"


def bench_model(model: str, data: str | None, samples: int, input_shapes: list[str] | None,
                window: int) -> None:
    from fmcompress.data import input_specs, load_dataset
    from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model
    from fmcompress.modelio import load_model
    from fmcompress.shapes import parse_input_shapes, resolve_input_shapes

    path = real_model(model) if model in REAL_MODELS else model
    proto = load_model(path)
    shapes = resolve_input_shapes(proto, parse_input_shapes(input_shapes, proto))
    dataset = load_dataset(data, input_specs(proto, shapes), num_samples=samples)
    report = codec.measure_model(proto, dataset.batches(1), window=window, input_shapes=input_shapes)
    print(f"{path}: {len(report.rows)} maps, {report.samples} samples ({dataset.source or data}), "
          f"window {window}")
    print(f"{'map':<36} {'shape':>16} {'raw':>5} {'zstd':>6} {'base':>6} {'dcac':>6} {'gain%':>6} {'res%':>5}")
    for row in report.rows:
        shape = "x".join(str(d) for d in row.shape[1:])
        print(f"{row.name[-36:]:<36} {shape:>16} {row.raw_bpe:5.1f} {row.zstd_bpe:6.3f} "
              f"{row.baseline_bpe:6.3f} {row.dcac_bpe:6.3f} {row.gain_percent:6.2f} "
              f"{100 * row.residual_planes:5.1f}")
    totals = {c: report.total_bpe(c) for c in ("raw", "zstd", "baseline", "dcac")}
    print(f"{'total (bits/element)':<53} {totals['raw']:5.1f} {totals['zstd']:6.3f} "
          f"{totals['baseline']:6.3f} {totals['dcac']:6.3f} {report.gain_percent:6.2f}")
    print(f"dcac gain over baseline: {report.gain_percent:.2f}% (the paper reports {PAPER_GAIN}%)")
    print(decoder_line())
    for method in codec.METHODS:
        encode_rate, decode_rate = report.megabytes_per_second(method)
        print(f"{method:>8}: encode {encode_rate:.1f} MB/s, decode {decode_rate:.1f} MB/s over these maps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--model", help="an ONNX file or a real model name (ppocr-det, ...)")
    parser.add_argument("--data", help="mnist, an image folder, an .npz (default: surrogate photos)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--input-shape", action="append", help="NAME=DIMS, as for fmcompress analyze")
    args = parser.parse_args()
    if args.model:
        bench_model(args.model, args.data, args.samples, args.input_shape, args.window)
    else:
        bench_speed(args.rounds, args.window)


if __name__ == "__main__":
    main()
