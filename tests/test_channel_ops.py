"""Operations between a producer and its consumers: followed when they keep channel identity, a skip
with the reason when they do not (docs/method.md §1). Each case is a conv of 6 channels, the
operation, and a layer reading the result."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specprune_cli.graph import find_units
from specprune_cli.ops import supported
from specprune_cli.spectral import reconstruction_matrix
from specprune_cli.stats import collect_oneshot
from specprune_cli.surgery import prune_unit


class Case(nn.Module):
    """a: Conv2d(3 -> 6); ``op`` applied to its output; ``reader`` (``"conv"``: Conv2d(6 -> 2),
    ``"conv1d"``, or ``"linear"``: Linear(6 -> 2) on the last dimension) reads the result."""

    def __init__(self, op, reader="conv", module=None):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.op = op
        self.mod = module if module is not None else nn.Identity()
        readers = {"conv": nn.Conv2d(6, 2, 1), "conv1d": nn.Conv1d(6, 2, 1), "linear": nn.Linear(6, 2)}
        self.reader = readers[reader]

    def forward(self, x):
        return self.reader(self.op(self.mod(torch.relu(self.a(x)))))


def _half(y):
    first, second = y.chunk(2, dim=3)
    return first * second


FOLLOWED = {
    "F.pad spatial": (lambda y: F.pad(y, (1, 1, 1, 1)), "conv", None),
    "ReplicationPad2d": (lambda y: y, "conv", nn.ReplicationPad2d(1)),
    "ZeroPad2d": (lambda y: y, "conv", nn.ZeroPad2d((0, 1, 0, 1))),
    "ConstantPad2d": (lambda y: y, "conv", nn.ConstantPad2d(1, 0.5)),
    "slice last dims": (lambda y: y[..., 1:-1, ::2], "conv", None),
    "interpolate": (lambda y: F.interpolate(y, scale_factor=2, mode="bilinear"), "conv", None),
    "Upsample": (lambda y: y, "conv", nn.Upsample(scale_factor=2)),
    "scalar arithmetic": (lambda y: 2 - (-y * 3.0 + 1) / 2, "conv", None),
    "squeeze/unsqueeze": (lambda y: torch.squeeze(y.unsqueeze(2), 2).unsqueeze(-1).squeeze(-1), "conv", None),
    "transpose away and back": (lambda y: y.transpose(1, 3).transpose(3, 1), "conv", None),
    "permute to channels-last": (lambda y: y.permute(0, 2, 3, 1), "linear", None),
    "torch.mean over dims": (lambda y: torch.mean(y, dim=(2, 3)), "linear", None),
    "x.mean(-1) twice": (lambda y: y.mean(-1).mean(-1), "linear", None),
    "amax with keepdim": (lambda y: y.amax(dim=(2, 3), keepdim=True), "conv", None),
    "max(dim).values": (lambda y: y.max(dim=3).values, "conv1d", None),
    "softmax over space": (lambda y: torch.softmax(y, dim=-1), "conv", None),
    "avg_pool2d": (lambda y: F.avg_pool2d(y, 2), "conv", None),
    "tokens": (lambda y: y.flatten(2).transpose(1, 2), "linear", None),
    "chunk along width": (_half, "conv", None),
    "layer_norm over width": (lambda y: F.layer_norm(y, y.shape[-1:]), "conv", None),
    "clamp and dtype": (lambda y: y.clamp(0, 6).float().contiguous(), "conv", None),
}

SKIPPED = {
    "F.pad on channels": (lambda y: F.pad(y, (0, 0, 0, 0, 1, 1))[:, 1:-1], "conv", "mixes the channels"),
    "softmax over channels": (lambda y: torch.softmax(y, dim=1), "conv", "mixes the channels"),
    "mean over channels": (lambda y: y.mean(1, keepdim=True).expand(-1, 6, -1, -1), "conv",
                           "mixes the channels"),
    "sum of everything": (lambda y: y * y.sum(), "conv", "over all dimensions mixes the channels"),
    "some channels": (lambda y: F.pad(y[:, :3], (0, 0, 0, 0, 0, 3)), "conv",
                      "keeps only some of the channels"),
    "mean over batch": (lambda y: y - y.mean(0), "conv", "mixes the samples of the batch"),
    "concatenation": (lambda y: torch.cat([y, y], 1)[:, ::2], "conv", "`cat`"),
    "chunk along channels": (lambda y: y.chunk(2, dim=1)[0].repeat(1, 2, 1, 1), "conv",
                             "keeps only some of the channels"),
    "reversed channels": (lambda y: torch.flip(y, [1]), "conv", "channels reordered"),
    "layer_norm over channels": (lambda y: F.layer_norm(y.permute(0, 2, 3, 1), (6,)), "linear",
                                 "mixes the channels"),
    "unknown op": (lambda y: torch.special.expit(y), "conv", "`special_expit`"),
}


def _graph(op, reader, module=None):
    torch.manual_seed(0)
    model = Case(op, reader, module).eval()
    return model, find_units(model, torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("name", list(FOLLOWED))
def test_followed_and_exact_at_keep_all(name):
    op, reader, module = FOLLOWED[name]
    model, graph = _graph(op, reader, module)
    assert [u.name for u in graph.units] == ["a"], {s.name: s.reason for s in graph.skipped}
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    unit = graph.units[0]
    moments = collect_oneshot(graph.gm, [unit], [x], max_positions=None, seed=0)
    keep = torch.arange(6)
    prune_unit(model, unit, keep, {t: reconstruction_matrix(moments[("a", t)].matrix, keep, ridge=1e-9)
                                   for t in unit.taps})
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(SKIPPED))
def test_not_followed_is_a_skip_with_the_reason(name):
    op, reader, words = SKIPPED[name]
    _, graph = _graph(op, reader)
    assert graph.units == []
    assert words in {s.name: s.reason for s in graph.skipped}["a"]


def test_the_registry_lists_the_operations_it_follows():
    names = supported()
    for expected in ("pad", "interpolate", "Tensor.permute", "Tensor.view", "squeeze", "unsqueeze", "getitem",
                     "MaxPool1d", "AdaptiveAvgPool3d", "ZeroPad2d", "Upsample", "Tensor.mean", "softmax"):
        assert expected in names
