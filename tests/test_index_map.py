"""Exact input columns of a Linear for each channel, through permute / reshape / flatten, and their use
in the statistics rows, Z and the fold (docs/method.md §1, §3, §4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specprune_cli.graph import ShapeAttr, find_units
from specprune_cli.layers import consumer_matrix, tap_rows
from specprune_cli.surgery import prune_unit, selection_matrix
from patterns import build


def test_time_major_head_maps_channel_c_to_columns_t_times_c_plus_c():
    """(B, C, T, 1) permuted to (B, T, C, 1) and reshaped to T*C: channel c sits at t*C + c, not at the
    channel-major c*T + t a flatten(1) would give."""
    model, _ = build("audio_head")
    unit = find_units(model, torch.zeros(1, 1, 8, 6)).unit("conv2")
    [fc] = unit.consumers
    assert (fc.module, fc.kind, fc.spatial) == ("fc", "linear", 8)
    assert fc.columns.tolist() == [[t * 6 + c for t in range(8)] for c in range(6)]
    assert unit.shape_attrs == [ShapeAttr("", "flat_dim", 8)]


def test_time_major_statistics_rows_and_z_read_the_same_columns():
    model, _ = build("audio_head")
    x = torch.randn(3, 1, 8, 6)
    unit = find_units(model, x[:1]).unit("conv2")
    [fc] = unit.consumers
    with torch.no_grad():
        maps = F.relu(model.conv2(F.relu(model.bn1(model.conv1(x)))))  # (B, C, T, 1)
        rows = tap_rows(maps.permute(0, 2, 1, 3).reshape(3, 48), unit, fc)
    assert rows.shape == (3, 6, 8)  # (sample, channel, time)
    torch.testing.assert_close(rows, maps[..., 0])
    z = consumer_matrix(model.fc, fc)
    w = model.fc.weight.detach().double()
    assert z.shape == (5 * 8, 6)
    assert all(z[o * 8 + t, c] == w[o, t * 6 + c] for o in range(5) for t in range(8) for c in range(6))


def test_pruning_the_time_major_unit_keeps_its_columns_and_rewrites_the_width():
    model, _ = build("audio_head")
    w = model.fc.weight.detach().clone()
    unit = find_units(model, torch.zeros(1, 1, 8, 6)).unit("conv2")
    keep = torch.tensor([0, 2, 5])
    prune_unit(model, unit, keep, {t: selection_matrix(6, keep) for t in unit.taps})
    kept_columns = [t * 6 + c for t in range(8) for c in (0, 2, 5)]
    torch.testing.assert_close(model.fc.weight.detach(), w[:, kept_columns])
    assert (model.flat_dim, model.fc.in_features, model.conv2.out_channels) == (24, 24, 3)
    assert model(torch.randn(2, 1, 8, 6)).shape == (2, 5)


def test_interleaved_flatten_maps_channel_c_to_columns_p_times_c_plus_c():
    """permute to channels-last, then reshape(b, h * w * c) with sizes read off x.shape."""
    model, _ = build("dynamic_flatten")
    unit = find_units(model, torch.zeros(1, 3, 8, 8)).unit("conv")
    [fc] = unit.consumers
    assert fc.spatial == 16 and fc.columns.tolist() == [[p * 4 + c for p in range(16)] for c in range(4)]
    assert unit.shape_attrs == []  # the width is computed from the shape: it follows by itself


class TimeMajorLinear(nn.Module):
    """A Linear applied at every time step of (B, T, C*F): rows are B*T, channel c owns F columns."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5, 3)

    def forward(self, x):
        x = F.relu(self.conv(x))  # (B, C, T, F)
        b, c, t, f = x.shape
        return self.fc(x.permute(0, 2, 1, 3).reshape(b, t, c * f)).mean(1)


def test_linear_on_a_time_major_tensor_has_rows_b_times_t_and_f_columns_per_channel():
    model = TimeMajorLinear().eval()
    x = torch.randn(2, 1, 7, 5)
    unit = find_units(model, x[:1]).unit("conv")
    [fc] = unit.consumers
    assert (fc.spatial, fc.columns) == (5, None)  # c*F + f: channel-major blocks within each row
    with torch.no_grad():
        maps = F.relu(model.conv(x))
        rows = tap_rows(maps.permute(0, 2, 1, 3).reshape(2, 7, 20), unit, fc)
    assert rows.shape == (14, 4, 5)
    torch.testing.assert_close(rows, maps.permute(0, 2, 1, 3).reshape(14, 4, 5))


class SplitsChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), 2, 4, 6).mean(1).flatten(1)[:, :6])


class MergesBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.reshape(-1, 6)).view(x.size(0), -1)


def test_reshapes_that_scatter_channels_or_merge_them_with_the_batch_are_skipped():
    reasons = {s.name: s.reason for s in find_units(SplitsChannels(), torch.zeros(1, 2, 6)).skipped}
    assert reasons["conv"] == "`view` (`view`) spreads each channel over 2 dimensions"
    reasons = {s.name: s.reason for s in find_units(MergesBatch(), torch.zeros(1, 2, 6)).skipped}
    assert reasons["conv"] == "`reshape` (`reshape`) merges the channels with the batch dimension"
