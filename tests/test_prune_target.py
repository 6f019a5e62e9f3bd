"""A run that cannot meet its FLOPs/params target says so (docs/method.md §5): an error naming what
blocked the large layers, or with ``prune.allow_partial`` a warning in the report."""
from __future__ import annotations

import pytest
import torch

from specprune_cli.errors import BudgetError
from specprune_cli.prune import prune_model
from helpers import prune_cfg
from patterns import build


def test_nothing_prunable_is_an_error_that_names_the_blocker():
    model, shape = build("functional_conv")
    data = torch.randn(32, *shape)
    with pytest.raises(BudgetError) as err:
        prune_model(model, [data], example_input=data[:1], cfg=prune_cfg(target={"flops": 0.5}),
                    progress=False)
    message = str(err.value)
    assert message.startswith("the pruned model keeps 1.000 of its flops against the target 0.5")
    assert "functional layer `conv2d`" in message and "prune.allow_partial: true" in message


def test_allow_partial_turns_the_error_into_a_warning():
    model, shape = build("functional_conv")
    data = torch.randn(32, *shape)
    result = prune_model(model, [data], example_input=data[:1], progress=False,
                         cfg=prune_cfg(target={"flops": 0.5}, allow_partial=True))
    assert len(result.report["warnings"]) == 1
    assert result.report["warnings"][0].startswith("the pruned model keeps 1.000 of its flops")


def test_an_unreachable_budget_with_allow_partial_prunes_to_the_minimum_widths():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
    data = torch.randn(128, 8)
    cfg = prune_cfg(target={"params": 0.01}, allow_partial=True, min_channels=8, round_to=8)
    result = prune_model(model, [data], example_input=data[:1], cfg=cfg, progress=False)
    assert [u["kept"] for u in result.report["units"]] == [8]
    assert any("cannot be met" in w for w in result.report["warnings"])
    with pytest.raises(BudgetError, match="cannot be met") as err:
        prune_model(model, [data], example_input=data[:1], cfg=prune_cfg(target={"params": 0.01}),
                    progress=False)
    # The floor is what the layers left whole cost: the message names them, with why.
    assert str(err.value).endswith("The layers left whole: 2 (its channels reach the model output).")
