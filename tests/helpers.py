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
