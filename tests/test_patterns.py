"""Every pattern model: what is pruned and what is skipped (with why), keep-all is exact, slicing a unit
equals zeroing its dropped channels in the original, the full run works in both orders, and the plan
rebuilds a fresh instance (int attributes included)."""
from __future__ import annotations

import copy

import pytest
import torch

from specprune_cli.graph import find_units
from specprune_cli.prune import prune_model
from specprune_cli.pruned_file import apply_plan_shapes
from specprune_cli.surgery import prune_unit, selection_matrix
from helpers import fold_keep_all, prune_cfg
from patterns import PATTERNS, build

#: pattern -> (pruned units, {skipped producer: words its reason must contain})
EXPECTED = {
    "audio_head": (["conv1", "conv2"], {"fc": "model output"}),
    "audio_head_literal": (["conv1"], {"conv2": "the literal 48", "fc": "model output"}),
    "mnist_classic": (["conv1", "fc1"], {"conv2": "the literal 80"}),
    "keyword_spotter": (["conv1", "conv2"], {}),
    "volumetric": (["conv1", "conv2"], {}),
    "decoder": (["conv", "up"], {}),
    "tabular_bn_after_relu": (["net.0"], {}),
    "instance_norm": (["conv1"], {}),
    "functional_conv": ([], {"conv": "functional layer `conv2d`"}),
    "padded": (["a", "b", "c"], {}),
    "channels_last": (["conv", "fc1", "fc2"], {}),
    "sequence_to_conv": (["proj", "conv", "conv2d"], {}),
    "channel_split": (["a", "d"], {"b": "keeps only some of the channels", "c": "`glu`"}),
    "layer_scale": (["conv"], {}),
    "reads_channel_count": ([], {"conv": "Python code reads its channel count"}),
    "dynamic_flatten": (["conv"], {}),
    "norm_subclasses": (["a"], {"b": "LayerNorm2d", "c": "BatchNormMixing"}),
    "layer_subclasses": (["fc1"], {"a": "with its own forward that does not compute its parent's"}),
    "scaled_residual": (["stem", "a", "c"], {}),
    "torch_transformer": (["enc.layers.0.linear1", "enc.layers.1.linear1"],
                          {"proj": "MultiheadAttention", "head": "model output"}),
    "torch_encoder_decoder": (["t.encoder.layers.0.linear1", "t.decoder.layers.0.linear1"],
                              {"head": "model output"}),
    "crnn": (["conv"], {"fc": "model output"}),
    "conv_lstm": (["conv"], {"fc": "model output"}),
    "yolo_c2f": (["stem.conv", "m.0.0.conv", "cv2.conv", "spp2.conv"],
                 {"cv1.conv": "`chunk`", "m.0.1.conv": "residual stream", "spp1.conv": "copy of themselves"}),
    "swiglu": (["gate"], {"proj": "LayerNorm", "head": "model output"}),
    "hand_written_activations": (["a", "b"], {"fc": "model output"}),
}

#: (pattern, unit) whose path from producer to consumers maps 0 to 0 (no BatchNorm shift, no `+ 1`):
#: slicing the unit must give exactly the original with the dropped channels zeroed at the producer.
ZERO_PRESERVING = [("audio_head", "conv2"), ("dynamic_flatten", "conv"), ("channels_last", "conv"),
                   ("channels_last", "fc1"), ("sequence_to_conv", "proj"), ("sequence_to_conv", "conv"),
                   ("mnist_classic", "conv1"), ("volumetric", "conv2"), ("decoder", "conv"),
                   ("channel_split", "a"), ("layer_scale", "conv"),
                   ("torch_transformer", "enc.layers.1.linear1"),
                   ("torch_encoder_decoder", "t.decoder.layers.0.linear1"), ("conv_lstm", "conv"),
                   ("swiglu", "gate"), ("hand_written_activations", "a"), ("hand_written_activations", "b")]


def _batch(shape, n=6, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_every_pattern_has_expectations():
    assert sorted(EXPECTED) == sorted(PATTERNS)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_units_found_and_skips_explained(name):
    model, shape = build(name)
    graph = find_units(model, _batch(shape)[:1])
    units, skipped = EXPECTED[name]
    assert [u.name for u in graph.units] == units
    reasons = {s.name: s.reason for s in graph.skipped}
    for producer, words in skipped.items():
        assert words in reasons[producer]
    assert graph.replayable


@pytest.mark.parametrize("name", [n for n in PATTERNS if EXPECTED[n][0]])
def test_keep_all_reproduces_the_outputs(name):
    """Every unit kept whole with a vanishing ridge: the folds are W A with A ~ I."""
    model, shape = build(name)
    x = _batch(shape)
    with torch.no_grad():
        before = model(x)
    graph = find_units(model, x[:1])
    fold_keep_all(model, graph, [x])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def _zeroed_at_producer(model, unit, keep):
    """The original model with the channels not in ``keep`` set to zero where the producer makes them."""
    dropped = torch.ones(unit.width, dtype=torch.bool)
    dropped[keep] = False

    def hook(_mod, _args, out):
        out = out.clone()
        index = [slice(None)] * out.dim()
        index[unit.channel_dim] = dropped
        out[tuple(index)] = 0
        return out

    return model.get_submodule(unit.name).register_forward_hook(hook)


@pytest.mark.parametrize("name,unit_name", ZERO_PRESERVING)
def test_slicing_a_unit_equals_zeroing_its_dropped_channels(name, unit_name):
    """Independent of the column map: wrong columns in the consumer would give other outputs."""
    model, shape = build(name)
    x = _batch(shape)
    pruned = copy.deepcopy(model)
    unit = find_units(pruned, x[:1]).unit(unit_name)
    keep = torch.arange(0, unit.width, 2)
    prune_unit(pruned, unit, keep, {t: selection_matrix(unit.width, keep) for t in unit.taps})
    handle = _zeroed_at_producer(model, unit, keep)
    try:
        with torch.no_grad():
            want = model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["sequential", "oneshot"])
@pytest.mark.parametrize("name", [n for n in PATTERNS if EXPECTED[n][0]])
def test_half_width_run_and_the_plan_rebuilds_a_fresh_instance(name, order):
    """prune_model at half width (the sequential order replays the graph and slices cached values),
    then a fresh instance resized by the plan loads the weights and gives the same outputs."""
    model, shape = build(name)
    batches = [_batch(shape, n=6, seed=s) for s in (1, 2)]
    cfg = prune_cfg(allocation="ratio", ratio=0.5, round_to=1, min_channels=1, max_positions=8, order=order)
    result = prune_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False)
    assert all(u["kept"] == -(-u["width"] // 2) for u in result.report["units"])
    x = _batch(shape, seed=3)
    with torch.no_grad():
        out = result.model(x)
        assert out.shape == model(x).shape and torch.isfinite(out).all()
    fresh, _ = build(name, seed=5)
    apply_plan_shapes(fresh, result.plan, x[:1])
    fresh.load_state_dict(result.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)


@pytest.mark.parametrize("name", ["audio_head", "decoder", "keyword_spotter", "volumetric", "layer_scale",
                                  "norm_subclasses", "layer_subclasses", "torch_transformer",
                                  "torch_encoder_decoder", "crnn", "conv_lstm"])
def test_pruned_patterns_export_to_onnx_with_parity(name, tmp_path):
    """The rewritten int attribute, the time-major column map, Conv1d/3d, ConvTranspose2d and an
    Unflatten, a sliced BatchNorm subclass with its own forward, torch's transformer layers cut inside,
    and a GRU and an LSTM reading pruned channels survive the ONNX exporter (loaded back and compared at
    batch sizes 2 and 3)."""
    import types

    from specprune_cli.export import export_model

    model, shape = build(name)
    batches = [_batch(shape, n=8, seed=s) for s in (1, 2)]
    cfg = prune_cfg(allocation="ratio", ratio=0.5, round_to=1, min_channels=1, max_positions=8)
    pruned = prune_model(model, batches, example_input=batches[0][:1], cfg=cfg, progress=False).model
    settings = types.SimpleNamespace(formats=("onnx",), opset=18, onnx_tolerance=1e-4)
    info = export_model(pruned, batches[0][:2], tmp_path, settings)["onnx"]
    assert info["verified"] and info["batch_sizes"] == [2, 3]
