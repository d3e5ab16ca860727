"""Fidelity, FLOP counts, side-by-side latency and batched onnxruntime runs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fmcompress.errors import InputError
from fmcompress.metrics import (
    count_flops,
    ctc_labels,
    fidelity,
    ort_latency,
    paired_drop,
    sequence_agreement,
    space_classes,
)
from fmcompress.ortrun import run_ort

# ---------------------------------------------------------------------- fidelity


@pytest.mark.parametrize("flips", [0, 3, 40])
def test_paired_drop_and_its_standard_error_match_scipy(flips: int) -> None:
    from scipy import stats

    rng = np.random.default_rng(flips)
    reference = rng.random(300) < 0.9
    candidate = reference.copy()
    candidate[rng.choice(300, size=flips, replace=False)] ^= True
    drop, error = paired_drop(reference, candidate)
    differences = reference.astype(float) - candidate.astype(float)
    assert drop == pytest.approx(reference.mean() - candidate.mean())
    assert error == pytest.approx(stats.sem(differences), abs=1e-15)
    if flips:  # scipy's paired t statistic is the drop over its standard error
        assert drop / error == pytest.approx(stats.ttest_rel(reference.astype(float), candidate.astype(float)).statistic)


def test_paired_drop_needs_two_equal_sets() -> None:
    assert paired_drop([True], [False]) == (1.0, None)
    with pytest.raises(InputError, match="equal non-empty"):
        paired_drop([True, False], [True])
    with pytest.raises(InputError, match="equal non-empty"):
        paired_drop([], [])


def test_identical_outputs_are_perfect() -> None:
    logits = np.random.default_rng(0).normal(size=(8, 5))
    result = fidelity([logits], [logits.copy()], np.argmax(logits, axis=1))
    assert result.top1_agreement == 1.0
    assert result.accuracy_reference == result.accuracy_candidate == 1.0
    assert result.cosine_similarity == pytest.approx(1.0)
    assert result.relative_error == 0.0 and result.max_abs_error == 0.0


def test_known_agreement_accuracy_cosine_and_errors() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [1.0, 1.0]])
    candidate = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [2.0, 2.0]])
    labels = np.array([0, 1, 0, 1])
    result = fidelity([reference], [candidate], labels)
    # argmax: reference 0,1,1,0 (a tie picks the first) / candidate 0,0,1,0
    assert result.top1_agreement == pytest.approx(0.75)
    assert result.accuracy_reference == pytest.approx(0.5)  # samples 0 and 1
    assert result.accuracy_candidate == pytest.approx(0.25)  # sample 0
    # per-sample hits 1,1,0,0 and 1,0,0,0: differences 0,1,0,0, std 0.5 over sqrt(4)
    assert result.accuracy_drop_error == pytest.approx(0.25)
    assert result.cosine_similarity == pytest.approx((1 + 0 + 1 + 1) / 4)
    diff_norm = np.sqrt(2 + 2)  # sample 1 differs by (1, -1), sample 3 by (1, 1)
    assert result.relative_error == pytest.approx(diff_norm / np.sqrt(1 + 1 + 25 + 2))
    assert result.max_abs_error == pytest.approx(1.0)
    assert set(result.to_dict()) == {"top1_agreement", "sequence_agreement", "accuracy_reference",
                                     "accuracy_candidate", "accuracy_drop_error", "cosine_similarity",
                                     "relative_error", "max_abs_error", "ignored_classes"}
    assert result.sequence_agreement is None


def test_random_outputs_against_a_sample_by_sample_oracle() -> None:
    """Two float32 outputs (logits and a feature map) with noise: every figure recomputed
    here one sample at a time in float64."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((50, 7)).astype(np.float32)
    feature = rng.standard_normal((50, 3, 4, 4)).astype(np.float32)
    noisy = [logits + 0.6 * rng.standard_normal(logits.shape).astype(np.float32),
             feature + 0.3 * rng.standard_normal(feature.shape).astype(np.float32)]
    labels = rng.integers(0, 7, 50)
    result = fidelity([logits, feature], noisy, labels)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))

    ref_class = [int(np.argmax(row)) for row in logits]
    cand_class = [int(np.argmax(row)) for row in noisy[0]]
    agree = sum(ref_class[i] == cand_class[i] for i in range(50))
    assert result.top1_agreement == pytest.approx(agree / 50)
    assert 0 < result.top1_agreement < 1  # the noise flips some classes, not all
    assert result.accuracy_reference == pytest.approx(sum(ref_class[i] == labels[i] for i in range(50)) / 50)
    assert result.accuracy_candidate == pytest.approx(sum(cand_class[i] == labels[i] for i in range(50)) / 50)
    pairs = [(logits, noisy[0]), (feature, noisy[1])]
    per_output = [np.mean([cosine(r[i], c[i]) for i in range(50)]) for r, c in pairs]
    assert result.cosine_similarity == pytest.approx(np.mean(per_output), rel=1e-9)
    squared = sum(float(((c.astype(np.float64) - r) ** 2).sum()) for r, c in pairs)
    reference = sum(float((r.astype(np.float64) ** 2).sum()) for r, _ in pairs)
    assert result.relative_error == pytest.approx(np.sqrt(squared / reference), rel=1e-9)
    worst = max(abs(float(c.flat[i]) - float(r.flat[i])) for r, c in pairs for i in range(r.size))
    assert result.max_abs_error == pytest.approx(worst, rel=1e-12)


def one_hot_steps(paths: list[list[int]], classes: int = 4) -> np.ndarray:
    """[N, T, classes] distributions whose argmax at each step is the given path."""
    out = np.full((len(paths), len(paths[0]), classes), 0.1 / (classes - 1))
    for n, path in enumerate(paths):
        out[n, np.arange(len(path)), path] = 0.9
    return out


def test_sequence_agreement_compares_greedy_ctc_decodings() -> None:
    # blank = 0, the class the reference predicts most often
    reference = one_hot_steps([[0, 1, 1, 0, 2, 0], [0, 3, 0, 0, 3, 0], [0, 0, 2, 0, 0, 0], [1, 0, 0, 2, 0, 0]])
    candidate = one_hot_steps([[1, 1, 0, 0, 2, 2],  # "12" again, one step earlier and later: agrees
                               [0, 3, 3, 0, 0, 0],  # "3" instead of "33": repeats merge only without a blank
                               [0, 0, 2, 0, 0, 0],  # the same path
                               [1, 0, 0, 0, 0, 0]])  # a character lost
    result = fidelity([reference], [candidate])
    assert result.sequence_agreement == pytest.approx(0.5)
    assert result.top1_agreement is None
    per_step = np.mean(reference.argmax(-1) == candidate.argmax(-1))
    assert per_step == pytest.approx(18 / 24)  # mostly agreeing steps hide two wrong strings
    # YOLO-style [N, 4 + classes, anchors] scores are no distributions: no sequence figure
    assert fidelity([np.abs(reference) * 300], [np.abs(reference) * 300]).sequence_agreement is None


def test_ignored_classes_drop_after_repeats_merge() -> None:
    space = 5
    # "1 1" read with a margin space before it, against "11" and against "1": only the margins go
    reference = one_hot_steps([[0, 1, 0, 1, 0, 0], [0, 1, space, 1, 0, 0], [0, 1, 0, 1, 0, 0]], classes=6)
    candidate = one_hot_steps([[space, 1, 0, 1, 0, space], [0, 1, 1, 1, 0, 0], [0, 1, space, 1, 0, 0]], classes=6)
    assert sequence_agreement(reference, candidate) == pytest.approx(0.0)
    # sample 0: margins only; sample 1: "1 1" is two labels, "111" merges to one; sample 2: "11" = "1 1"
    assert sequence_agreement(reference, candidate, ignore=(space,)) == pytest.approx(2 / 3)
    assert ctc_labels(np.array([1, space, 1]), 0, (space,)).tolist() == [1, 1]
    figures = fidelity([reference], [candidate], ignore=(space,))
    assert figures.ignored_classes == (space,) and figures.sequence_agreement == pytest.approx(2 / 3)
    assert fidelity([reference[:, 0]], [candidate[:, 0]], ignore=(space,)).ignored_classes == ()  # no sequence


def _ctc_model(character: str | None, classes: int | str) -> onnx.ModelProto:
    """x -> Softmax(x), [N, 8, classes], with PaddleOCR's `character` metadata when given."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, classes])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, classes])
    model = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "ctc", [x], [y]))
    if character is not None:
        model.metadata_props.add(key="character", value=character)
    return model


def test_space_classes_from_paddleocr_metadata() -> None:
    assert space_classes(_ctc_model("a\nb\nc", 5)) == (4,)  # blank, a, b, c, then the appended space
    assert space_classes(_ctc_model("a\n \nc", 5)) == (2, 4)  # a space in the dictionary itself
    assert space_classes(_ctc_model("a\nb\nc", "C")) == (4,)  # a symbolic class axis: taken as named
    assert space_classes(_ctc_model("a\nb", 5)) == ()  # not this head's dictionary
    assert space_classes(_ctc_model(None, 5)) == ()


def test_four_d_logits_and_several_outputs() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 5.0]])[:, :, None, None]
    flipped = logits[:, ::-1]
    feature = np.ones((2, 3, 4, 4))
    result = fidelity([logits, feature], [flipped, -feature], labels=None)
    assert result.top1_agreement == 0.0
    assert result.accuracy_reference is None and result.accuracy_candidate is None
    assert result.accuracy_drop_error is None
    cos_logits = np.mean([4 / 5, 0.0])  # (2,1)·(1,2) / 5 and (0,5)·(5,0) / 25
    assert result.cosine_similarity == pytest.approx((cos_logits + -1.0) / 2)
    assert result.max_abs_error == pytest.approx(5.0)


def test_no_top1_for_spatial_outputs_and_zero_samples_agree() -> None:
    maps = np.zeros((3, 2, 4, 4))
    result = fidelity([maps], [maps.copy()], np.array([0, 1, 0]))
    assert result.top1_agreement is None and result.accuracy_reference is None
    assert result.cosine_similarity == 1.0 and result.relative_error == 0.0
    assert fidelity([maps], [maps + 1], None).relative_error == float("inf")


@pytest.mark.parametrize(
    ("reference", "candidate", "labels", "message"),
    [
        ([np.zeros((2, 3))], [np.zeros((2, 3))], np.array([0, 3]), "3 classes"),
        ([np.zeros((2, 3))], [np.zeros((2, 3))], np.array([-1, 0]), "labels range"),
        ([np.zeros((2, 3))], [np.zeros((2, 3))], np.array([0, 1, 2]), "3 labels for 2"),
        ([np.zeros((2, 3))], [np.zeros((2, 4))], None, "differs"),
        ([np.zeros((2, 3))], [], None, "cannot compare"),
    ],
)
def test_fidelity_bad_input(reference: list, candidate: list, labels: np.ndarray | None, message: str) -> None:
    with pytest.raises(InputError, match=message):
        fidelity(reference, candidate, labels)


# ------------------------------------------------------------------------ FLOPs


def _static_model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], output: str,
                  weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(_as_onnx_dtype(array), name) for name, array in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _as_onnx_dtype(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype.kind == "f" else array.astype(np.int64)


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in values}


def test_flops_of_conv_grouped_conv_gemm_and_relu() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),  # 3->8, 3x3, 16x16
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], group=4, strides=[2, 2]),  # 8->8, groups 4, 1x1
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),  # 512 -> 10
    ]
    weights = {"w1": np.zeros((8, 3, 3, 3)), "b1": np.zeros(8), "w2": np.zeros((8, 2, 1, 1)),
               "w3": np.zeros((10, 512)), "b3": np.zeros(10)}
    model = _static_model(nodes, {"x": [2, 3, 16, 16]}, "y", weights)
    conv1 = 2 * 8 * 16 * 16 * 3 * 9
    conv2 = 2 * 8 * 8 * 8 * 2
    gemm = 2 * 10 * 512
    assert count_flops(model, _inferred_shapes(model)) == 2 * (conv1 + conv2 + gemm)


def test_flops_of_conv_transpose_and_batched_matmul() -> None:
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["up"], strides=[2, 2], group=2),  # 4->6 channels
        helper.make_node("Reshape", ["up", "shape"], ["m"]),
        helper.make_node("MatMul", ["m", "k"], ["y"]),
    ]
    weights = {"w": np.zeros((4, 3, 2, 2)), "shape": np.array([1, 6, 64]), "k": np.zeros((64, 5))}
    model = _static_model(nodes, {"x": [1, 4, 4, 4]}, "y", weights)
    shapes = _inferred_shapes(model)
    assert shapes["up"] == (1, 6, 8, 8)
    transpose = 4 * 4 * 4 * 3 * 2 * 2  # every input element to 3 output channels x 2x2 taps
    matmul = 6 * 5 * 64
    assert count_flops(model, shapes) == 2 * (transpose + matmul)
    del shapes["y"]  # the output shape is derived from the operands when missing
    assert count_flops(model, shapes) == 2 * (transpose + matmul)


def test_flops_need_static_shapes() -> None:
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    model = _static_model(nodes, {"a": [2, 3]}, "y", {"b": np.zeros((3, 4))})
    with pytest.raises(InputError, match="static shape"):
        count_flops(model, {"a": (2, "n"), "y": (2, 4)})


def test_flops_of_resnet18_at_224(resnet18_224: Path) -> None:
    from fmcompress.shapes import infer_tensor_infos

    model = onnx.load(str(resnet18_224))  # exported with a symbolic batch dim: pin it
    shapes = {name: info.shape for name, info in infer_tensor_infos(model, {"input": (1, 3, 224, 224)}).items()}
    macs = count_flops(model, shapes) / 2
    assert macs == pytest.approx(1.814e9, rel=0.005)  # the published 1.82 GMACs


# ---------------------------------------------------------- sessions and latency


def _linear_model(batch: int | str, scale: float) -> onnx.ModelProto:
    nodes = [helper.make_node("Mul", ["x", "s"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    model = _static_model(nodes, {"x": [batch, 4]}, "z", {"s": np.full(4, scale)})
    model.ir_version = 8
    return model


def _matmul_chain(count: int, rows: int = 256, width: int = 128) -> onnx.ModelProto:
    """`count` MatMuls in a row by one orthogonal matrix: the work grows linearly with `count`."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((width, width)))
    nodes, last = [], "x"
    for i in range(count):
        nodes.append(helper.make_node("MatMul", [last, "w"], [f"y{i}"]))
        last = f"y{i}"
    nodes.append(helper.make_node("Identity", [last], ["z"]))
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [rows, width])],
                              [numpy_helper.from_array(q.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _own_median_ms(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int = 40) -> float:
    """Median wall time of one run, timed here with a plain onnxruntime session (one thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def test_ort_latency_measures_ten_times_the_work_as_ten_times_slower() -> None:
    """2 against 20 MatMuls of [256,128]x[128,128] (~80 us each, far above the ~5 us a run
    costs): the ratio must be near 10, and each figure near the median of timings made here."""
    feeds = {"x": np.random.default_rng(1).standard_normal((256, 128)).astype(np.float32)}
    light, heavy = _matmul_chain(2), _matmul_chain(20)
    before = _own_median_ms(light, feeds), _own_median_ms(heavy, feeds)
    figures = ort_latency(light, heavy.SerializeToString(), feeds, rounds=7, repeats=20, warmup=2, threads=1)
    after = _own_median_ms(light, feeds), _own_median_ms(heavy, feeds)
    # ~10.5 on a quiet machine; load from other processes stretches the heavy runs more (15 seen at load 6 on
    # two cores), so the bounds are wide: a swapped ratio (0.1) or a unit slip (x1000) is far outside them
    assert 5 < figures.ratio < 20
    # own timings before and after bracket the figures (other processes may load the machine meanwhile)
    for figure, own in ((figures.reference_ms, (before[0], after[0])), (figures.candidate_ms, (before[1], after[1]))):
        assert 0.5 * min(own) < figure < 2 * max(own)
    own_ratios = before[1] / before[0], after[1] / after[0]
    assert 0.5 * min(own_ratios) < figures.ratio < 2 * max(own_ratios)
    swapped = ort_latency(heavy, light, feeds, rounds=7, repeats=20, warmup=2, threads=1)
    assert 1 / 20 < swapped.ratio < 1 / 5  # the ratio is candidate over reference, not the other way
    report = figures.to_dict("r", "c")
    assert (report["r"], report["c"], report["ratio"]) == (figures.reference_ms, figures.candidate_ms, figures.ratio)
    assert (report["rounds"], report["repeats"], report["threads"]) == (7, 20, 1)


# a no-op is capped at 20 runs; on a loaded machine its timed warm-up can be preempted for 5 ms (19 ran once in CI)
@pytest.mark.parametrize(("run_ms", "expected"), [(0.0, range(15, 21)), (50.0, (3,)), (12.0, range(4, 9)),
                                                  (300.0, (3,))])
def test_ort_latency_picks_its_repeats_from_the_slower_models_time(run_ms, expected, monkeypatch) -> None:
    """repeats None: about ROUND_BUDGET_MS (100 ms) a model and round, 3 to 20 runs; the figures
    say how many ran."""
    import fmcompress.metrics as metrics

    calls = []

    def runner(session, feeds):
        def run():
            calls.append(1)
            time.sleep(run_ms / 1000.0)
        return run

    monkeypatch.setattr(metrics, "_runner", runner)
    feeds = {"x": np.ones((1, 4), np.float32)}
    figures = ort_latency(_linear_model(1, 2.0), _linear_model(1, 2.0), feeds, rounds=1, warmup=1)
    assert figures.repeats in expected  # a 12 ms sleep may take 14-25 on a loaded machine
    assert len(calls) == 2 * (1 + figures.repeats)  # one warm-up run each, then one round each


def test_ort_latency_bad_input() -> None:
    feeds = {"x": np.ones((1, 4), np.float32)}
    with pytest.raises(InputError, match="input"):
        ort_latency(_linear_model(1, 2.0), _linear_model(1, 2.0), {"other": feeds["x"]})
    with pytest.raises(InputError, match="rounds"):
        ort_latency(_linear_model(1, 2.0), _linear_model(1, 2.0), feeds, rounds=0)


def test_run_ort_fixed_batch_and_dynamic_batch() -> None:
    x = np.arange(20, dtype=np.float32).reshape(5, 4) - 10
    batches = [({"x": x[:3]}, None), ({"x": x[3:]}, None)]
    expected = np.maximum(x * 2, 0)
    (fixed,) = run_ort(_linear_model(1, 2.0), batches)
    np.testing.assert_allclose(fixed, expected)
    (pairs,) = run_ort(_linear_model(2, 2.0), [{"x": x}])  # 5 samples in chunks of 2, one padded
    np.testing.assert_allclose(pairs, expected)
    (dynamic,) = run_ort(_linear_model("n", 2.0), batches)
    np.testing.assert_allclose(dynamic, expected)
    with pytest.raises(InputError, match="no data"):
        run_ort(_linear_model(1, 2.0), [])


def _margin_model(bias: np.ndarray, character: str | None) -> onnx.ModelProto:
    """x -> Softmax(x + bias), [N, 8, 5]; with PaddleOCR's dictionary metadata when given."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 5])
    nodes = [helper.make_node("Add", ["x", "bias"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "ctc", [x], [y], [numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if character is not None:
        model.metadata_props.add(key="character", value=character)
    return model


@pytest.mark.parametrize("character", ["a\nb\nc", None])
def test_verify_leaves_out_the_spaces_a_recognizer_reads_at_a_margin(tmp_path: Path, character: str | None) -> None:
    from fmcompress.compiler import verify_pair
    from fmcompress.reports.markdown import render_compile_markdown

    blank = np.zeros((1, 8, 5), np.float32)
    blank[0, ::2, 0] = 50  # every other step a blank, so class 0 is the blank
    margin = blank.copy()
    margin[0, 0, 4] = 100  # the candidate reads a space (class 4 with three entries) at the first step
    onnx.save(_margin_model(blank, character), tmp_path / "original.onnx")
    onnx.save(_margin_model(margin, character), tmp_path / "candidate.onnx")
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((32, 8, 5)).astype(np.float32))
    report = verify_pair(tmp_path / "original.onnx", tmp_path / "candidate.onnx", data=tmp_path / "x.npz",
                         num_samples=32)
    figures = report["fidelity"]
    if character is None:  # no dictionary: the space is a class like any other
        assert figures["sequence_agreement"] < 0.5 and figures["ignored_classes"] == ()
        assert any("sequence agreement" in warning for warning in report["warnings"])
    else:
        assert figures["sequence_agreement"] == 1.0 and figures["ignored_classes"] == (4,)
        assert report["warnings"] == []
        assert "(CTC decodings, space class 4 left out) | 100.00%" in render_compile_markdown({"fidelity": figures})
