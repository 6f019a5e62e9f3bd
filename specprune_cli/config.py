"""The YAML config as frozen, validated dataclasses (a contract: the README documents these keys).

Precedence is fixed: dataclass defaults < the YAML file < ``--set KEY=VALUE`` overrides.
Every section validates on construction, so a ``Config`` that exists is a usable one; ``to_dict()``
round-trips through ``from_dict()``. Mappings (``model.kwargs``, ``prune.target``, ``prune.overrides``)
are stored as plain dicts: the dataclasses are frozen against rebinding, and ``to_dict`` copies.

The input sections (``model``, ``data``) are in ``config_inputs.py``; this module holds what the run
does with them (prune, finetune, evaluate, export, runtime) and the whole ``Config``. Every section is
importable from here.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from specprune_cli.coerce import Section, in_range, positive
from specprune_cli.config_inputs import DataConfig, DataSection, ModelConfig
from specprune_cli.errors import ConfigError
from specprune_cli.name_patterns import check_patterns

__all__ = ["Config", "DataConfig", "DataSection", "EvaluateConfig", "ExportConfig", "FinetuneConfig",
           "Int8Config", "ModelConfig", "PruneConfig", "RuntimeConfig", "TARGET_KINDS"]

TARGET_KINDS = ("flops", "params")


@dataclass(frozen=True)
class PruneConfig(Section):
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
        kernel_refit: in sequential order, refit each k x k convolution reading a pruned unit by least
            squares over its patches instead of folding W A (docs/method.md §4).
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
    kernel_refit: bool = True
    allow_partial: bool = False

    def _check(self, path: str) -> None:
        if len(self.target) != 1 or next(iter(self.target)) not in TARGET_KINDS:
            raise ConfigError(f"config key {path}.target must hold exactly one of flops or params "
                              f"(the fraction to keep), e.g. {{flops: 0.5}}; got {self.target!r}")
        kind, value = next(iter(self.target.items()))
        in_range(f"{path}.target.{kind}", value, 0.0, 1.0, lo_open=True)
        in_range(f"{path}.ratio", self.ratio, 0.0, 1.0, lo_open=True)
        for name, r in self.overrides.items():
            in_range(f"{path}.overrides.{name}", r, 0.0, 1.0, lo_open=True)
        positive(f"{path}.ridge", self.ridge)
        in_range(f"{path}.theta", self.theta, 0.0, 1.0)
        if self.dof_rows is not None:
            positive(f"{path}.dof_rows", self.dof_rows)
        for key in ("round_to", "min_channels", "max_positions", "dof_min_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key {path}.{key} must be 1 or more, got {value!r}")
        check_patterns(f"{path}.exclude", self.exclude)
        check_patterns(f"{path}.overrides", list(self.overrides))

    @property
    def target_kind(self) -> str:
        """'flops' or 'params'."""
        return next(iter(self.target))

    @property
    def target_value(self) -> float:
        """The fraction of ``target_kind`` to keep, in (0, 1]."""
        return next(iter(self.target.values()))


@dataclass(frozen=True)
class FinetuneConfig(Section):
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
        positive(f"{path}.epochs", self.epochs, allow_zero=True)
        positive(f"{path}.lr", self.lr)
        in_range(f"{path}.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        positive(f"{path}.weight_decay", self.weight_decay, allow_zero=True)
        positive(f"{path}.batch_size", self.batch_size)
        positive(f"{path}.temperature", self.temperature)
        positive(f"{path}.max_steps", self.max_steps)


@dataclass(frozen=True)
class EvaluateConfig(Section):
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
            positive(f"{path}.latency_batch_sizes[{i}]", b)
        positive(f"{path}.latency_repeats", self.latency_repeats)
        positive(f"{path}.latency_seconds", self.latency_seconds)
        positive(f"{path}.max_eval_samples", self.max_eval_samples)
        if isinstance(self.output, int):
            positive(f"{path}.output", self.output, allow_zero=True)


@dataclass(frozen=True)
class Int8Config(Section):
    """``export.int8``: ONNX Runtime static quantization of the pruned model (format onnx-int8).

    Attributes:
        num_samples: calibration samples read for the activation ranges (the first ones).
        method: minmax, entropy or percentile calibration.
        exclude: node or module names (or "re:" patterns) kept in float.
        activations: uint8 or int8 activations (weights are int8 either way). uint8 is what ONNX
            Runtime's x86 kernels fuse everywhere; int8 (S8S8) leaves a Conv whose ReLU was folded in as
            float Conv between Q/DQ pairs on x86, which can be slower than float32.
    """

    _path: typing.ClassVar[str] = "export.int8"

    num_samples: int = 256
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    exclude: tuple[str, ...] = ()
    activations: Literal["uint8", "int8"] = "uint8"

    def _check(self, path: str) -> None:
        positive(f"{path}.num_samples", self.num_samples)
        check_patterns(f"{path}.exclude", self.exclude)


@dataclass(frozen=True)
class RuntimeConfig(Section):
    """``runtime``: where and how the run executes.

    Attributes:
        device: auto, cpu or cuda; this version runs on the CPU (auto is the CPU, cuda is refused).
        timeout_s: how long a collective operation waits for the other processes under torchrun.
    """

    _path: typing.ClassVar[str] = "runtime"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: float = 1800.0

    def _check(self, path: str) -> None:
        positive(f"{path}.timeout_s", self.timeout_s)


@dataclass(frozen=True)
class ExportConfig(Section):
    """``export``: extra files beside model.pt, each verified by loading it back (docs/method.md §7).

    Attributes:
        formats: subset of pt (state_dict + plan), onnx, onnx-int8 (ONNX Runtime static int8 of the
            onnx file, so it needs onnx too), torchscript, module (pickled whole module).
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
        if "onnx-int8" in self.formats and "onnx" not in self.formats:
            raise ConfigError(f"config key {path}.formats lists onnx-int8 without onnx; the int8 model is "
                              "quantized from model.onnx, so add onnx to export.formats")
        positive(f"{path}.opset", self.opset)
        positive(f"{path}.onnx_tolerance", self.onnx_tolerance)


@dataclass(frozen=True)
class Config(Section):
    """The whole config: model, data, prune, finetune, evaluate, export, runtime."""

    _path: typing.ClassVar[str] = ""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

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
            raise ConfigError("config key evaluate.gate_on is int8 but export.formats does not list "
                              "onnx-int8; add onnx-int8 to export.formats, or set evaluate.gate_on to float "
                              "or null")
