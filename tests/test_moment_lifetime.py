"""Memory at width (issue 16): each unit's moments live only until its selection has read them.

An 8,192-wide tap's moments take 0.5 GiB (1.5 GiB with a cross moment), so the accumulators alive while
a unit is selected are counted here, with the garbage collector's view of every CrossMoment holding
rows: in sequential order only the unit's own; in oneshot order the unit's and those not selected yet.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from specprune_cli import prune, sequential
from specprune_cli.moments import CrossMoment
from helpers import prune_cfg


def _live_accumulators() -> list[CrossMoment]:
    gc.collect()
    # type(), not isinstance(): it would ask objects with a __class__ property, some of which warn
    return [obj for obj in gc.get_objects() if issubclass(type(obj), CrossMoment) and obj.count > 0]


@pytest.mark.parametrize("order, allocation", [("sequential", "dof"), ("sequential", "loss"),
                                               ("oneshot", "dof"), ("oneshot", "ratio")])
def test_only_the_moments_still_to_be_read_are_alive_at_each_selection(monkeypatch, order, allocation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 16),
                          nn.ReLU(), nn.Linear(16, 4)).eval()
    batches = list(torch.randn(256, 8).split(64))
    seen: list[tuple[str, int]] = []
    choose = sequential.choose  # Run.apply's selection, in both orders

    def counting_choose(model, unit, k, moments, cfg, intercept=False):
        seen.append((unit.name, len(_live_accumulators())))
        return choose(model, unit, k, moments, cfg, intercept=intercept)

    monkeypatch.setattr(sequential, "choose", counting_choose)
    result = prune.prune_model(model, batches, example_input=batches[0][:1], progress=False,
                               cfg=prune_cfg(order=order, allocation=allocation, ratio=0.5))
    units = [u["name"] for u in result.report["units"]]
    assert [name for name, _ in seen] == units  # one tap per unit: one accumulator each
    want = [1] * len(units) if order == "sequential" else list(range(len(units), 0, -1))
    assert [live for _, live in seen] == want
    assert _live_accumulators() == []


def test_sequential_order_drops_each_batchs_old_cache_entry_once_its_new_one_is_made(monkeypatch):
    """The values alive at the previous cut are not held until every batch has run: when batch b runs,
    the runner's entries for batches before it are already their new ones."""
    from specprune_cli.runner import SegmentRunner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 4)).eval()
    batches = list(torch.randn(256, 8).split(64))
    made: dict[int, dict[int, dict]] = {}  # runner -> batch -> the entry run_batch returned
    stale: list[tuple[int, int]] = []
    run_batch = SegmentRunner.run_batch

    def checking_run_batch(self, b, stop, **kw):
        mine = made.setdefault(id(self), {})
        stale.extend((b, earlier) for earlier in range(b) if self.cache[earlier] is not mine.get(earlier))
        mine[b] = run_batch(self, b, stop, **kw)
        return mine[b]

    monkeypatch.setattr(SegmentRunner, "run_batch", checking_run_batch)
    prune.prune_model(model, batches, example_input=batches[0][:1], progress=False,
                      cfg=prune_cfg(order="sequential", allocation="ratio", ratio=0.5))
    assert made and len(next(iter(made.values()))) == len(batches)
    assert stale == []
