"""Shared test helpers."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def prune_cfg(**overrides: Any):
    """A validated PruneConfig with test-friendly overrides (the real config class, not a stand-in)."""
    from specprune_cli.config import PruneConfig

    return PruneConfig(**overrides)


def warm_batchnorm(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """BatchNorm running statistics from three random batches of 16 (so pruning sees real scales), then
    eval mode. Uses the global RNG: seed it first for reproducible weights and statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape))
    return model.eval()


def fold_keep_all(model: nn.Module, graph, batches) -> None:
    """Keep every channel of every unit and fold A with a vanishing ridge (A ~ I) into the consumers:
    the outputs must not change (docs/method.md §4)."""
    from specprune_cli.spectral import reconstruction_matrix
    from specprune_cli.stats import collect_oneshot
    from specprune_cli.surgery import prune_unit

    moments = collect_oneshot(graph.gm, graph.units, batches, max_positions=None, seed=0)
    for u in graph.units:
        keep = torch.arange(u.width)
        prune_unit(model, u, keep, {t: reconstruction_matrix(moments[(u.name, t)].matrix, keep, ridge=1e-9)
                                    for t in u.taps})
