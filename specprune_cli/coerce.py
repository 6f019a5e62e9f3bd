"""The generic half of the config: frozen dataclass sections built from YAML mappings, type-checked once.

A schema (``config.py``) declares each section as a frozen dataclass that inherits :class:`Section`,
with type hints from a small vocabulary: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``tuple[T, ...]``, ``dict[str, T]``, ``Any``, unions with ``None`` (tried in order), another section,
or an optional section. ``Section.from_dict`` names an unknown key together with the closest valid one;
construction, from a mapping or directly, converts every value to its declared type (lists become
tuples, ints become floats) or raises a ``ConfigError`` that names the key, the type and the value.
"""
from __future__ import annotations

import contextvars
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from specprune_cli.errors import ConfigError


def type_name(tp: Any) -> str:
    """How a declared type reads in a message: "an integer", "one of a, b", "a list of numbers"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        named = " or ".join(type_name(a) for a in args if a is not type(None))
        return named + (" or null" if type(None) in args else "")
    if origin is tuple:
        return f"a list of {type_name(typing.get_args(tp)[0])}s"
    if origin is dict or _section_of(tp) is not None:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _bad(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {key} must be {type_name(tp)}, got {value!r} ({type(value).__name__})")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to the declared type ``tp``.

    Args:
        key: the dotted config key, for the message.
        value: what the YAML (or a caller) gave.
        tp: the declared type (see the module docstring for the vocabulary).

    Returns:
        The value, with lists as tuples and ints as floats where a number is declared.

    Raises:
        ConfigError: the value does not have the declared type.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):  # the first type that fits, in order
            try:
                return coerce(key, value, inner)
            except ConfigError:
                continue
        raise _bad(key, tp, value)
    if origin is Literal:
        if isinstance(value, bool) or value not in typing.get_args(tp):
            raise _bad(key, tp, value)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, tp, value)
        return tuple(coerce(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, tp, value)
        k_tp, v_tp = typing.get_args(tp)
        return {coerce(key, k, k_tp): coerce(f"{key}.{k}", v, v_tp) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string: accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                raise _bad(key, tp, value) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(key, tp, value)
    if tp in (bool, str, int):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise _bad(key, tp, value)
        return value
    raise TypeError(f"unsupported type {tp} in the config schema")  # a schema bug, not a user error


def unknown_key(prefix: str, key: Any, valid: Sequence[str]) -> ConfigError:
    """The error for a key the schema does not have, naming the closest valid key (or all of them)."""
    full = f"{prefix}.{key}" if prefix else str(key)
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    else:
        hint = f"valid keys{' under ' + prefix if prefix else ''}: {', '.join(valid)}"
    return ConfigError(f"unknown config key {full}; {hint}")


def _section_of(tp: Any) -> type[Section] | None:
    """The Section class a field holds (``S`` or ``S | None``), else None."""
    if isinstance(tp, type) and issubclass(tp, Section):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], Section):
            return inner[0]
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# The dotted path of the section from_dict is building, so that checks in __post_init__ name
# data.eval.path rather than the class's usual place (data.calibration.path).
_BUILDING: contextvars.ContextVar[str | None] = contextvars.ContextVar("_BUILDING", default=None)


class Section:
    """Mixin for a frozen dataclass section: build from a mapping, convert types on construction, dump.

    Subclasses set ``_path`` (the section's usual dotted name) and may override ``_check`` for
    cross-field and range checks.
    """

    _path: typing.ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: str | None = None) -> Any:
        """Build the section from a (YAML) mapping; missing keys take their defaults.

        Args:
            data: the mapping; None means all defaults.
            path: dotted name of the section in the file, for messages (defaults to ``_path``).

        Raises:
            ConfigError: an unknown key (naming the closest valid one) or a value of the wrong type.
        """
        path = cls._path if path is None else path
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            if not path:
                raise ConfigError(f"the config must be a mapping of sections ({', '.join(names)}), got "
                                  f"{type(data).__name__}")
            raise ConfigError(f"config key {path} must be a mapping, got {data!r} ({type(data).__name__})")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                raise unknown_key(path, key, names)
            section = _section_of(hints[key])
            if section is not None and (value is not None or section is hints[key]):
                value = section.from_dict(value, _join(path, key))
            values[key] = value  # plain values are converted once, in __post_init__
        token = _BUILDING.set(path)
        try:
            return cls(**values)
        finally:
            _BUILDING.reset(token)

    def __post_init__(self) -> None:
        path = _BUILDING.get()
        _BUILDING.set(None)  # sections built below this one must not inherit its path
        path = self._path if path is None else path
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            tp, value = hints[f.name], getattr(self, f.name)
            section = _section_of(tp)
            if section is None:
                object.__setattr__(self, f.name, coerce(_join(path, f.name), value, tp))
            elif isinstance(value, Mapping):  # direct construction with a plain mapping
                object.__setattr__(self, f.name, section.from_dict(value, _join(path, f.name)))
            elif not isinstance(value, section) and not (value is None and section is not tp):
                raise _bad(_join(path, f.name), tp, value)
        self._check(path)

    def _check(self, path: str) -> None:
        """Cross-field and range checks; ``path`` names the section in messages."""

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (lists, dicts, scalars) that ``from_dict`` turns back into an equal object."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def in_range(key: str, value: float | None, lo: float, hi: float, *, lo_open: bool = False,
             hi_open: bool = False) -> None:
    """A ConfigError unless ``value`` (None passes) lies in the interval."""
    if value is None:
        return
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"config key {key} must be in {interval}, got {value!r}")


def positive(key: str, value: float | None, *, allow_zero: bool = False) -> None:
    """A ConfigError unless ``value`` (None passes) is > 0 (or >= 0 with ``allow_zero``)."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        what = "0 or more" if allow_zero else "positive"
        raise ConfigError(f"config key {key} must be {what}, got {value!r}")
