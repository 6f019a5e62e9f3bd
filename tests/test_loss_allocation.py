"""``prune.allocation: loss`` (docs/method.md §5): widths from the units' measured loss curves."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from specprune_cli.errors import BudgetError
from specprune_cli.graph import find_units
from specprune_cli.plan import CostModel, allocate_widths, fit_width
from specprune_cli.prune import prune_model
from helpers import prune_cfg


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def _setup():
    model = _mlp()
    x = torch.zeros(1, 16)
    units = find_units(model, x).units
    return units, CostModel(model, units, x)


def _curve(m: int, rate: float) -> torch.Tensor:
    """A loss curve falling like exp(-rate k / m): 1 at k = 0."""
    k = torch.arange(m + 1, dtype=torch.float64)
    return torch.exp(-rate * k / m)


def _total(curves, widths) -> float:
    return sum(float(curves[n][k]) for n, k in widths.items())


def test_the_unit_whose_loss_falls_slowly_gets_the_channels():
    units, cost = _setup()
    curves = {"0": _curve(64, 20.0), "2": _curve(64, 2.0)}  # unit 0 is nearly lossless at a few channels
    widths = allocate_widths(units, cost, allocation="loss", target_kind="params", target_value=0.5,
                             curves=curves, round_to=8, min_channels=8)
    assert cost.fraction(widths, "params") <= 0.5
    assert widths["2"] > widths["0"]


def test_loss_widths_are_as_good_as_the_best_grid_point_within_one_step():
    units, cost = _setup()
    curves = {"0": _curve(64, 6.0), "2": _curve(64, 3.0)}
    widths = allocate_widths(units, cost, allocation="loss", target_kind="flops", target_value=0.4,
                             curves=curves, round_to=8, min_channels=8)
    assert cost.fraction(widths, "flops") <= 0.4 + 1e-12
    grid = range(8, 65, 8)
    feasible = [dict(zip(("0", "2"), ks)) for ks in itertools.product(grid, grid)
                if cost.fraction(dict(zip(("0", "2"), ks)), "flops") <= 0.4 + 1e-12]
    best = min(_total(curves, w) for w in feasible)
    uniform = allocate_widths(units, cost, allocation="uniform", target_kind="flops", target_value=0.4,
                              round_to=8, min_channels=8)
    assert _total(curves, widths) <= _total(curves, uniform) + 1e-12
    assert _total(curves, widths) == pytest.approx(best, abs=1e-9)


def test_overrides_min_channels_and_round_to_are_respected():
    units, cost = _setup()
    curves = {"0": _curve(64, 6.0), "2": _curve(64, 3.0)}
    widths = allocate_widths(units, cost, allocation="loss", target_kind="params", target_value=0.6,
                             curves=curves, round_to=16, min_channels=16, overrides={"0": 0.25})
    assert widths["0"] == fit_width(16, 64, round_to=16, min_channels=16)
    assert widths["2"] % 16 == 0 and widths["2"] >= 16


def test_a_target_below_the_floor_is_a_budget_error():
    units, cost = _setup()
    curves = {"0": _curve(64, 6.0), "2": _curve(64, 3.0)}
    with pytest.raises(BudgetError, match="cannot be met"):
        allocate_widths(units, cost, allocation="loss", target_kind="params", target_value=0.01,
                        curves=curves, round_to=8, min_channels=8)


def test_prune_with_loss_allocation_meets_its_target():
    model = _mlp()
    data = torch.randn(512, 16)
    result = prune_model(model, [data[:256], data[256:]], example_input=data[:1], progress=False,
                         cfg=prune_cfg(allocation="loss", target={"params": 0.5}))
    assert result.report["params_after"] <= 0.5 * result.report["params_before"] * 1.05
    assert all(0 <= u["loss"] <= 1 for u in result.report["units"])
