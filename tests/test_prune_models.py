"""Surgery across real architectures: keep-all is exact, a 50% FLOPs target is met (SPEC §4, §5)."""
from __future__ import annotations

import pytest
import torch

from specprune_cli.flops import count_flops, count_params
from specprune_cli.graph import find_units
from specprune_cli.prune import prune_model
from specprune_cli.spectral import reconstruction_matrix
from specprune_cli.stats import collect_oneshot
from specprune_cli.surgery import prune_unit
from helpers import prune_cfg
from zoo import ZOO, build

MODELS = list(ZOO)


def _batches(shape, n=2, bs=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, *shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", MODELS)
def test_keep_all_with_vanishing_ridge_reproduces_outputs(name):
    """Fold A_J with J = all channels and ridge 1e-9 into every consumer: outputs must not change."""
    model, shape = build(name)
    batches = _batches(shape)
    with torch.no_grad():
        before = model(batches[0])
    graph = find_units(model, batches[0][:1])
    assert graph.units, f"{name}: no prunable unit found"
    moments = collect_oneshot(graph.gm, graph.units, batches, max_positions=None, seed=0)
    for u in graph.units:
        keep = torch.arange(u.width)
        a = {t: reconstruction_matrix(moments[(u.name, t)].matrix, keep, ridge=1e-9) for t in u.taps}
        prune_unit(model, u, keep, a)
    with torch.no_grad():
        after = model(batches[0])
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


@pytest.mark.parametrize("name", MODELS)
def test_ratio_one_leaves_every_output_unchanged(name):
    model, shape = build(name)
    batches = _batches(shape, n=1)
    result = prune_model(model, batches, example_input=batches[0][:1],
                         cfg=prune_cfg(allocation="ratio", ratio=1.0, ridge=1e-9), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(result.model(batches[0]), model(batches[0]), rtol=1e-4, atol=1e-5)
    assert result.report["params_after"] == result.report["params_before"]


@pytest.mark.parametrize("name", MODELS)
def test_half_flops_target_is_met_on_the_whole_model(name):
    """FLOPs are counted over the whole model: unprunable layers cost what they cost, and the prunable
    units shrink enough to bring the total to the target."""
    model, shape = build(name)
    batches = _batches(shape)
    x1 = batches[0][:1]
    result = prune_model(model, batches, example_input=x1,
                         cfg=prune_cfg(target={"flops": 0.5}, round_to=1, min_channels=1, max_positions=16),
                         progress=False)
    pruned = result.model
    ratio = count_flops(pruned, x1) / count_flops(model, x1)
    assert 0.475 <= ratio <= 0.525, f"{name}: kept {ratio:.3f} of FLOPs"
    assert ratio == pytest.approx(result.report["flops_after"] / result.report["flops_before"])
    assert count_params(pruned) < count_params(model)
    with torch.no_grad():
        out = pruned(batches[1])
    assert out.shape == model(batches[1]).shape and torch.isfinite(out).all()
    # The original was not touched.
    assert count_params(model) == result.report["params_before"]


def test_sequential_statistics_equal_a_fresh_forward_despite_inplace_ops():
    """The segment runner replays cached activations; `out += identity` and ReLU(inplace=True) must not
    be applied twice. With keep-all widths, each unit's sequential statistics must equal the oneshot ones."""
    from torch import nn

    from specprune_cli.stats import SegmentRunner, new_moments, no_inplace_modules, observe

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 8, 3, padding=1)
            self.act = nn.ReLU(inplace=True)
            self.b = nn.Conv2d(8, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 6, 1)
            self.d = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            out = self.b(self.act(self.a(x)))
            out += x
            return self.d(torch.relu_(self.c(out)))

    model = Block().eval()
    batches = _batches((4, 6, 6), n=3, bs=5)
    graph = find_units(model, batches[0][:1])
    assert [u.name for u in graph.units] == ["a", "c"]
    oneshot = collect_oneshot(graph.gm, graph.units, batches, max_positions=None, seed=0)
    runner = SegmentRunner(graph.gm, batches)
    for u in graph.units:
        local = new_moments([u], max_positions=None, seed=0)
        with observe(graph.gm, [u], local), no_inplace_modules(graph.gm):
            runner.run(u.end_position + 1, snapshot_at=u.position)
        for tap in u.taps:
            torch.testing.assert_close(local[(u.name, tap)].matrix, oneshot[(u.name, tap)].matrix)
    assert model.act.inplace is True  # restored
