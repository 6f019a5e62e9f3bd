"""The one lookup of a module's class in a table (``probes.registered``) and its probes' memory."""
from __future__ import annotations

import torch
from torch import nn

from specprune_cli import probes
from specprune_cli.followers import follower_kind
from specprune_cli.layers import layer_kind
from specprune_cli.ops import rule_for


class _Plain(nn.BatchNorm2d):
    """A subclass that keeps its parent's forward."""


class _Activated(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: the parent's forward, then an activation, channel by channel."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class _Mixing(nn.BatchNorm2d):
    """A forward of its own that mixes channels: no per-channel slicing can give its outputs."""

    def forward(self, x):
        y = super().forward(x)
        return y + y.mean(dim=1, keepdim=True)


class _Casting(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


class _Shifting(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1.0


def test_the_nearest_class_in_the_mro_decides_and_an_own_forward_needs_the_probe():
    table = {nn.BatchNorm2d: "bn", nn.modules.batchnorm._BatchNorm: "norm"}
    assert probes.registered(_Plain(4), table) == "bn"
    assert probes.registered(nn.BatchNorm1d(4), table) == "norm"  # inherits _BatchNorm.forward
    assert probes.registered(_Activated(4), table) is None  # no probe: refused
    asked = []
    probe = lambda cls, entry: asked.append((cls, entry)) or True  # noqa: E731
    assert probes.registered(_Activated(4), table, probe) == "bn"
    assert asked == [(nn.BatchNorm2d, "bn")]
    assert probes.registered(nn.ReLU(), {nn.BatchNorm2d: "bn"}) is None


def test_the_three_tables_agree_on_subclasses():
    # Followers: probed, so an activation after the norm passes and a channel mix does not.
    assert follower_kind(_Plain(4)) is not None and follower_kind(_Activated(4)) is not None
    assert follower_kind(_Mixing(4)) is None
    # Layers: a forward that computes the parent's counts as the parent; one that does not is refused.
    assert layer_kind(_Casting(3, 2)) is layer_kind(nn.Linear(3, 2)) is not None
    assert layer_kind(_Shifting(3, 2)) is None
    # Channel rules: never probed; a subclass with its own forward has none.
    node = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())).graph.find_nodes(op="call_module")[0]
    assert rule_for(node, nn.ReLU()) is not None

    class OwnReLU(nn.ReLU):
        def forward(self, x):
            return x.clamp_min(0.5)

    assert rule_for(node, OwnReLU()) is None


def test_a_probe_runs_once_per_module(monkeypatch):
    runs = []
    real = probes._cut_matches
    monkeypatch.setattr(probes, "_cut_matches", lambda mod, kind: runs.append(mod) or real(mod, kind))
    bn = _Activated(6)
    for _ in range(3):
        assert follower_kind(bn) is not None
    assert runs == [bn]
    follower_kind(_Activated(6))
    assert len(runs) == 2
