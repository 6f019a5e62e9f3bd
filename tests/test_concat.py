"""Concatenations along the channels (docs/method.md §1): each concatenated producer is a unit whose
channels are a block of the concatenation; its consumers and the norms after the concatenation lose
that block's rows only, wherever earlier surgery has moved it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from specprune_cli.graph import find_units
from specprune_cli.prune import prune_model
from specprune_cli.surgery import prune_unit, selection_matrix
from helpers import prune_cfg, warm_batchnorm
from zoo import build


class Inception(nn.Module):
    """Three branches concatenated in graph order, a BatchNorm over the concatenation, and a Linear
    reading its channel-major flatten (each channel owns 4 columns)."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(3, 6, 1)
        self.b2 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1))
        self.b3 = nn.Conv2d(3, 7, 3, padding=1)
        self.bn = nn.BatchNorm2d(18)
        self.mix = nn.Conv2d(18, 12, 3, padding=1)
        self.fc = nn.Linear(9 * 2 * 2 + 12 * 2 * 2, 5)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)))
        z = torch.relu(self.mix(y))
        pooled = nn.functional.adaptive_avg_pool2d(torch.cat([x.repeat(1, 3, 1, 1), z], 1), 2)
        return self.fc(torch.flatten(pooled, 1))


class UNetSkip(nn.Module):
    """The decoder's channels come first in the concatenation, the earlier encoder's second."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 10, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(10, 6, 2, stride=2)
        self.dec = nn.Conv2d(14, 4, 3, padding=1)

    def forward(self, x):
        e = torch.relu(self.enc(x))
        u = self.up(torch.relu(self.down(e)))
        return self.dec(torch.cat([u, e], dim=-3))


class Between(nn.Module):
    """b is computed last but concatenated between a and c."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        a, c = self.a(x), self.c(x)
        return self.out(torch.cat([a, self.b(x), c], 1))


class GatedConcat(nn.Module):
    """CSPNeXt's stage end: a squeeze-excitation gate over cat([main, short]), with a BN on the gate."""

    def __init__(self):
        super().__init__()
        self.main, self.short = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.fc, self.fc_bn = nn.Conv2d(10, 10, 1), nn.BatchNorm2d(10)
        self.out = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        c = torch.cat([torch.relu(self.main(x)), torch.relu(self.short(x))], 1)
        return self.out(c * torch.sigmoid(self.fc_bn(self.fc(c.mean((2, 3), keepdim=True)))))


class Tabular(nn.Module):
    """Linear features concatenated on the last dimension (keyword arguments, a tuple), a BatchNorm1d
    over them, and the input's first columns put before a hidden layer."""

    def __init__(self):
        super().__init__()
        self.emb, self.num = nn.Linear(5, 12), nn.Linear(7, 9)
        self.bn = nn.BatchNorm1d(21)
        self.hidden, self.out = nn.Linear(21, 16), nn.Linear(3 + 16, 2)

    def forward(self, x):
        z = torch.cat(tensors=(torch.relu(self.emb(x[:, :5])), self.num(x[:, 5:])), dim=-1)
        h = torch.relu(self.hidden(self.bn(z)))
        return self.out(torch.cat((x[:, :3], h), 1))


def _masked(model, graph, keeps):
    """The original network with each dropped channel zeroed where a consumer reads it: what removing
    the channels (A = I[:, keep]) must compute, located with the unpruned layouts."""
    ref = copy.deepcopy(model)
    for u in graph.units:
        dropped = torch.tensor(sorted(set(range(u.width)) - set(keeps[u.name].tolist())), dtype=torch.long)
        for c in u.consumers:
            def zero(_mod, args, lay=u.channel_nodes[c.tap], dropped=dropped):
                labels, _ = lay.tensors(args[0].shape)
                return (args[0].masked_fill(torch.isin(labels.long(), dropped), 0.0),) + args[1:]
            ref.get_submodule(c.module).register_forward_pre_hook(zero)
    return ref


def _cut_half(model, x):
    graph = find_units(model, x[:1])
    g = torch.Generator().manual_seed(3)
    keeps = {u.name: torch.randperm(u.width, generator=g)[: u.width // 2].sort().values for u in graph.units}
    ref = _masked(model, graph, keeps)
    for u in graph.units:
        prune_unit(model, u, keeps[u.name], {t: selection_matrix(u.width, keeps[u.name]) for t in u.taps})
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    return graph


@pytest.mark.parametrize("name", ["densenet_tiny", "squeezenet1_1"])
def test_cutting_concatenated_units_removes_exactly_their_channels(name):
    model, shape = build(name)
    graph = _cut_half(model, torch.randn(3, *shape, generator=torch.Generator().manual_seed(1)))
    assert sum(u.type == "concat" for u in graph.units) >= 4


def test_blocks_follow_a_norm_and_a_flatten_and_keep_other_tensors_entries():
    torch.manual_seed(0)
    model = warm_batchnorm(Inception(), (3, 8, 8))
    graph = _cut_half(model, torch.randn(3, 3, 8, 8))
    names = {u.name: u for u in graph.units}
    assert {n: names[n].type for n in ("b1", "b2.2", "b3", "mix")} == {
        "b1": "concat", "b2.2": "concat", "b3": "concat", "mix": "concat"}
    fc = next(c for c in names["mix"].consumers if c.module == "fc")
    assert (fc.block.lead, fc.block.own, fc.block.trail) == (9 * 4, 12 * 4, 0)  # after the 9 input copies
    assert model.bn.num_features == 3 + 2 + 3 and model.fc.in_features == 9 * 4 + 6 * 4


def test_linear_features_concatenated_on_the_last_dimension():
    torch.manual_seed(0)
    model = warm_batchnorm(Tabular(), (12,))
    graph = _cut_half(model, torch.randn(6, 12))
    assert [(u.name, u.type) for u in graph.units] == [("emb", "concat"), ("num", "concat"),
                                                       ("hidden", "concat")]
    assert (model.bn.num_features, model.out.in_features) == (6 + 4, 3 + 8)


def test_a_block_placed_before_earlier_units_keeps_its_offset_from_the_start():
    torch.manual_seed(0)
    model = UNetSkip()
    graph = _cut_half(model, torch.randn(2, 3, 8, 8))
    anchors = {u.name: next(c.block.anchor for c in u.consumers if c.block) for u in graph.units
               if u.type == "concat"}
    assert anchors == {"enc": "start", "up": "start"}
    assert model.dec.in_channels == 3 + 4


def test_a_gate_over_a_concatenation_loses_only_each_units_rows():
    torch.manual_seed(0)
    model = warm_batchnorm(GatedConcat(), (3, 8, 8))
    graph = _cut_half(model, torch.randn(3, 3, 8, 8))
    assert [(u.name, u.type) for u in graph.units] == [("main", "concat"), ("short", "concat")]
    assert (model.fc.in_channels, model.fc.out_channels, model.fc_bn.num_features) == (3 + 2, 3 + 2, 3 + 2)


def test_a_block_between_units_pruned_before_it_is_kept_whole_with_the_reason():
    graph = find_units(Between(), torch.zeros(1, 3, 4, 4))
    assert [u.name for u in graph.units] == ["a", "c"]
    assert "between channels of units pruned before it" in {s.name: s.reason for s in graph.skipped}["b"]


def test_other_joins_of_whole_tensors_are_still_refused():
    class AlongHeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):  # channel i of a and of b become one channel
            return self.out(torch.cat([self.a(x), self.b(x)], dim=2))

    class WithItself(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.out(torch.cat([y, torch.relu(y)], 1))

    reasons = {s.name: s.reason for s in find_units(AlongHeight(), torch.zeros(1, 3, 4, 4)).skipped}
    assert "along another dimension" in reasons["a"] and "along another dimension" in reasons["b"]
    reasons = {s.name: s.reason for s in find_units(WithItself(), torch.zeros(1, 3, 4, 4)).skipped}
    assert "copy of themselves" in reasons["a"]


def test_the_whole_run_prunes_a_densenet_and_the_plan_records_concat_units():
    model, shape = build("densenet_tiny")
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, *shape, generator=g) for _ in range(3)]
    result = prune_model(model, batches, example_input=batches[0][:1], cfg=prune_cfg(), progress=False)
    assert "concat" in {u["type"] for u in result.plan["units"]}
    assert 0.475 <= result.report["flops_after"] / result.report["flops_before"] <= 0.525
    with torch.no_grad():
        assert torch.isfinite(result.model(batches[1])).all()


def test_a_reshape_of_a_concatenation_follows_the_width_when_computed_from_the_shape():
    class Head(nn.Module):
        def __init__(self, literal: bool):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
            self.fc, self.literal = nn.Linear(10 * 4, 2), literal

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            size = 40 if self.literal else y.size(1) * y.size(2) * y.size(3)
            return self.fc(torch.relu(y).reshape(y.size(0), size))

    graph = _cut_half(Head(literal=False), torch.randn(2, 3, 2, 2))
    assert [u.name for u in graph.units] == ["a", "b"]
    reasons = {s.name: s.reason for s in find_units(Head(literal=True), torch.zeros(1, 3, 2, 2)).skipped}
    assert "with a fixed number" in reasons["a"] and "with a fixed number" in reasons["b"]
