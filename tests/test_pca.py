"""PCA fitting: the frontier-cached fit equals the prefix-per-map algorithm it replaces.

The reference below is the original implementation (one forward pass per map, stopped at
the map's tensor), kept here and not in the package. The fit under test must give the same
projections for every cache budget (all frontiers cached, some, none), for maps that share a
step (Split outputs), come out of graph order, sit on a graph input or a graph output; and
with everything cached it must run each step once per batch (one pass up to the last map).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fmcompress.backend import OnnxModule
from fmcompress.backend.projection import (
    ChannelProjection,
    SecondMomentRecorder,
    StopForward,
    fit_pca,
    install_projections,
    pca_projection,
)
from fmcompress.errors import InputError
from fmcompress.featuremaps import Projection

Batches = Callable[[], Iterable[tuple[torch.Tensor, ...]]]


def fit_pca_prefix(executor: OnnxModule, maps, batches: Batches, positions_per_batch: int) -> dict[str, Projection]:
    """The original algorithm: for each map, every batch runs from the inputs up to the map."""
    fitted: dict[str, Projection] = {}
    try:
        for i, (name, channels, k) in enumerate(maps):
            recorder = SecondMomentRecorder(channels, positions_per_batch, seed=i)
            executor.set_transform(name, recorder)
            with torch.no_grad():
                for inputs in batches():
                    with contextlib.suppress(StopForward):
                        executor(*inputs)
            fitted[name] = pca_projection(recorder.moment / max(recorder.count, 1), k)
            executor.set_transform(name, ChannelProjection(fitted[name].P, fitted[name].U))
    finally:
        executor.clear_transforms()
    return fitted


def make_batches(shape: tuple[int, ...], count: int, seed: int = 0) -> tuple[Batches, list[int]]:
    """batches() over fixed random data, and a list that counts its calls."""
    rng = np.random.default_rng(seed)
    data = [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in range(count)]
    calls = [0]

    def batches():
        calls[0] += 1
        for x in data:
            yield (x,)

    return batches, calls


class StepCounter:
    """Counts the executor steps run (wraps OnnxModule.advance)."""

    def __init__(self, module: OnnxModule, monkeypatch):
        self.steps = 0
        original = module.advance

        def advance(frontier, stop):
            self.steps += stop - frontier.position
            return original(frontier, stop)

        monkeypatch.setattr(module, "advance", advance)


def assert_same_projections(got: dict[str, Projection], want: dict[str, Projection]) -> None:
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name].P, want[name].P, rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got[name].U, want[name].U, rtol=0, atol=1e-6, err_msg=name)


def branchy_model() -> onnx.ModelProto:
    """conv -> relu 'r' -> split (s1, s2: one step, two maps) -> convs -> add -> relu 'e' -> conv 'y'."""
    rng = np.random.default_rng(0)
    weights = {"w1": (8, 4), "w2": (6, 4), "w3": (6, 4), "w4": (5, 6)}
    inits = {k: (rng.standard_normal((o, i, 3, 3)) * 0.4).astype(np.float32) for k, (o, i) in weights.items()}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Split", ["r", "split"], ["s1", "s2"], axis=1),
             helper.make_node("Conv", ["s1", "w2"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["s2", "w3"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "c2"], ["d"]),
             helper.make_node("Relu", ["d"], ["e"]),
             helper.make_node("Conv", ["e", "w4"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in
                               {**inits, "split": np.array([4, 4], np.int64)}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


IN_ORDER = [("a", 8, 3), ("s1", 4, 2), ("s2", 4, 3), ("c2", 6, 2), ("e", 6, 3), ("y", 5, 2)]
# x is a graph input, r comes after maps it precedes, s2 before s1, y is the graph output
OUT_OF_ORDER = [("s2", 4, 2), ("e", 6, 3), ("r", 8, 3), ("s1", 4, 3), ("x", 4, 2), ("c1", 6, 2), ("y", 5, 3)]


@pytest.mark.parametrize("maps", [IN_ORDER, OUT_OF_ORDER], ids=["in-order", "out-of-order"])
@pytest.mark.parametrize("budget", ["default", "none", "some"])
def test_fit_equals_prefix_per_map(maps, budget: str) -> None:
    module = OnnxModule(branchy_model())
    batches, _ = make_batches((3, 4, 6, 6), 5)
    want = fit_pca_prefix(module, maps, batches, positions_per_batch=50)
    one = module.trim(module.advance(module.start(*next(iter(batches()))), module.producer_step("a") + 1))
    cache_bytes = {"default": None, "none": 0, "some": 2 * module.frontier_bytes(one) + 1}[budget]
    got = fit_pca(module, maps, batches, positions_per_batch=50, cache_bytes=cache_bytes)
    assert_same_projections(got, want)
    assert len(module.transforms) == 0  # the executor is left clean


def test_cached_fit_runs_each_step_once_per_batch(monkeypatch) -> None:
    module = OnnxModule(branchy_model())
    batches, calls = make_batches((2, 4, 6, 6), 4)
    last = max(module.producer_step(name) for name, _, _ in IN_ORDER)
    counter = StepCounter(module, monkeypatch)
    fit_pca(module, IN_ORDER, batches, positions_per_batch=50)
    assert counter.steps == 4 * (last + 1)  # one pass up to the last map
    assert calls[0] == 1  # the inputs are read once
    counter.steps, calls[0] = 0, 0
    fit_pca(module, IN_ORDER, batches, positions_per_batch=50, cache_bytes=0)
    assert counter.steps == 4 * sum(module.producer_step(name) + 1 for name, _, _ in IN_ORDER)  # prefix per map
    assert calls[0] == len(IN_ORDER)


def test_cache_never_holds_more_than_its_budget(monkeypatch) -> None:
    from fmcompress.backend import projection

    peaks: list[int] = []

    class Watched(projection._FrontierCache):
        def _keep(self, b, frontier):
            super()._keep(b, frontier)
            peaks.append(self.held)

        def apply(self, name, fitted):
            super().apply(name, fitted)
            peaks.append(self.held)

    monkeypatch.setattr(projection, "_FrontierCache", Watched)
    module = OnnxModule(branchy_model())
    batches, _ = make_batches((3, 4, 6, 6), 5)
    budget = 3 * 3 * 8 * 36 * 4  # three batches' worth of an 8-channel 6x6 frontier
    fit_pca(module, IN_ORDER, batches, positions_per_batch=50, cache_bytes=budget)
    assert peaks and max(peaks) <= budget and max(peaks) > 0


def relu_maps(model: onnx.ModelProto, module: OnnxModule) -> list[tuple[str, int, int]]:
    """Every Relu output of a zoo model, in network order, k = C / 4 (C from the weights)."""
    channels, maps = {}, []
    weights = {t.name: t.dims for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv":
            channels[node.output[0]] = weights[node.input[1]][0]
        elif node.op_type in ("Relu", "Add", "BatchNormalization") and node.input[0] in channels:
            channels[node.output[0]] = channels[node.input[0]]
            if node.op_type == "Relu":
                maps.append((node.output[0], channels[node.input[0]], max(channels[node.input[0]] // 4, 1)))
    assert [module.producer_step(n) for n, _, _ in maps] == sorted(module.producer_step(n) for n, _, _ in maps)
    return maps


@pytest.mark.parametrize("budget", ["default", "some"])
def test_fit_equals_prefix_per_map_on_resnet18(zoo_onnx, budget: str, monkeypatch) -> None:
    model = onnx.load(str(zoo_onnx("resnet18_small", (1, 3, 32, 32))))
    module = OnnxModule(model)
    maps = relu_maps(model, module)
    assert len(maps) == 17
    batches, _ = make_batches((4, 3, 32, 32), 3, seed=1)
    want = fit_pca_prefix(module, maps, batches, positions_per_batch=300)
    counter = StepCounter(module, monkeypatch)
    # "some": about one batch's frontier at the widest point fits, the others are re-run
    got = fit_pca(module, maps, batches, positions_per_batch=300, cache_bytes=None if budget == "default" else 700_000)
    assert_same_projections(got, want)
    full_pass = 3 * (module.producer_step(maps[-1][0]) + 1)
    prefix = 3 * sum(module.producer_step(n) + 1 for n, _, _ in maps)
    assert counter.steps == full_pass if budget == "default" else full_pass < counter.steps < prefix
    # the fitted projections are what compile installs for verification
    install_projections(module, got)
    assert sorted(module._transform_slots) == sorted(n for n, _, _ in maps)
    module.clear_transforms()


# ---------------------------------------------------------------- the executor API the fit uses


def test_split_run_equals_forward_at_every_step() -> None:
    module = OnnxModule(branchy_model())
    module.set_transform("s1", ChannelProjection(np.eye(4, dtype=np.float32)[:2], np.eye(4, dtype=np.float32)[:, :2]))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = module(x)[0]
        full = module.frontier_bytes(module.start(x))
        for split in range(module.num_steps + 1):
            frontier = module.trim(module.advance(module.start(x), split))
            assert frontier.position == split and module.frontier_bytes(frontier) > 0
            if split == 0:
                assert module.frontier_bytes(frontier) == full == x.numel() * 4
            got = module.advance(frontier, module.num_steps).values[module._output_slots[0]]
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_trim_keeps_only_what_later_steps_read() -> None:
    module = OnnxModule(branchy_model())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        frontier = module.trim(module.advance(module.start(x), module.producer_step("s2") + 1))
    assert module.value(frontier, "s1") is not None and module.value(frontier, "s2") is not None
    assert module.value(frontier, "r") is None and module.value(frontier, "x") is None
    # s1 and s2 are views of r's storage, counted once (the split keeps all of r alive)
    assert module.frontier_bytes(frontier) == (2 * 8 * 6 * 6) * 4
    module.trim(module.advance(frontier, module.num_steps), keep_outputs=False)
    assert module.frontier_bytes(frontier) == 0


def test_advance_range_and_names_are_checked() -> None:
    module = OnnxModule(branchy_model())
    frontier = module.advance(module.start(torch.randn(1, 4, 6, 6)), 3)
    with pytest.raises(InputError, match="cannot run from step 3 to step 2"):
        module.advance(frontier, 2)
    with pytest.raises(InputError, match="unknown tensor 'nope'"):
        module.producer_step("nope")
    assert module.producer_step("x") == -1 and module.producer_step("y") == module.num_steps - 1
