"""The layer registry: producers, consumers and per-channel followers of every supported kind."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from specprune_cli.graph import Consumer, Follower, find_units
from specprune_cli.followers import slice_follower
from specprune_cli.layers import consumer_matrix, require_layer_kind
from specprune_cli.surgery import prune_unit, selection_matrix


def test_conv_transpose_is_sliced_on_its_second_weight_dimension_and_folded_on_its_first():
    """ConvTranspose2d weights are (in, out, kh, kw): as a producer it keeps columns, as a consumer rows."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ConvTranspose2d(4, 6, 2, stride=2), nn.ReLU(),
                        nn.Conv2d(6, 1, 1))
    w_up, b_up = net[1].weight.detach().clone(), net[1].bias.detach().clone()
    graph = find_units(net, torch.zeros(1, 2, 4, 4))
    assert [(u.name, [c.kind for c in u.consumers]) for u in graph.units] == [("0", ["conv_transpose"]),
                                                                              ("1", ["conv"])]
    z = consumer_matrix(net[1], graph.unit("0").consumers[0])
    assert torch.equal(z, w_up.double().reshape(4, -1).T)  # one column per input channel
    keep = torch.tensor([1, 4])
    prune_unit(net, graph.unit("1"), keep, {t: selection_matrix(6, keep) for t in graph.unit("1").taps})
    assert torch.equal(net[1].weight, w_up[:, keep]) and torch.equal(net[1].bias, b_up[keep])
    assert net[1].out_channels == 2 and net[3].in_channels == 2


@pytest.mark.parametrize("norm,role", [
    (nn.InstanceNorm1d(6), "batchnorm"),
    (nn.InstanceNorm1d(6, affine=True, track_running_stats=True), "batchnorm"),
    (nn.GroupNorm(6, 6), "groupnorm"), (nn.PReLU(6), "prelu"),
    (nn.Conv1d(6, 6, 3, padding=1, groups=6), "depthwise")])
def test_per_channel_layers_follow_the_unit_and_are_sliced(norm, role):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 6, 1), norm, nn.Conv1d(6, 2, 1)).eval()
    x = torch.randn(3, 2, 5)
    graph = find_units(net, x[:1])
    [unit] = graph.units
    assert unit.followers == [Follower("1", role)]
    keep = torch.tensor([0, 3, 5])
    prune_unit(net, unit, keep, {t: selection_matrix(6, keep) for t in unit.taps})
    sizes = {p.numel() for p in net[1].parameters()} | {b.numel() for b in net[1].buffers() if b.dim()}
    assert sizes <= {3, 3 * 3}  # every per-channel tensor cut to 3 channels (a depthwise kernel is 3 wide)
    assert net(x).shape == (3, 2, 5)


def test_group_norm_with_fewer_groups_mixes_channels():
    net = nn.Sequential(nn.Conv1d(2, 6, 1), nn.GroupNorm(2, 6), nn.Conv1d(6, 2, 1))
    reasons = {s.name: s.reason for s in find_units(net, torch.zeros(1, 2, 5)).skipped}
    assert reasons["0"] == "1 (GroupNorm): GroupNorm with 2 groups mixes the channels of each group"


def test_a_per_channel_parameter_is_sliced_with_the_unit():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.gamma = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1))
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x) * self.gamma)

    net = Scaled()
    [unit] = find_units(net, torch.zeros(1, 3, 4, 4)).units
    assert unit.followers == [Follower("", "param", attr="gamma", dim=1)]
    keep = torch.tensor([1, 3])
    prune_unit(net, unit, keep, {t: selection_matrix(4, keep) for t in unit.taps})
    assert net.gamma.flatten().tolist() == [2.0, 4.0] and isinstance(net.gamma, nn.Parameter)


def test_unknown_kinds_and_roles_name_what_is_supported():
    with pytest.raises(ValueError) as err:
        require_layer_kind(nn.Bilinear(3, 4, 5))
    assert str(err.value) == ("Bilinear is not a layer specprune can prune; supported: Conv1d, Conv2d, "
                              "Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, GRU, LSTM, Linear, "
                              "RNN")
    with pytest.raises(ValueError) as err:
        slice_follower(nn.ReLU(), Follower("x", "bogus"), torch.tensor([0]))
    assert str(err.value) == ("unknown follower role 'bogus'; supported: batchnorm, depthwise, groupnorm, "
                              "param, prelu, rows")


def test_linear_z_has_one_column_per_channel_for_every_column_map():
    lin = nn.Linear(6, 2)
    w = lin.weight.detach().double()
    plain = consumer_matrix(lin, Consumer("l", "linear", "t"))
    blocks = consumer_matrix(lin, Consumer("l", "linear", "t", spatial=3))  # channel c at 3c, 3c+1, 3c+2
    interleaved = consumer_matrix(lin, Consumer("l", "linear", "t", 3, torch.tensor([[0, 2, 4], [1, 3, 5]])))
    assert torch.equal(plain, w)
    assert torch.equal(blocks[:, 1], torch.stack([w[0, 3], w[0, 4], w[0, 5], w[1, 3], w[1, 4], w[1, 5]]))
    assert torch.equal(interleaved[:, 1], torch.stack([w[0, 1], w[0, 3], w[0, 5], w[1, 1], w[1, 3], w[1, 5]]))


def test_a_matmul_with_a_parameter_is_a_functional_layer():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.w = nn.Parameter(torch.randn(4, 2))

        def forward(self, x):
            return torch.relu(self.a(x)) @ self.w

    reasons = {s.name: s.reason for s in find_units(Functional(), torch.zeros(1, 3)).skipped}
    assert reasons["a"] == ("channels flow into the functional layer `matmul` (`matmul`) whose weights are "
                            "module parameters; write it as nn.Linear to prune it")
