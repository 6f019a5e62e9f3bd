"""One exception hierarchy; the CLI translates it into exit codes and messages.

Every message says what went wrong *and what to do about it*: the user reads it in a CI log.
"""
from __future__ import annotations


class SpecpruneError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with (1: the run failed)."""

    exit_code = 1


class ConfigError(SpecpruneError):
    """The config or a command-line option is wrong (exit 2, like a usage error)."""

    exit_code = 2


class CheckpointError(SpecpruneError):
    """The checkpoint cannot be read, or does not match the architecture."""


class ModelError(SpecpruneError):
    """The model cannot be built, traced or run on the configured input."""


class DataError(SpecpruneError):
    """Calibration / fine-tune / eval data is missing or malformed."""


class StatisticsError(SpecpruneError):
    """Activation statistics are unusable (NaN/Inf) or were read before being gathered."""


class BudgetError(SpecpruneError):
    """The requested FLOPs/params target cannot be met."""


class ExportError(SpecpruneError):
    """An export could not be written, or did not match the in-memory model when loaded back."""


class GateError(SpecpruneError):
    """A CI quality gate failed (outputs are still written); exit 3."""

    exit_code = 3
