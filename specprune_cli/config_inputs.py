"""The input side of the config: the model to build (``model``) and the datasets it is fed (``data``).

These sections say what goes into a run; ``config.py`` holds what the run does with it (prune,
finetune, evaluate, export, runtime) and the whole ``Config``, which also checks the two sides against
each other (``data.*.mean``/``std`` against the channels of ``model.input_shape``).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from specprune_cli.coerce import Section
from specprune_cli.errors import ConfigError

DATA_FORMATS = ("npz", "imagefolder", "torchvision", "idx", "synthetic")
# Optional data settings and the formats that read them.
_FORMAT_ONLY = {"path": ("npz", "imagefolder", "torchvision", "idx"), "labels_path": ("idx",),
                "dataset": ("torchvision",), "resize": ("imagefolder", "torchvision"),
                "crop": ("imagefolder", "torchvision")}


@dataclass(frozen=True)
class ModelConfig(Section):
    """``model``: how to build the architecture the checkpoint belongs to.

    Attributes:
        arch: "package.module:callable" or "path/to/file.py:callable" (a path relative to the working
            directory); may be null only for a trusted checkpoint that pickles the whole module.
        kwargs: keyword arguments for the callable.
        input_shape: one sample's shape without the batch dimension, e.g. [3, 32, 32], [40, 100] or [784].
        forward_kwargs: non-tensor keyword arguments every call of the model's forward gets (e.g.
            {embed: false}), in checks, pruning, evaluation, fine-tuning and export alike.
        checkpoint_key: where the weights are in a checkpoint dict that holds several (e.g. ema, or
            state.model for nested dicts); null finds them (see ``checkpoint.load_checkpoint``).
    """

    _path: typing.ClassVar[str] = "model"

    arch: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (3, 32, 32)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_key: str | None = None

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
class DataConfig(Section):
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
        # A setting the format does not read would be silently ignored: refuse it instead.
        for key in _FORMAT_ONLY:
            if getattr(self, key) is not None and self.format not in _FORMAT_ONLY[key]:
                raise ConfigError(f"config key {path}.{key} is not used by format {self.format} (only by "
                                  f"{' and '.join(_FORMAT_ONLY[key])}); remove it, or change the format")
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
class DataSection(Section):
    """``data``: calibration is required by ``compress`` (a config without it still loads, so defaults
    and partial configs stay usable from Python); finetune defaults to the calibration data, and
    evaluation without an eval set reports agreement only."""

    _path: typing.ClassVar[str] = "data"

    calibration: DataConfig | None = None
    finetune: DataConfig | None = None
    eval: DataConfig | None = None

    def finetune_data(self) -> DataConfig | None:
        """The fine-tuning data: ``data.finetune`` when set, else the calibration data."""
        return self.finetune if self.finetune is not None else self.calibration
