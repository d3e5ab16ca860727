"""Measuring a model's maps (`measure_model`, `fmcompress codec`): every figure recomputed
another way, from the maps run in onnxruntime here and the bytes of the streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zstandard
from codectools import entropy_floor

from fmcompress import codec

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits_resnet.onnx"


def test_zstd_bits_counts_compressed_bytes():
    assert codec.zstd_bits(np.zeros(100_000, np.int8)) < 8 * 200
    noise = np.random.default_rng(3).integers(-128, 128, 10_000).astype(np.int8)
    assert codec.zstd_bits(noise) > 8 * 9_900


def stored_map_values(model: Path | str, names: list[str], batches) -> dict[str, np.ndarray]:
    """The float maps `names` of `model` on `batches`, run with onnxruntime directly."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model))
    present = {out.name for out in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [session.run(names, inputs) for inputs, _ in batches]
    return {name: np.concatenate([out[i] for out in outputs]) for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def digits_report():
    from fmcompress.data import input_specs, load_dataset
    from fmcompress.modelio import load_model

    dataset = load_dataset("mnist", input_specs(load_model(DIGITS)), num_samples=6)
    report = codec.measure_model(DIGITS, dataset.batches(2), window=4)
    return report, stored_map_values(DIGITS, [row.name for row in report.rows], dataset.batches(2))


def test_measure_model_counts_the_bytes_of_the_streams(digits_report):
    """Each map's bits per element, recomputed from the maps themselves (run in
    onnxruntime here, quantised, every sample coded on its own): the lengths of the streams
    for baseline and dcac, zstd's own output for zstd; the totals are bits over elements."""
    report, values = digits_report
    names = [row.name for row in report.rows]
    assert len(names) == 8 and all("Relu" in name for name in names)  # the Flatten is 2-D
    assert report.samples == 6
    total_bits = {"zstd": 0, "baseline": 0, "dcac": 0}
    for row in report.rows:
        maps = values[row.name]
        assert row.elements == maps.size
        q = codec.quantize(maps, np.abs(maps).max() / 127)
        bits = {"zstd": 0, "baseline": 0, "dcac": 0}
        for sample in q:
            bits["zstd"] += 8 * len(zstandard.ZstdCompressor(level=3).compress(sample.tobytes()))
            bits["baseline"] += 8 * len(codec.encode(sample, method="baseline"))
            bits["dcac"] += 8 * len(codec.encode(sample, method="dcac", window=4))
        for coding, counted in bits.items():
            assert getattr(row, f"{coding}_bpe") == pytest.approx(counted / maps.size)
            total_bits[coding] += counted
        assert 8 * row.baseline_bpe * maps.size >= entropy_floor(q, None)
        # dcac only keeps references the shared models confirm: at worst the index overhead
        assert row.dcac_bpe <= row.baseline_bpe + 0.02
    elements = sum(values[name].size for name in names)
    for coding, counted in total_bits.items():
        assert report.total_bpe(coding) == pytest.approx(counted / elements)
    data = report.to_dict()
    assert data["total"]["elements"] == elements
    assert data["total"]["dcac_bpe"] == pytest.approx(total_bits["dcac"] / elements)
    assert all(rate > 0 for rate in report.megabytes_per_second("dcac"))


@pytest.mark.slow  # compiles the demo model first
def test_measure_model_on_a_compressed_model():
    from fmcompress import api
    from fmcompress.data import input_specs, load_dataset
    from fmcompress.modelio import load_model

    result = api.compile(DIGITS, ceiling="4x", method="pca", data="mnist", num_samples=64)
    dataset = load_dataset("mnist", input_specs(load_model(DIGITS)), num_samples=3)
    report = codec.measure_model(result.model, dataset.batches(3))
    channels = {row.shape[1] for row in report.rows if row.shape[2:] == [28, 28]}
    assert 4 in channels  # the projected 28x28 maps keep 4 of their 16 channels
    assert all(row.dcac_bpe <= row.baseline_bpe + 0.05 for row in report.rows)


def test_cli_codec_table_and_json(tmp_path):
    import json

    from click.testing import CliRunner

    from fmcompress.cli import main

    report = tmp_path / "codec.json"
    result = CliRunner().invoke(main, ["codec", "models/digits_resnet.onnx", "--data", "mnist",
                                       "--num-samples", "2", "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["schema_version"] == 1 and data["samples"] == 2 and data["maps"]
    assert f"DC-AC {data['total']['dcac_bpe']:.3f}" in result.output
    assert data["total"]["dcac_bpe"] <= data["total"]["baseline_bpe"] < 8.0
    missing = CliRunner().invoke(main, ["codec", str(tmp_path / "absent.onnx")])
    assert missing.exit_code == 2 and missing.output.startswith("error: ")


@pytest.mark.slow  # compiles the demo model first
def test_compiled_model_stacks_projection_and_coding(tmp_path):
    """On a model compile emitted, the report knows the original maps' size (from the plan in
    the metadata) and stacks projection and lossless coding."""
    from fmcompress import api
    from fmcompress.data import input_specs, load_dataset
    from fmcompress.modelio import load_model

    original = load_model("models/digits_resnet.onnx")
    compiled = api.compile(original, ceiling="4x", method="pca", data="mnist", num_samples=64,
                           latency_rounds=1, latency_repeats=1).model
    dataset = load_dataset("mnist", input_specs(original, {}), num_samples=2)
    before = codec.measure_model(original, dataset.batches(1))
    after = codec.measure_model(compiled, dataset.batches(1))
    stacked = after.stacked()
    assert before.stacked() is None and stacked is not None
    assert stacked["original_elements"] == before.elements  # every projected map found by name
    assert stacked["projection_ratio"] > 1.5 and stacked["lossless_ratio"] > 1.0
    # the original maps in int8 over the compiled maps' DC-AC bits, counted from the rows
    dcac_bits = sum(row.dcac_bpe * row.elements for row in after.rows)
    assert stacked["total_ratio_vs_int8"] == pytest.approx(8 * before.elements / dcac_bits)
