"""Config files: reading the YAML, applying ``--set KEY=VALUE`` overrides, and writing the resolved
config next to the outputs. The sections themselves are in ``config.py``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from specprune_cli import yamlio
from specprune_cli.config import Config
from specprune_cli.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"prune.target.flops=0.3"`` -> (["prune", "target", "flops"], 0.3); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key, e.g. --set prune.target.flops=0.3; "
                          f"got {text!r}")
    try:
        value = yamlio.load_text(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({yamlio.problem(exc)}); "
                          "quote strings that contain ':' or '#'") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config mapping (a new dict; the input is not changed).

    Setting ``prune.target.<kind>`` replaces the whole target, so ``--set prune.target.params=0.4``
    switches a YAML flops target to params instead of failing the exactly-one check.
    """
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[:i + 1])
                raise ConfigError(f"--set {'.'.join(parts)}: {where} is {child!r}, not a mapping")
            node = child
        if parts[:2] == ["prune", "target"] and len(parts) == 3:
            node.clear()
        node[parts[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping in a YAML config file (see ``yamlio.read_mapping`` for what is refused)."""
    return yamlio.read_mapping(path)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``--set`` overrides, validate (defaults < YAML < overrides).

    Args:
        path: the YAML file; None starts from the defaults alone.
        overrides: "dotted.key=value" strings, values parsed as YAML, applied in order.

    Returns:
        The validated Config.

    Raises:
        ConfigError: unreadable or malformed file, unknown key, wrong type or out-of-range value.
    """
    data = read_yaml(path) if path is not None else {}
    return Config.from_dict(apply_overrides(data, overrides))


def dump_resolved(config: Config, path: str | os.PathLike) -> None:
    """Write the fully resolved config (every key, defaults included) as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False, default_flow_style=False)
    os.replace(tmp, path)
