"""MapCostPass (passes/map_cost.py): each projection's held-out cost with it alone in place."""

from __future__ import annotations

import numpy as np
from modeltools import tiny_classifier

from fmcompress import api
from fmcompress.data import Dataset
from fmcompress.featuremaps import Projection
from fmcompress.passes.map_cost import map_costs


def _data(count: int = 24) -> Dataset:
    rng = np.random.default_rng(0)
    model = tiny_classifier()
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    inputs = {model.graph.input[0].name: rng.standard_normal((count, *dims[1:])).astype(np.float32)}
    return Dataset(inputs=inputs, labels=None, source="random")


def test_an_identity_costs_nothing_and_a_zeroed_map_costs_most():
    """Rules a and b: P = U = I leaves the outputs as they are; a projection that zeroes its map
    changes them, and only that map's entry shows it."""
    eye = np.eye(16, dtype=np.float32)
    zero = np.zeros((1, 16), np.float32)
    costs = map_costs(tiny_classifier(), {"r1": Projection(P=eye, U=eye), "r2": Projection(P=zero, U=zero.T)},
                      _data())
    assert [c["name"] for c in costs] == ["r1", "r2"]
    assert costs[0]["metric"] == "top-1 agreement" and costs[0]["alone"] == 1.0 and costs[0]["drop_points"] == 0.0
    assert costs[1]["drop_points"] > 0 and costs[1]["samples"] == 24
    assert costs[0]["accuracy_drop_points"] is None  # no labels


def test_compile_reports_each_maps_cost_alone(tmp_path):
    result = api.compile(tiny_classifier(), ceiling="4x", method="pca", num_samples=32, latency_rounds=1,
                         latency_repeats=1, measure_memory=False)
    costs = [entry["cost_alone"] for entry in result.report["maps"]]
    assert costs and all(0 <= c["drop_points"] <= 100 and c["samples"] == 8 for c in costs)
    from fmcompress.reports.markdown import render_compile_markdown

    assert "cost alone (points)" in render_compile_markdown(result.report)


def test_the_paused_runs_give_what_the_projection_installed_alone_gives():
    """Rule e: forking a paused original run at each map is the same computation as running the
    whole network with that projection alone installed (the executor's transforms)."""
    import torch

    from fmcompress.backend.projection import install_projections
    from fmcompress.metrics import fidelity
    from fmcompress.passes.fit import torch_executor

    rng = np.random.default_rng(1)
    q = np.linalg.qr(rng.standard_normal((16, 2)))[0].astype(np.float32)
    zero = np.zeros((1, 16), np.float32)
    projections = {"r2": Projection(P=zero, U=zero.T), "r1": Projection(P=q.T, U=q)}  # not in network order
    data = _data(20)
    costs = {c["name"]: c for c in map_costs(tiny_classifier(), projections, data, batch=8)}
    executor = torch_executor(tiny_classifier())
    name = executor.input_names[0]
    with torch.no_grad():
        reference = executor(torch.from_numpy(data.inputs[name]))
        for mapped, projection in projections.items():
            install_projections(executor, {mapped: projection})
            alone = executor(torch.from_numpy(data.inputs[name]))
            expected = fidelity([reference[0].numpy()], [alone[0].numpy()]).to_dict()
            assert costs[mapped]["alone"] == expected["top1_agreement"]
    assert costs["r2"]["drop_points"] > 0


def test_the_chain_figures_sum_to_the_cost_of_every_map_together():
    """Rule b': at the last map in network order the chain is every projection in place (the
    executor with all of them installed), and the shares added along it sum to that drop."""
    import torch

    from fmcompress.backend.projection import install_projections
    from fmcompress.metrics import fidelity
    from fmcompress.passes.fit import torch_executor

    rng = np.random.default_rng(2)
    q = np.linalg.qr(rng.standard_normal((16, 3)))[0].astype(np.float32)
    half = np.diag(np.arange(16) < 8).astype(np.float32)  # r1 without its last 8 channels: alone a loss
    projections = {"r2": Projection(P=q.T, U=q), "r1": Projection(P=half, U=np.eye(16, dtype=np.float32))}
    data = _data(40)
    costs = {c["name"]: c for c in map_costs(tiny_classifier(), projections, data, batch=8)}
    executor = torch_executor(tiny_classifier())
    inputs = torch.from_numpy(data.inputs[executor.input_names[0]])
    with torch.no_grad():
        reference = executor(inputs)
        install_projections(executor, projections)
        together = fidelity([reference[0].numpy()], [executor(inputs)[0].numpy()]).to_dict()["top1_agreement"]
    assert costs["r2"]["in_chain"] == together
    assert costs["r1"]["in_chain"] == costs["r1"]["alone"]  # the first map: nothing before it
    assert costs["r1"]["added_points"] == costs["r1"]["drop_points"] > 0
    total = costs["r1"]["added_points"] + costs["r2"]["added_points"]
    assert abs(total - 100 * (1 - together)) < 1e-9
