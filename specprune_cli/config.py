"""The YAML config as frozen, validated dataclasses (a contract: the README documents these keys).

Precedence is fixed: dataclass defaults < the YAML file < ``--set KEY=VALUE`` overrides.
Every section validates on construction, so a ``Config`` that exists is a usable one; ``to_dict()``
round-trips through ``from_dict()``. Mappings (``model.kwargs``, ``prune.target``, ``prune.overrides``)
are stored as plain dicts: the dataclasses are frozen against rebinding, and ``to_dict`` copies.
"""
from __future__ import annotations

import contextvars
import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from specprune_cli.errors import ConfigError

DATA_FORMATS = ("npz", "imagefolder", "torchvision", "idx", "synthetic")
TARGET_KINDS = ("flops", "params")


# ---------------------------------------------------------------------------------------------------
# Generic validation: one place that turns a YAML value into the declared type, or says why it cannot.
# ---------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    if origin is dict:
        return "a mapping"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _bad(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp`` (lists become tuples, ints become floats), or a ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):  # the first type that fits, in order
            try:
                return _coerce(key, value, inner)
            except ConfigError:
                continue
        raise _bad(key, tp, value)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise _bad(key, tp, value)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, tp, value)
        return tuple(_coerce(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, tp, value)
        k_tp, v_tp = typing.get_args(tp)
        return {_coerce(key, k, k_tp): (v if v_tp is Any else _coerce(f"{key}.{k}", v, v_tp))
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool):
            raise _bad(key, tp, value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string: accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                raise _bad(key, tp, value) from None
        raise _bad(key, tp, value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(key, tp, value)
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported type {tp}")


def _unknown_key(prefix: str, key: Any, valid: Sequence[str]) -> ConfigError:
    full = f"{prefix}.{key}" if prefix else str(key)
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    else:
        hint = f"valid keys{' under ' + prefix if prefix else ''}: {', '.join(valid)}"
    return ConfigError(f"unknown config key {full}; {hint}")


# The dotted path of the section being built by from_dict, so that checks run in __post_init__ name
# data.eval.path rather than the class's usual place (data.calibration.path).
_BUILDING: contextvars.ContextVar[str | None] = contextvars.ContextVar("_BUILDING", default=None)


class _Section:
    """Mixin: build from a dict with key checks, validate types on construction, dump to a dict."""

    _path: typing.ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: str | None = None):
        """Build the section from a (YAML) mapping; missing keys take their defaults.

        Args:
            data: the mapping; None means all defaults.
            path: dotted name of the section in the file, for messages (defaults to the usual one).

        Raises:
            ConfigError: an unknown key (naming the closest valid one) or a value of the wrong type.
        """
        path = cls._path if path is None else path
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"config key {path} must be a mapping, got {data!r} ({type(data).__name__})")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                raise _unknown_key(path, key, names)
            tp = hints[key]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                values[key] = tp.from_dict(value, f"{path}.{key}")
            elif key in cls._nested_optional():
                values[key] = None if value is None else cls._nested_optional()[key].from_dict(
                    value, f"{path}.{key}")
            else:
                values[key] = _coerce(f"{path}.{key}", value, tp)
        token = _BUILDING.set(path)
        try:
            return cls(**values)
        finally:
            _BUILDING.reset(token)

    @classmethod
    def _nested_optional(cls) -> dict[str, type]:
        return {}

    def __post_init__(self) -> None:
        # Direct construction (PruneConfig(ridge=...)) gets the same checks as from_dict.
        path = _BUILDING.get()
        _BUILDING.set(None)  # nested sections built below must not inherit this path
        path = self._path if path is None else path
        hints = typing.get_type_hints(type(self))
        nested = type(self)._nested_optional()
        for f in dataclasses.fields(self):
            tp = hints[f.name]
            value = getattr(self, f.name)
            if (isinstance(tp, type) and dataclasses.is_dataclass(tp)) or f.name in nested:
                if isinstance(value, Mapping):
                    sub = tp if f.name not in nested else nested[f.name]
                    object.__setattr__(self, f.name, sub.from_dict(value, f"{path}.{f.name}".lstrip(".")))
                continue
            object.__setattr__(self, f.name, _coerce(f"{path}.{f.name}", value, tp))
        self._check(path)

    def _check(self, path: str) -> None:
        """Cross-field and range checks; ``path`` names the section in messages."""

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (lists, dicts, scalars) that ``from_dict`` turns back into an equal object."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _in_range(key: str, value: float | None, lo: float, hi: float, *, lo_open: bool = False,
              hi_open: bool = False) -> None:
    if value is None:
        return
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"config key {key} must be in {interval}, got {value!r}")


def _positive(key: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        what = "0 or more" if allow_zero else "positive"
        raise ConfigError(f"config key {key} must be {what}, got {value!r}")


def _check_patterns(key: str, patterns: Sequence[str]) -> None:
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ConfigError(f"config key {key} has an invalid regex {p!r} ({exc}); patterns are "
                                  "module names or 're:' followed by a Python regular expression") from None


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig(_Section):
    """``model``: how to build the architecture the checkpoint belongs to.

    Attributes:
        arch: "package.module:callable" or "path/to/file.py:callable" (a path relative to the working
            directory); may be null only for a trusted checkpoint that pickles the whole module.
        kwargs: keyword arguments for the callable.
        input_shape: one sample's shape without the batch dimension, e.g. [3, 32, 32], [40, 100] or [784].
        forward_kwargs: non-tensor keyword arguments every call of the model's forward gets (e.g.
            {embed: false}), in checks, pruning, evaluation, fine-tuning and export alike.
    """

    _path: typing.ClassVar[str] = "model"

    arch: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (3, 32, 32)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)

    def _check(self, path: str) -> None:
        if self.arch is not None and ":" not in self.arch:
            raise ConfigError(f"config key {path}.arch must have the form 'package.module:callable' or "
                              f"'path/to/file.py:callable', got {self.arch!r}")
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise ConfigError(f"config key {path}.input_shape must be a non-empty list of positive integers "
                              f"(one sample, no batch dimension), got {list(self.input_shape)!r}")
        for name in self.forward_kwargs:
            if not name.isidentifier():
                raise ConfigError(f"config key {path}.forward_kwargs has the key {name!r}, which is not a "
                                  "Python argument name; use the name of a keyword argument of forward")


@dataclass(frozen=True)
class DataConfig(_Section):
    """``data.calibration`` / ``data.finetune`` / ``data.eval``: one dataset.

    Attributes:
        format: npz, imagefolder, torchvision, idx or synthetic.
        path: file (npz, idx images) or directory (imagefolder, torchvision root); unused by synthetic.
        num_samples: how many samples to use, drawn as a seeded random subset (``seed``) kept in file
            order; null uses all. Fewer available than asked is a warning, none at all an error.
        batch_size: loader batch size.
        mean, std: per-channel normalisation (one value, or one per channel); uint8 data is scaled to
            [0, 1] first.
        labels_path: idx only: the labels file.
        dataset: torchvision only: the class name in ``torchvision.datasets`` (e.g. FashionMNIST).
        train: torchvision only: the training split (true) or the test split (false).
        resize, crop: imagefolder/torchvision only: Resize then CenterCrop sizes in pixels.
        seed: the subset (and synthetic data) seed.
    """

    _path: typing.ClassVar[str] = "data.calibration"

    format: Literal["npz", "imagefolder", "torchvision", "idx", "synthetic"] = "synthetic"
    path: str | None = None
    num_samples: int | None = 1024
    batch_size: int = 64
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    labels_path: str | None = None
    dataset: str | None = None
    train: bool = True
    resize: int | None = None
    crop: int | None = None
    seed: int = 0

    def _check(self, path: str) -> None:
        if self.format != "synthetic" and not self.path:
            raise ConfigError(f"config key {path}.path is required for format {self.format}")
        if self.format == "torchvision" and not self.dataset:
            raise ConfigError(f"config key {path}.dataset is required for format torchvision "
                              "(a class name in torchvision.datasets, e.g. FashionMNIST)")
        for key in ("num_samples", "batch_size", "resize", "crop"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key {path}.{key} must be 1 or more, got {value!r}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError(f"config keys {path}.mean and {path}.std must be given together")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"config key {path}.std must be positive, got {list(self.std)!r}")


@dataclass(frozen=True)
class DataSection(_Section):
    """``data``: calibration is required by ``compress`` (a config without it still loads, so defaults
    and partial configs stay usable from Python); finetune defaults to the calibration data, and
    evaluation without an eval set reports agreement only."""

    _path: typing.ClassVar[str] = "data"

    calibration: DataConfig | None = None
    finetune: DataConfig | None = None
    eval: DataConfig | None = None

    @classmethod
    def _nested_optional(cls) -> dict[str, type]:
        return {"calibration": DataConfig, "finetune": DataConfig, "eval": DataConfig}

    def finetune_data(self) -> DataConfig | None:
        """The fine-tuning data: ``data.finetune`` when set, else the calibration data."""
        return self.finetune if self.finetune is not None else self.calibration


@dataclass(frozen=True)
class PruneConfig(_Section):
    """``prune``: the attributes ``prune.prune_model`` reads (docs/method.md §3, §5, §6).

    Attributes:
        target: exactly one of {flops: f} or {params: f}, the fraction to keep, in (0, 1].
        allocation: dof (widths proportional to degrees of freedom, meeting ``target``), uniform (one
            keep ratio for every unit, found to meet ``target``), loss (widths that minimise the summed
            reconstruction loss, meeting ``target``) or ratio (fixed ``ratio``, no target).
        ratio: keep fraction per unit under ``allocation: ratio``, in (0, 1].
        overrides: module name or "re:regex" -> keep ratio; first match wins.
        ridge: lambda relative to the layer scale (lambda = ridge * Tr(Sigma) / m).
        theta: weight of the output-aware loss, in [0, 1].
        order: sequential or oneshot.
        exclude: module names or "re:" patterns never pruned.
        round_to: kept widths are multiples of this.
        min_channels: no unit keeps fewer.
        max_positions: spatial positions sampled per image for the statistics (null: all).
        dof_rows: the ``dof`` widths need only N(lambda) per unit, so their statistics come from the
            fewest leading calibration batches that give every unit at least this many rows per
            channel (null: every batch). Fewer rows than channels would cap N at the row count.
        dof_min_samples: and from at least this many samples (or all there are).
        seed: seed of the position sampling.
        reconstruct: fold the reconstruction matrix into the consumers (false: plain slicing, an
            ablation that shows what the reconstruction is worth).
        target_signal: what a unit's reconstruction aims at in sequential order: the original
            network's activations (original) or those of the network pruned so far (pruned).
        intercept: also fit a per-channel intercept (the reconstruction becomes affine).
        allow_partial: a result more than 5% above ``target`` is a warning instead of an error.
    """

    _path: typing.ClassVar[str] = "prune"

    target: dict[str, float] = field(default_factory=lambda: {"flops": 0.5})
    allocation: Literal["dof", "uniform", "loss", "ratio"] = "dof"
    ratio: float = 0.5
    overrides: dict[str, float] = field(default_factory=dict)
    ridge: float = 1.0e-3
    theta: float = 0.5
    order: Literal["sequential", "oneshot"] = "sequential"
    exclude: tuple[str, ...] = ()
    round_to: int = 8
    min_channels: int = 8
    max_positions: int | None = 256
    dof_rows: float | None = 1.0
    dof_min_samples: int = 64
    seed: int = 0
    reconstruct: bool = True
    target_signal: Literal["original", "pruned"] = "original"
    intercept: bool = False
    allow_partial: bool = False

    def _check(self, path: str) -> None:
        if len(self.target) != 1 or next(iter(self.target)) not in TARGET_KINDS:
            raise ConfigError(f"config key {path}.target must hold exactly one of flops or params "
                              f"(the fraction to keep), e.g. {{flops: 0.5}}; got {self.target!r}")
        kind, value = next(iter(self.target.items()))
        _in_range(f"{path}.target.{kind}", value, 0.0, 1.0, lo_open=True)
        _in_range(f"{path}.ratio", self.ratio, 0.0, 1.0, lo_open=True)
        for name, r in self.overrides.items():
            _in_range(f"{path}.overrides.{name}", r, 0.0, 1.0, lo_open=True)
        _positive(f"{path}.ridge", self.ridge)
        _in_range(f"{path}.theta", self.theta, 0.0, 1.0)
        if self.dof_rows is not None:
            _positive(f"{path}.dof_rows", self.dof_rows)
        for key in ("round_to", "min_channels", "max_positions", "dof_min_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key {path}.{key} must be 1 or more, got {value!r}")
        _check_patterns(f"{path}.exclude", self.exclude)
        _check_patterns(f"{path}.overrides", list(self.overrides))

    @property
    def target_kind(self) -> str:
        """'flops' or 'params'."""
        return next(iter(self.target))

    @property
    def target_value(self) -> float:
        """The fraction of ``target_kind`` to keep, in (0, 1]."""
        return next(iter(self.target.values()))


@dataclass(frozen=True)
class FinetuneConfig(_Section):
    """``finetune``: short distillation / cross-entropy after surgery (docs/method.md §7); epochs 0 skips it.

    Attributes:
        epochs, max_steps: length (max_steps, when set, stops earlier).
        lr, optimizer, momentum, weight_decay: the optimiser (momentum for sgd only).
        batch_size: null uses the data's batch_size.
        distill, temperature: KL to the original model's softmax at temperature T.
        seed: shuffling seed.
    """

    _path: typing.ClassVar[str] = "finetune"

    epochs: int = 0
    lr: float = 1.0e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int | None = None
    distill: bool = True
    temperature: float = 4.0
    seed: int = 0
    max_steps: int | None = None

    def _check(self, path: str) -> None:
        _positive(f"{path}.epochs", self.epochs, allow_zero=True)
        _positive(f"{path}.lr", self.lr)
        _in_range(f"{path}.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _positive(f"{path}.weight_decay", self.weight_decay, allow_zero=True)
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.temperature", self.temperature)
        _positive(f"{path}.max_steps", self.max_steps)


@dataclass(frozen=True)
class EvaluateConfig(_Section):
    """``evaluate``: before/after comparison (docs/method.md §7).

    Attributes:
        latency: measure CPU latency.
        latency_batch_sizes: batch sizes to time.
        latency_repeats: at most this many timed rounds per batch size (original and pruned alternate).
        latency_seconds: and at most about this many seconds of timing per (model, batch size).
        max_eval_samples: cap on evaluated samples (null: all of data.eval).
        output: which tensor of a tuple / list / dict / namedtuple output is evaluated and distilled:
            an index or a key (null: the first tensor).
        gate_on: which model the quality gates judge: float (the pruned model) or int8 (its int8 ONNX
            export); null: int8 when onnx-int8 is exported, else float.
    """

    _path: typing.ClassVar[str] = "evaluate"

    latency: bool = True
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_repeats: int = 30
    latency_seconds: float = 3.0
    max_eval_samples: int | None = None
    output: int | str | None = None
    gate_on: Literal["float", "int8"] | None = None

    def _check(self, path: str) -> None:
        for i, b in enumerate(self.latency_batch_sizes):
            _positive(f"{path}.latency_batch_sizes[{i}]", b)
        _positive(f"{path}.latency_repeats", self.latency_repeats)
        _positive(f"{path}.latency_seconds", self.latency_seconds)
        _positive(f"{path}.max_eval_samples", self.max_eval_samples)
        if isinstance(self.output, int):
            _positive(f"{path}.output", self.output, allow_zero=True)


@dataclass(frozen=True)
class Int8Config(_Section):
    """``export.int8``: ONNX Runtime static quantization of the pruned model (format onnx-int8).

    Attributes:
        num_samples: calibration samples read for the activation ranges (the first ones).
        method: minmax, entropy or percentile calibration.
        exclude: node or module names (or "re:" patterns) kept in float.
    """

    _path: typing.ClassVar[str] = "export.int8"

    num_samples: int = 256
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    exclude: tuple[str, ...] = ()

    def _check(self, path: str) -> None:
        _positive(f"{path}.num_samples", self.num_samples)
        _check_patterns(f"{path}.exclude", self.exclude)


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    """``runtime``: where and how the run executes.

    Attributes:
        device: auto (CUDA when present, else CPU), cpu or cuda.
        timeout_s: how long a collective operation waits for the other processes under torchrun.
    """

    _path: typing.ClassVar[str] = "runtime"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: float = 1800.0

    def _check(self, path: str) -> None:
        _positive(f"{path}.timeout_s", self.timeout_s)


@dataclass(frozen=True)
class ExportConfig(_Section):
    """``export``: extra files beside model.pt, each verified by loading it back (docs/method.md §7).

    Attributes:
        formats: subset of pt (state_dict + plan), onnx, onnx-int8 (ONNX Runtime static int8),
            torchscript, module (pickled whole module).
        opset: ONNX opset.
        onnx_tolerance: max abs difference between ONNX Runtime and PyTorch outputs.
        int8: settings of the onnx-int8 format.
    """

    _path: typing.ClassVar[str] = "export"

    formats: tuple[Literal["pt", "onnx", "onnx-int8", "torchscript", "module"], ...] = ("pt", "onnx")
    opset: int = 18
    onnx_tolerance: float = 1.0e-4
    int8: Int8Config = field(default_factory=Int8Config)

    def _check(self, path: str) -> None:
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"config key {path}.formats lists a format twice: {list(self.formats)!r}")
        _positive(f"{path}.opset", self.opset)
        _positive(f"{path}.onnx_tolerance", self.onnx_tolerance)


@dataclass(frozen=True)
class Config(_Section):
    """The whole config: model, data, prune, finetune, evaluate, export, runtime."""

    _path: typing.ClassVar[str] = ""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: str | None = None) -> "Config":
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"the config must be a mapping of sections (model, data, prune, finetune, "
                              f"evaluate, export, runtime), got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for key, value in data.items():
            if key not in names:
                raise _unknown_key("", key, names)
            values[key] = typing.get_type_hints(cls)[key].from_dict(value)
        return cls(**values)

    def _check(self, path: str) -> None:
        channels = self.model.input_shape[0]
        for split in ("calibration", "finetune", "eval"):
            d = getattr(self.data, split)
            for key in ("mean", "std"):
                values = None if d is None else getattr(d, key)
                if values is not None and len(values) not in (1, channels):
                    raise ConfigError(f"config key data.{split}.{key} has {len(values)} values but "
                                      f"model.input_shape {list(self.model.input_shape)} has {channels} "
                                      "channels; give one value or one per channel")
        if self.evaluate.gate_on == "int8" and "onnx-int8" not in self.export.formats:
            raise ConfigError("config key evaluate.gate_on is int8 but export.formats does not list onnx-int8; "
                              "add onnx-int8 to export.formats, or set evaluate.gate_on to float or null")


# ---------------------------------------------------------------------------------------------------
# Loading, overrides, dumping
# ---------------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"prune.target.flops=0.3"`` -> (["prune", "target", "flops"], 0.3); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key, e.g. --set prune.target.flops=0.3; "
                          f"got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({_yaml_problem(exc)}); "
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


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return problem


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping in a YAML file (an empty file is an empty mapping).

    Raises:
        ConfigError: unreadable file, malformed YAML, or a top level that is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read config file {path}: {reason}; check the --config path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({_yaml_problem(exc)}); fix the syntax "
                          "there: check the indentation and that every key is followed by ': '") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, prune, ...) "
                          f"at the top level, got {type(data).__name__}; see configs/default.yaml")
    return data


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
