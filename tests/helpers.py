"""Shared test helpers."""
from __future__ import annotations

from typing import Any


def prune_cfg(**overrides: Any):
    """A validated PruneConfig with test-friendly overrides (the real config class, not a stand-in)."""
    from specprune_cli.config import PruneConfig

    base = PruneConfig()
    data = base.to_dict() if hasattr(base, "to_dict") else {}
    data.update(overrides)
    return PruneConfig.from_dict(data) if hasattr(PruneConfig, "from_dict") else PruneConfig(**data)
