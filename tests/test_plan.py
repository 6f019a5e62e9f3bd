"""Widths, budgets and the plan (plan.py) on a model whose FLOPs and parameters are countable by hand,
and a golden plan for a tiny CNN that pins the whole pruning run's choice of channels.

The MLP 8 -> 16 -> 16 -> 4 has units net.0 and net.2 (16 channels each; the last Linear feeds the
output). A Linear costs 2 * in * out FLOPs per sample and in * out + out parameters, so at widths
(a, b): FLOPs 2 * (8a + ab + 4b), full 896; parameters 9a + ab + b + 4b + 4, full 484.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_cnn
from specprune_cli.config import PruneConfig
from specprune_cli.errors import BudgetError
from specprune_cli.graph import find_units
from specprune_cli.name_patterns import override_for
from specprune_cli.plan import PLAN_FORMAT, CostModel, allocate_widths, fit_width, make_plan
from specprune_cli.prune import prune_model

GOLDEN = Path(__file__).resolve().parent / "golden" / "small_cnn_plan.json"


@pytest.fixture(scope="module")
def mlp():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.zeros(1, 8)
    units = find_units(model, x).units
    return units, CostModel(model, units, x)


def test_the_cost_model_counts_what_a_hand_count_gives(mlp):
    units, cost = mlp
    assert [(u.name, u.width) for u in units] == [("0", 16), ("2", 16)]
    assert (cost.total_flops, cost.total_params) == (896, 484)
    assert cost.cost({"0": 8, "2": 8}) == (2 * (64 + 64 + 32), 72 + 72 + 36)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_a_recurrent_consumer_costs_what_the_pruned_model_counts(cell):
    """Only the first layer's input weights read the unit: that share of the layer's FLOPs and
    parameters scales with the unit's width, the recurrence does not. The prediction equals the count
    on a model actually cut to those widths."""
    from specprune_cli.flops import count_flops, count_params
    from specprune_cli.surgery import prune_unit, selection_matrix

    class ConvRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 12, 3, padding=1)
            self.rnn = cell(12, 6, num_layers=2, bidirectional=True)

        def forward(self, x):
            return self.rnn(self.conv(x).permute(2, 0, 1))[0]

    model, x = ConvRNN().eval(), torch.randn(1, 4, 9)
    units = find_units(model, x).units
    cost = CostModel(model, units, x)
    (unit,) = units
    keep = torch.arange(0, 12, 3)
    prune_unit(model, unit, keep, {t: selection_matrix(12, keep) for t in unit.taps})
    assert model.rnn.input_size == 4 and model.rnn.weight_ih_l0_reverse.shape[1] == 4
    flops, params = cost.cost({unit.name: 4})
    assert (flops, params) == (count_flops(model, x), count_params(model))


def test_ratio_allocation(mlp):
    units, cost = mlp
    widths = allocate_widths(units, cost, allocation="ratio", target_kind="flops", target_value=1.0,
                             ratio=0.3, round_to=1, min_channels=2)
    assert widths == {"0": 5, "2": 5}  # ceil(0.3 * 16)


def test_uniform_allocation_is_the_widest_equal_width_within_the_target(mlp):
    # 2 * (w^2 + 12 w) <= 448 holds for w = 10 (220 <= 224) and not for 11, nor for (11, 10).
    units, cost = mlp
    assert allocate_widths(units, cost, allocation="uniform", target_kind="flops", target_value=0.5,
                           round_to=1, min_channels=2) == {"0": 10, "2": 10}


def test_dof_allocation_follows_the_degrees_of_freedom(mlp):
    # Widths 4a and 12a (the second capped at 16): a = 1.5 gives (6, 16), 48 + 96 + 64 = 208 <= 224;
    # (7, 16) costs 232 > 224.
    units, cost = mlp
    assert allocate_widths(units, cost, allocation="dof", target_kind="flops", target_value=0.5,
                           dof={"0": 4.0, "2": 12.0}, round_to=1, min_channels=2) == {"0": 6, "2": 16}


def test_a_params_target(mlp):
    # Params at widths (a, b): 9a + ab + 5b + 4, and half of 484 is 242. (9, 9) costs 211 and (10, 10)
    # 244, so uniform bisection stops at 9; the spare budget then buys one unit a 10th channel: (10, 9)
    # costs 229 and (9, 10) 225, both within.
    units, cost = mlp
    widths = allocate_widths(units, cost, allocation="uniform", target_kind="params", target_value=0.5,
                             round_to=1, min_channels=2)
    assert sorted(widths.values()) == [9, 10]
    assert cost.fraction(widths, "params") <= 0.5


def test_overrides_first_match_wins_in_every_mode(mlp):
    units, cost = mlp
    first = {"re:.*": 0.25, "0": 0.75}
    assert override_for("0", first) == 0.25 and override_for("0", dict(reversed(first.items()))) == 0.75
    widths = allocate_widths(units, cost, allocation="uniform", target_kind="flops", target_value=0.5,
                             overrides={"0": 0.75}, round_to=1, min_channels=2)
    assert widths["0"] == 12  # fixed by the override; net.2 gets what the budget leaves
    assert cost.fraction(widths, "flops") <= 0.5


def test_the_budget_error_says_what_the_floor_is_and_what_to_change(mlp):
    units, cost = mlp
    with pytest.raises(BudgetError) as exc:
        allocate_widths(units, cost, allocation="uniform", target_kind="flops", target_value=0.01, round_to=1,
                        min_channels=2)
    # Both units at 2 channels: 2 * (16 + 4 + 8) = 56 of 896 FLOPs = 0.0625.
    assert str(exc.value) == (
        "prune.target.flops=0.01 cannot be met: with every prunable unit at its minimum width the model "
        "keeps "
        "0.062 of its flops (the layers that cannot be pruned cost the rest). Raise the target to at least "
        "that, "
        "lower prune.min_channels or prune.round_to, or remove layers from prune.exclude.")


@pytest.mark.parametrize("x, m, round_to, min_channels, want", [
    (10, 16, 8, 8, 8), (12, 16, 8, 8, 16), (3, 64, 8, 8, 8), (100, 64, 8, 8, 64), (5.4, 16, 1, 2, 5),
    (0.0, 16, 1, 2, 2), (20, 24, 16, 1, 16), (22, 24, 8, 1, 24),
])
def test_fit_width(x, m, round_to, min_channels, want):
    assert fit_width(x, m, round_to=round_to, min_channels=min_channels) == want


def test_make_plan_is_json_and_lists_kept_indices(mlp):
    units, _ = mlp
    plan = make_plan(units, {"0": torch.tensor([1, 3]), "2": torch.arange(16)}, {"0": 2.34567})
    assert json.loads(json.dumps(plan)) == plan
    assert plan == {"format": PLAN_FORMAT, "units": [
        {"name": "0", "kind": "linear", "type": "plain", "width": 16, "kept": 2, "indices": [1, 3],
         "dof": 2.3457},
        {"name": "2", "kind": "linear", "type": "plain", "width": 16, "kept": 16, "indices": list(range(16)),
         "dof": None}]}


def test_golden_plan_of_a_tiny_cnn():
    """The kept channels of SmallCNN at half its FLOPs; regenerate with SPECPRUNE_REGEN_GOLDEN=1 only
    when a change of the selection is intended, and say why in the commit."""
    model = make_cnn(seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(4)]
    cfg = PruneConfig(target={"flops": 0.5}, round_to=1, min_channels=2, max_positions=16, dof_min_samples=16)
    plan = prune_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False).plan
    if os.environ.get("SPECPRUNE_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(plan, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert [(u["name"], u["width"], u["kept"], u["indices"]) for u in plan["units"]] == \
        [(u["name"], u["width"], u["kept"], u["indices"]) for u in golden["units"]]
    assert [u["dof"] for u in plan["units"]] == pytest.approx([u["dof"] for u in golden["units"]], rel=1e-3)
