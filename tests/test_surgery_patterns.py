"""The fold W' = W A for every consumer kind and column map, checked against the original model whose
consumer input has its dropped channels replaced by the reconstruction, laid out by hand
(docs/method.md §4)."""
from __future__ import annotations

import pytest
import torch

from specprune_cli.graph import find_units
from specprune_cli.surgery import prune_unit
from patterns import build


def _time_major(columns_per_row: int):
    """Rebuild (B, rows*C) laid out as row-major (row, channel): channel c at r * C + c."""
    def rebuild(x, keep, a):
        b, n = x.shape
        rows = x.reshape(b, columns_per_row, n // columns_per_row)
        return (rows[..., keep] @ a.T).reshape(b, -1)
    return rebuild


def _channels_on(dim: int):
    """Rebuild a tensor whose channels are on ``dim``."""
    def rebuild(x, keep, a):
        moved = x.movedim(dim, -1)
        return (moved[..., keep] @ a.T).movedim(-1, dim).contiguous()
    return rebuild


#: (pattern, unit, consumer, how its input is laid out, by hand)
CASES = [
    ("audio_head", "conv2", "fc", _time_major(8)),  # (B, T, C) flattened: c at t * C + c
    ("dynamic_flatten", "conv", "fc", _time_major(16)),  # (B, H*W, C) flattened: c at p * C + c
    ("decoder", "conv", "up", _channels_on(1)),  # ConvTranspose2d reads it
    ("decoder", "up", "head", _channels_on(1)),  # ConvTranspose2d makes it, BatchNorm after the ReLU
    ("volumetric", "conv1", "conv2", _channels_on(1)),  # Conv3d
    ("keyword_spotter", "conv1", "conv2", _channels_on(1)),  # Conv1d
    ("channels_last", "conv", "fc1", _channels_on(-1)),  # Linear on (B, H, W, C)
    ("sequence_to_conv", "conv", "conv2d", _channels_on(1)),  # Conv1d -> unsqueeze -> Conv2d
    ("mnist_classic", "conv1", "conv2", _channels_on(1)),
    ("tabular_bn_after_relu", "net.0", "net.3", _channels_on(1)),
    ("layer_scale", "conv", "head", _channels_on(1)),  # through x * gamma and Flatten/Unflatten
]


@pytest.mark.parametrize("name,unit_name,consumer,rebuild", CASES)
def test_fold_equals_reconstructing_the_consumer_input(name, unit_name, consumer, rebuild):
    model, shape = build(name)
    pruned, _ = build(name)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    unit = find_units(pruned, x[:1]).unit(unit_name)
    keep = torch.arange(0, unit.width, 2)
    a = torch.randn(unit.width, keep.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    prune_unit(pruned, unit, keep, {t: a for t in unit.taps})
    handle = model.get_submodule(consumer).register_forward_pre_hook(
        lambda _m, args: (rebuild(args[0], keep, a.to(args[0].dtype)),))
    try:
        with torch.no_grad():
            want = model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), want, rtol=1e-4, atol=1e-5)


def test_a_failing_check_pass_names_the_unit():
    """A consumer left at its old width fails in the forward check: the error names it and its unit."""
    from specprune_cli.errors import ModelError
    from specprune_cli.layers import require_layer_kind
    from specprune_cli.surgery import verify_forward

    model, shape = build("keyword_spotter")
    x = torch.randn(2, *shape)
    expected = model(x).shape
    graph = find_units(model, x[:1])
    unit = graph.unit("conv1")
    keep = torch.tensor([0, 1, 2])
    require_layer_kind(model.conv1).slice_out(model.conv1, keep)  # producer cut, followers and consumer not
    with pytest.raises(ModelError) as err:
        verify_forward(model, x, expected, units=graph.units)
    assert str(err.value).startswith("the pruned model failed its check forward pass in bn1 (unit conv1) (")
    assert unit.followers[0].module == "bn1"
