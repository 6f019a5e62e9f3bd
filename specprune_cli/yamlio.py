"""Reading YAML that a user wrote, defensively: plain data only, every key once, a bounded size.

A config is a few kilobytes of mappings, lists and scalars. Anything else is a mistake or hostile, and
is refused with a message that names the line: a tag (``!!python/object``), a key given twice (YAML
would silently keep the last one, so a setting the user wrote would not be honoured), nesting deeper
than any config needs, a document that expands (through aliases) to more values than any config has,
or a file larger than ``MAX_BYTES``. libyaml's parser is used when PyYAML has it.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from specprune_cli.errors import ConfigError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 100_000
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq",
                                                  "merge", "timestamp")}
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Refused(yaml.YAMLError):
    """A well-formed document that is not acceptable as a config."""

    def __init__(self, problem: str, node: yaml.Node):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, node.start_mark


def _check_tree(root: yaml.Node) -> None:
    """Tags, depth and expanded size of the node graph, each node visited once (aliases share nodes)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if done:
            children = _children(node)
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_VALUES:
                raise _Refused(f"the document expands to more than {MAX_VALUES:,} values (through "
                               "aliases?); a config holds a few hundred", node)
            continue
        if id(node) in sizes:
            continue
        if node.tag not in _PLAIN_TAGS:
            raise _Refused(f"the tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed; a config "
                           "holds plain mappings, lists, strings, numbers, booleans and null: remove the tag",
                           node)
        if depth > MAX_DEPTH:
            raise _Refused(f"values are nested more than {MAX_DEPTH} levels deep; a config needs a few", node)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in _children(node) if id(c) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class _Loader(_Base):
    """The safe loader, refusing what ``_check_tree`` refuses and keys given twice in one mapping."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_tree(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[str, yaml.Node] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise _Refused(f"the key {key.value!r} is given twice in one mapping (first on line "
                                   f"{seen[key.value].start_mark.line + 1}); YAML would keep only the last: "
                                   "delete one", key)
                seen[key.value] = key
        return super().construct_mapping(node, deep=deep)


def problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: what`` for a YAML error."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return what


def load_text(text: str) -> Any:
    """Parse one YAML document of plain data.

    Raises:
        yaml.YAMLError: malformed YAML, or a document ``_Loader`` refuses (``problem`` describes it).
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:  # the pure-Python parser recurses once per level of nesting
        raise yaml.YAMLError(f"values are nested more than {MAX_DEPTH} levels deep") from None


def read_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML config file (an empty file is an empty mapping).

    Raises:
        ConfigError: not a readable regular file, larger than ``MAX_BYTES``, not UTF-8 text, malformed
            or refused YAML, or a top level that is not a mapping.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"config file {path} is not a regular file; --config takes a YAML file")
        if info.st_size > MAX_BYTES:
            raise ConfigError(f"config file {path} is {info.st_size:,} bytes; a config is a few kilobytes "
                              f"and at most {MAX_BYTES:,} are read: check the --config path")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}; check the --config "
                          "path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text (is it the checkpoint?); --config takes "
                          "a YAML file") from None
    try:
        data = load_text(text)
    except _Refused as exc:
        raise ConfigError(f"config file {path}: {problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({problem(exc)}); fix the syntax there: "
                          "check the indentation and that every key is followed by ': '") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, prune, ...) "
                          f"at the top level, got {type(data).__name__}; see configs/default.yaml")
    return data
