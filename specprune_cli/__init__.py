"""specprune: Spectral Pruning (Suzuki et al., IJCAI 2020) for trained PyTorch models.

Every step the CLI runs is a library call::

    from specprune_cli import load_config, compress, analyze, prune_model, load_pruned
"""
from __future__ import annotations

__version__ = "0.1.0"

from specprune_cli.checkpoint import load_pruned  # noqa: E402
from specprune_cli.config import load_config  # noqa: E402
from specprune_cli.errors import SpecpruneError  # noqa: E402
from specprune_cli.pipeline import analyze, compress  # noqa: E402
from specprune_cli.prune import PruneResult, prune_model  # noqa: E402

__all__ = ["__version__", "SpecpruneError", "analyze", "compress", "load_config", "load_pruned", "prune_model",
           "PruneResult"]
