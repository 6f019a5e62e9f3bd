"""One exception hierarchy; the CLI translates it into exit codes and messages.

Every message says what went wrong *and what to do about it*: the user reads it in a CI log.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


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


class OutputError(SpecpruneError):
    """The output directory cannot be written (nothing was left there)."""


class DistributedError(SpecpruneError):
    """Under torchrun: another process failed (its message and exit code), or the processes lost contact."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class GateError(SpecpruneError):
    """A CI quality gate failed (outputs are still written); exit 3.

    Attributes:
        report: the report that was written, so a caller can show it without reading it back.
    """

    exit_code = 3

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report


def reason(exc: BaseException) -> str:
    """``Type: first line of the message``, to quote someone else's exception in one of ours."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@contextlib.contextmanager
def user_code(wrap: Callable[[BaseException], SpecpruneError]) -> Iterator[None]:
    """Run the user's code (importing, building or calling the model): whatever it raises becomes ours.

    ``SystemExit`` and other ``BaseException`` subclasses are caught too, since a model file that calls
    ``sys.exit()`` must not end specprune silently; ``KeyboardInterrupt`` still interrupts, and
    specprune's own errors pass through unchanged.

    Args:
        wrap: builds the error to raise from the caught exception.
    """
    try:
        yield
    except (KeyboardInterrupt, SpecpruneError):
        raise
    except BaseException as exc:  # noqa: B036 - see the docstring
        raise wrap(exc) from exc
