"""Unit discovery: what is found, what is skipped and why (docs/method.md §1)."""
from __future__ import annotations

import torch
from torch import nn

from specprune_cli.graph import find_units
from zoo import build


def _units(name: str):
    model, shape = build(name)
    return find_units(model, torch.zeros(2, *shape))


def test_flatten_cnn_units_and_consumers():
    g = _units("flatten_cnn")
    names = [u.name for u in g.units]
    assert names == ["features.0", "features.4", "features.8", "fc1"]
    last = g.unit("features.8")
    assert [(c.module, c.kind, c.spatial) for c in last.consumers] == [("fc1", "linear", 16)]
    assert [f.module for f in last.followers] == ["features.9"]
    assert [s.name for s in g.skipped] == ["fc2"]
    assert "model output" in g.skipped[0].reason


def test_resnet18_residual_streams_are_units_with_every_producer_and_reader():
    g = _units("resnet18")
    interiors = [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    streams = {u.name: u for u in g.units if u.type == "stream"}
    assert sorted(u.name for u in g.units if u.type == "plain") == sorted(interiors)
    assert sorted(streams) == ["conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
    # The stage-1 stream: the stem and both blocks write it; both blocks and stage 2's entry read it.
    first = streams["conv1"]
    assert [p.module for p in first.producers] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert sorted(c.module for c in first.consumers) == [
        "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]
    assert len(first.taps) == 3
    # A downsampling block's shortcut conv writes the next stage's stream.
    assert "layer2.0.downsample.0" in [p.module for p in streams["layer2.0.conv2"].producers]
    assert ("layer2.0.downsample.1", "batchnorm") in [(f.module, f.role)
                                                      for f in streams["layer2.0.conv2"].followers]
    assert [s.name for s in g.skipped] == ["fc"]


def test_resnet50_bottleneck_has_two_units_per_block_and_a_stream_per_stage():
    g = _units("resnet50")
    assert "layer1.0.conv1" in [u.name for u in g.units] and "layer1.0.conv2" in [u.name for u in g.units]
    stem = g.unit("conv1")  # layer1.0 has a downsample: the stem is read by two convs, never added
    assert stem.type == "plain"
    assert sorted(c.module for c in stem.consumers) == ["layer1.0.conv1", "layer1.0.downsample.0"]
    assert len(g.units) == 33 + 4
    assert sum(u.type == "stream" for u in g.units) == 4


def test_mobilenet_v2_expand_depthwise_project_chain():
    g = _units("mobilenet_v2")
    u = g.unit("features.2.conv.0.0")
    assert [(f.module, f.role) for f in u.followers] == [
        ("features.2.conv.0.1", "batchnorm"), ("features.2.conv.1.0", "depthwise"),
        ("features.2.conv.1.1", "batchnorm")]
    assert [c.module for c in u.consumers] == ["features.2.conv.2"]


def test_squeeze_excitation_gate_is_sliced_with_the_unit_it_scales():
    g = _units("efficientnet_b0")
    u = g.unit("features.2.0.block.0.0")
    assert ("features.2.0.block.2.fc2", "rows") in [(f.module, f.role) for f in u.followers]
    assert sorted(c.module for c in u.consumers) == ["features.2.0.block.2.fc1", "features.2.0.block.3.0"]
    assert "features.2.0.block.2.fc2" not in [s.name for s in g.skipped]


def test_concatenated_expands_are_blocks_layernorm_and_grouped_conv_are_reported_not_pruned():
    g = _units("squeezenet1_1")
    e1, e3 = g.unit("features.3.expand1x1"), g.unit("features.3.expand3x3")
    assert (e1.type, e3.type) == ("concat", "concat")
    assert [(c.module, c.block.lead, c.block.own, c.block.trail) for c in e1.consumers + e3.consumers] == [
        ("features.4.squeeze", 0, 64, 64), ("features.4.squeeze", 64, 64, 0)]
    vit = _units("vit_small")
    assert [u.name for u in vit.units] == [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(2)]
    assert "LayerNorm" in {s.name: s.reason for s in vit.skipped}["encoder.layers.encoder_layer_0.mlp.3"]

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 3, groups=2)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    g = find_units(Grouped(), torch.zeros(1, 3, 8, 8))
    assert "grouped convolution b (groups=2)" in {s.name: s.reason for s in g.skipped}["a"]


def test_untraceable_control_flow_is_reported_and_the_rest_still_pruned():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
                return self.conv(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.branchy = Branchy()
            self.b = nn.Linear(4, 5)
            self.c = nn.Linear(5, 2)

        def forward(self, x):
            x = self.branchy(self.a(x)).mean((2, 3))
            return self.c(torch.relu(self.b(x)))

    g = find_units(Net(), torch.zeros(1, 3, 8, 8))
    assert [u.name for u in g.units] == ["b"]
    assert "cannot trace" in {s.name: s.reason for s in g.skipped}["a"]


def test_exclude_predicate_reports_the_unit_as_excluded():
    model, shape = build("flatten_cnn")
    g = find_units(model, torch.zeros(1, *shape), exclude=lambda n: n == "fc1")
    assert "fc1" not in [u.name for u in g.units]
    assert {s.name: s.reason for s in g.skipped}["fc1"] == "excluded by config (prune.exclude)"
