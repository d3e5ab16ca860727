"""Measurement: how many bits per element a model's stored maps need, coded four ways.

`measure_model` runs a model in onnxruntime, quantises each stored map to int8 and codes
every sample raw, with zstd, with the baseline and with dcac, decoding and comparing
every stream. docs/codec.md explains how to read the figures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import zstandard

from ..errors import InputError, VerificationError
from .decoder import compiled_kernels, decode
from .encoder import encode_with_refs
from .quantization import calibrate_scale, quantize
from .stream import METHODS

ZSTD_LEVEL = 3
SCHEMA_VERSION = 1


def zstd_bits(array: np.ndarray, level: int = ZSTD_LEVEL) -> int:
    """Bits of the array's bytes compressed by zstandard (a general-purpose comparison)."""
    data = np.ascontiguousarray(array).tobytes()
    return 8 * len(zstandard.ZstdCompressor(level=level).compress(data))


@dataclass
class CodecRow:
    """One stored map: bits per element of each coding, over all samples."""

    name: str
    shape: list[int]  # as the model stores it, batch included
    samples: int
    elements: int  # over all samples
    scale: float  # the per-tensor int8 scale
    raw_bpe: float
    zstd_bpe: float
    baseline_bpe: float
    dcac_bpe: float
    residual_planes: float  # share of the planes dcac coded as a residual

    @property
    def gain_percent(self) -> float:
        """How many fewer bits dcac needs than the baseline, in percent."""
        return 100.0 * (1.0 - self.dcac_bpe / self.baseline_bpe) if self.baseline_bpe else 0.0


@dataclass
class CodecReport:
    """Bits per element of a model's stored int8 maps: raw, zstd, baseline, dcac."""

    source: str
    window: int
    samples: int
    rows: list[CodecRow]
    # seconds spent coding all maps, per method [encode, decode]: for MB/s, not for bits
    seconds: dict[str, list[float]] = field(default_factory=dict)
    # a compiled model's projected maps: stored name -> channels of the original map (C for k)
    projected: dict[str, int] = field(default_factory=dict)

    def stacked(self) -> dict[str, Any] | None:
        """Projection and lossless coding together, for a model `fmcompress compile` emitted:
        the original maps' elements (a map stored with k of C channels had C / k times as
        many), and how many times fewer bits DC-AC needs than the original maps in int8."""
        if not self.projected:
            return None
        stored = self.elements
        original = sum(row.elements * self.projected.get(row.name, row.shape[1]) / row.shape[1]
                       for row in self.rows)
        coded_bits = self.total_bpe("dcac") * stored
        return {"original_elements": int(round(original)), "stored_elements": stored,
                "projection_ratio": original / stored if stored else 1.0,
                "lossless_ratio": 8 * stored / coded_bits if coded_bits else 1.0,
                "total_ratio_vs_int8": 8 * original / coded_bits if coded_bits else 1.0}

    @property
    def elements(self) -> int:
        return sum(row.elements for row in self.rows)

    def total_bpe(self, coding: str) -> float:
        """Element-weighted bits per element of `coding` (raw, zstd, baseline or dcac)."""
        total = self.elements
        bits = sum(getattr(row, f"{coding}_bpe") * row.elements for row in self.rows)
        return bits / total if total else 0.0

    @property
    def gain_percent(self) -> float:
        baseline = self.total_bpe("baseline")
        return 100.0 * (1.0 - self.total_bpe("dcac") / baseline) if baseline else 0.0

    def megabytes_per_second(self, method: str) -> tuple[float, float]:
        """(encode, decode) MB/s of int8 map data (10^6 elements) for `method`."""
        encode_s, decode_s = self.seconds.get(method, (0.0, 0.0))
        mb = self.elements / 1e6
        return (mb / encode_s if encode_s else 0.0, mb / decode_s if decode_s else 0.0)

    def to_dict(self) -> dict[str, Any]:
        codings = ("raw", "zstd", "baseline", "dcac")
        return {
            "schema_version": SCHEMA_VERSION, "source": self.source, "window": self.window,
            "samples": self.samples,
            "maps": [{**asdict(row), "gain_percent": row.gain_percent} for row in self.rows],
            "total": {"elements": self.elements, **{f"{c}_bpe": self.total_bpe(c) for c in codings},
                      "gain_percent": self.gain_percent},
            "megabytes_per_second": {
                m: dict(zip(("encode", "decode"), self.megabytes_per_second(m), strict=True))
                for m in METHODS},
            "stacked": self.stacked(),
        }


def coded_maps(model: onnx.ModelProto | str | os.PathLike,
               input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None) -> list:
    """The stored maps the study codes (FeatureMaps): role "map", floating dtype, 3-D or 4-D."""
    from ..api import analyze

    report = analyze(model, input_shapes=input_shapes)
    return [fmap for fmap in report.stored
            if fmap.role == "map" and fmap.floating and len(fmap.shape) in (3, 4)]


def measure_model(model: onnx.ModelProto | str | os.PathLike, batches: Iterable[Any], *,
                  window: int = 8,
                  input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
                  threads: int | None = None) -> CodecReport:
    """Code every stored map of `model` on `batches` with raw, zstd, baseline and dcac.

    `batches` are dicts of model inputs (or (dict, labels) pairs, as Dataset.batches gives).
    Each map gets one int8 scale from all batches (calibrate_scale); each sample's map is
    coded on its own, planes = channels (a 3-D map [N, C, L] gives C planes of 1 x L).
    Every stream is decoded and compared: a mismatch raises VerificationError.
    """
    from ..modelio import load_model
    from ..ortrun import ort_session, run_ort

    proto = load_model(model)
    maps = coded_maps(proto, input_shapes)
    if not maps:
        raise InputError("the model stores no floating-point 3-D or 4-D feature map to code")
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {out.name for out in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=m.name) for m in maps
                              if m.name not in present)
    session = ort_session(probe, threads)
    outputs = [out.name for out in session.get_outputs()]
    values = dict(zip(outputs, run_ort(session, batches), strict=True))
    seconds = {method: [0.0, 0.0] for method in METHODS}
    compiled_kernels()  # loaded once per process, before the timing
    rows = [_measure_map(fmap.name, fmap.shape, values[fmap.name], window, seconds)
            for fmap in maps]
    source = proto.graph.name or "model" if isinstance(model, onnx.ModelProto) else str(model)
    return CodecReport(source, window, len(values[maps[0].name]), rows, seconds,
                       projected=_projected_channels(proto, [m.name for m in maps]))


def _projected_channels(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """A compiled model's stored maps that are projections: `X/fmc_k<k>` with X in the plan
    that compile writes into the metadata (fmcompress.plan), mapped to X's channels."""
    import json

    meta = {prop.key: prop.value for prop in model.metadata_props}
    try:
        entries = json.loads(meta.get("fmcompress.plan", "[]"))
        plan = {entry["name"]: int(entry["C"]) for entry in entries}
    except (ValueError, KeyError, TypeError):
        return {}
    found = {}
    for name in names:
        original, _, rank = name.rpartition("/fmc_k")
        if original in plan and rank.isdigit():
            found[name] = plan[original]
    return found


def _measure_map(name: str, shape: list[int], values: np.ndarray, window: int,
                 seconds: dict[str, list[float]]) -> CodecRow:
    scale = calibrate_scale([values])
    quantized = quantize(values, scale)
    if quantized.ndim == 3:  # [N, C, L]: C planes of one row each
        quantized = quantized[:, :, None, :]
    bits = {"zstd": 0, "baseline": 0, "dcac": 0}
    residual = 0
    for sample in quantized:
        bits["zstd"] += zstd_bits(sample)
        for method in METHODS:
            start = time.perf_counter()
            stream, refs = encode_with_refs(sample, method=method, window=window)
            middle = time.perf_counter()
            back = decode(stream)
            seconds[method][0] += middle - start
            seconds[method][1] += time.perf_counter() - middle
            if not np.array_equal(back, sample):
                raise VerificationError(f"{name}: the {method} stream did not decode to the map")
            bits[method] += 8 * len(stream)
        residual += int(np.count_nonzero(refs))
    elements = int(quantized.size)
    planes = quantized.shape[0] * quantized.shape[1]
    return CodecRow(name, list(shape), len(quantized), elements, scale, 8.0,
                    bits["zstd"] / elements, bits["baseline"] / elements, bits["dcac"] / elements,
                    residual / planes if planes else 0.0)
