"""specprune: Spectral Pruning (Suzuki et al., IJCAI 2020) for trained PyTorch models."""
from __future__ import annotations

__version__ = "0.1.0"

from specprune_cli.errors import SpecpruneError  # noqa: E402

__all__ = ["__version__", "SpecpruneError"]
