"""specprune: Spectral Pruning (Suzuki et al., IJCAI 2020) for trained PyTorch models.

Every step the CLI runs is a library call::

    from specprune_cli import load_config, compress, analyze, prune_model, load_pruned
"""
from __future__ import annotations

from specprune_cli._version import __version__
from specprune_cli.config_file import load_config
from specprune_cli.errors import SpecpruneError
from specprune_cli.pipeline import analyze, compress
from specprune_cli.prune import PruneResult, prune_model
from specprune_cli.pruned_file import load_pruned

__all__ = ["__version__", "SpecpruneError", "analyze", "compress", "load_config", "load_pruned",
           "prune_model", "PruneResult"]
