"""The steps ``compress`` and ``analyze`` share before any pruning, each failing early with a message
that says what to fix: the config against what this version can do, the output directory, the checkpoint,
the model's signature and output, the calibration data and the original model on its first batch.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli._version import __version__
from specprune_cli.checkpoint import load_checkpoint
from specprune_cli.config import Config
from specprune_cli.data import Batches, build_batches
from specprune_cli.errors import ConfigError, ModelError, reason, user_code
from specprune_cli.evaluate import check_label_range
from specprune_cli.model_io import ModelCall, check_signature, nonfinite, select
from specprune_cli.outputs import check_output_dir

Log = Callable[[str], None]


def stderr(message: str) -> None:
    print(message, file=sys.stderr)


# Settings the schema accepts whose behaviour this version does not have yet: refused, never ignored.
# (key, is the setting in use?, the value that works today)
_NOT_BUILT: tuple[tuple[str, Callable[[Config], bool], str], ...] = (
    ("runtime.device: cuda", lambda c: c.runtime.device == "cuda", "auto or cpu"),
)


def refuse_unbuilt(config: Config) -> None:
    """Refuse a setting this version accepts in the config but cannot honour yet.

    Raises:
        ConfigError: naming the setting and what works instead.
    """
    for key, used, instead in _NOT_BUILT:
        if used(config):
            raise ConfigError(f"{key} is not available in specprune {__version__} yet; use {instead}")


def resolve_device(config: Config) -> str:
    """``runtime.device`` as the run uses it: "cpu" or "cuda".

    auto runs on the CPU in this version: the GPU path (cuda) is not built yet, and auto must not
    pick it on a machine that has a GPU.

    Raises:
        ConfigError: cuda asked for where torch sees no CUDA device, or (with one) not built yet.
    """
    if config.runtime.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device is cuda but torch sees no CUDA device on this machine "
                          "(torch.cuda.is_available() is false); use --device cpu, or auto")
    refuse_unbuilt(config)
    return "cpu"


@dataclass
class Prepared:
    """What both commands start from.

    Attributes:
        model: the original model, loaded and checked.
        call: how it is called (forward keyword arguments, the evaluated output).
        example: a batch of one sample of ``model.input_shape`` (zeros, of the calibration data's dtype).
        output: the model's output on ``example``.
        calibration: the calibration batches.
    """

    model: nn.Module
    call: ModelCall
    example: torch.Tensor
    output: Any
    calibration: Batches


def first_output(model: nn.Module, example: torch.Tensor, call: ModelCall) -> Any:
    """The model's output on ``example`` (a batch of zeros), checked to hold the evaluated tensor.

    Raises:
        ModelError: the forward pass fails (the model's exception is quoted; ``sys.exit`` in it too),
            or returns no tensor.
        ConfigError: ``evaluate.output`` names no tensor of the output.
    """
    shape = list(example.shape[1:])

    def failed(exc: BaseException) -> ModelError:
        if _takes_integers(model, example, call):
            return ModelError(
                f"the model takes integer inputs (token ids or indices): a forward pass on float zeros of "
                f"shape {tuple(example.shape)} failed ({reason(exc)}) and one on int64 zeros ran. Give "
                "calibration data as integer arrays (an npz or idx file of int64 or int32); synthetic data "
                "is float")
        return ModelError(
            f"model.input_shape {shape} does not fit the model: a forward pass on zeros of shape "
            f"{tuple(example.shape)} failed ({reason(exc)}); set model.input_shape to the shape of one "
            "sample the model was trained on (channels first, without the batch dimension)")

    with torch.no_grad(), user_code(failed):
        out = call(model, example)
    select(out, call.output)
    return out


def _takes_integers(model: nn.Module, example: torch.Tensor, call: ModelCall) -> bool:
    """Whether a float ``example`` that failed runs as int64 zeros (an Embedding's token ids)."""
    if not example.is_floating_point():
        return False
    try:
        with torch.no_grad():
            call(model, torch.zeros_like(example, dtype=torch.int64))
    except Exception:  # noqa: BLE001 - any failure: the input's dtype was not the trouble
        return False
    return True


def classes_of(output: Any, call: ModelCall) -> int | None:
    """The number of classes, when the evaluated output is (batch, classes) logits."""
    t = select(output, call.output)
    return int(t.shape[1]) if t.dim() == 2 else None


def prepare(config: Config, checkpoint_path: str | os.PathLike, *, trust_checkpoint: bool = False,
            output_dir: Path | None = None, overwrite: bool = False, log: Log = stderr) -> Prepared:
    """The steps ``compress`` and ``analyze`` share, each failing early with a message that says what to fix.

    Checks the config against what this version can do and the output directory, loads the checkpoint,
    checks the model's signature (one input tensor) and output on zeros of ``model.input_shape``, reads
    the calibration data and runs its first batch through the original model.

    Raises:
        ConfigError, CheckpointError, ModelError, DataError: see the message.
    """
    refuse_unbuilt(config)
    if config.data.calibration is None:
        raise ConfigError("data.calibration is not set; specprune needs calibration data to measure the "
                          "layers: set data.calibration.format (npz, imagefolder, torchvision, idx or "
                          "synthetic) and data.calibration.path")
    if output_dir is not None:
        paths = [config.data.calibration.path, config.data.calibration.labels_path]
        check_output_dir(output_dir, overwrite, [Path(checkpoint_path)] + [Path(p) for p in paths if p])
    input_shape = tuple(config.model.input_shape)
    log(f"loading checkpoint {checkpoint_path}")
    model = load_checkpoint(checkpoint_path, arch=config.model.arch, kwargs=config.model.kwargs,
                            trust=trust_checkpoint, key=config.model.checkpoint_key)
    call = ModelCall(dict(config.model.forward_kwargs), config.evaluate.output)
    check_signature(model, call.forward_kwargs)
    calibration = build_batches(config.data.calibration, input_shape, where="calibration", log=log)
    first = next(iter(calibration))[0]
    example = torch.zeros(1, *input_shape, dtype=first.dtype)  # int64 for token ids (token 0)
    output = first_output(model, example, call)
    check_label_range(calibration.max_label, classes_of(output, call), "data.calibration")
    with torch.no_grad(), user_code(lambda exc: ModelError(
            f"the model fails on the first calibration batch ({reason(exc)}); it ran on zeros of "
            f"model.input_shape {list(input_shape)}, so check the data's shape and values")):
        out = call(model, first)
    where = nonfinite(out)
    if where:
        raise ModelError(f"the original model already produces NaN or Inf on the first calibration batch "
                         f"({where}), before any pruning; fix the model or the data (check "
                         "data.calibration.mean and std) first")
    return Prepared(model=model, call=call, example=example, output=output, calibration=calibration)
