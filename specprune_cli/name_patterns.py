"""Module-name patterns, as ``prune.exclude``, ``prune.overrides`` and ``quantize.exclude`` write them.

A pattern is a module name (``features.3``), or ``re:`` followed by a Python regular expression that must
match the whole name (``re:layer4\\..*``). One compile serves both the config check, which names the key,
and the matching.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from specprune_cli.errors import ConfigError


def compile_patterns(patterns: Sequence[str], key: str = "a prune pattern") -> list[Callable[[str], bool]]:
    """One predicate per pattern; a ConfigError naming ``key`` for a regex that does not compile."""
    out: list[Callable[[str], bool]] = []
    for p in patterns:
        if p.startswith("re:"):
            try:
                rx = re.compile(p[3:])
            except re.error as exc:
                raise ConfigError(f"{key} has an invalid regex {p!r} ({exc}); patterns are module names "
                                  "or 're:' followed by a Python regular expression matching whole "
                                  "names") from None
            out.append(lambda name, rx=rx: rx.fullmatch(name) is not None)
        else:
            out.append(lambda name, p=p: name == p)
    return out


def check_patterns(key: str, patterns: Sequence[str]) -> None:
    """A ConfigError for a ``re:`` pattern that does not compile, naming the config key."""
    compile_patterns(patterns, f"config key {key}")


def make_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A predicate true for names matching any of ``patterns``."""
    preds = compile_patterns(patterns)
    return lambda name: any(f(name) for f in preds)


def override_for(name: str, overrides: Mapping[str, float]) -> float | None:
    """The ratio of the first override whose pattern matches ``name`` (first match wins)."""
    for pattern, pred in zip(overrides, compile_patterns(list(overrides))):
        if pred(name):
            return float(overrides[pattern])
    return None
