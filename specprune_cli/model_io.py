"""What goes into the user's model and what comes out: one input tensor, any nest of output tensors.

specprune calls a model with one tensor of shape (batch, *model.input_shape) and the configured
``model.forward_kwargs``. Its output may be a tensor or a tuple, list, dict, namedtuple or dataclass
(a model output class) of them
(nested, with non-tensor leaves such as None allowed). Each tensor has a name, used for ONNX outputs
and in messages: ``output`` for a lone tensor, the key or field name in a dict, namedtuple or dataclass,
``output_<i>`` in a tuple or list, joined with "." when nested. Evaluation and distillation read one
tensor of it: ``evaluate.output`` (an index or a key) or, by default, the first.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specprune_cli.errors import ConfigError, ModelError


def _is_namedtuple(out: Any) -> bool:
    return isinstance(out, tuple) and hasattr(out, "_fields")


def _named_items(out: Any) -> list[tuple[Any, Any]] | None:
    """(key, value) of a dict, a namedtuple or a dataclass instance (a model's output class); None for
    anything else."""
    if isinstance(out, Mapping):
        return list(out.items())
    if _is_namedtuple(out):
        return list(zip(out._fields, out))
    if _is_dataclass(out):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    return None


def _is_dataclass(out: Any) -> bool:
    return dataclasses.is_dataclass(out) and not isinstance(out, type)


def with_tensors(template: Any, flat: Iterator[torch.Tensor]) -> Any:
    """``template``'s structure with its tensors replaced by ``flat``'s, in ``named_tensors`` order (an
    exported file's outputs put back into the torch model's output structure)."""
    if isinstance(template, torch.Tensor):
        return next(flat)
    if isinstance(template, Mapping):
        return {k: with_tensors(v, flat) for k, v in template.items()}
    if _is_namedtuple(template):
        return type(template)(*(with_tensors(v, flat) for v in template))
    if isinstance(template, (tuple, list)):
        return type(template)(with_tensors(v, flat) for v in template)
    if _is_dataclass(template):  # a model output class, frozen or not
        out = copy.copy(template)
        for f in dataclasses.fields(template):
            object.__setattr__(out, f.name, with_tensors(getattr(template, f.name), flat))
        return out
    return template  # not a tensor, and holds none (named_tensors reads no deeper)


def named_tensors(out: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``out`` with its name, depth first in the output's own order."""
    if isinstance(out, torch.Tensor):
        yield (prefix or "output"), out
    elif (items := _named_items(out)) is not None:
        for key, value in items:
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            yield from named_tensors(value, f"{prefix}_{i}" if prefix else f"output_{i}")


def tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of ``out``, in ``named_tensors`` order."""
    return [t for _, t in named_tensors(out)]


def describe(out: Any) -> str:
    """A short description for messages: ``tensor (2, 10)``, ``dict {logits: tensor (2, 10), ...}``."""
    if isinstance(out, torch.Tensor):
        return f"tensor {tuple(out.shape)}"
    if (items := _named_items(out)) is not None:
        return f"{type(out).__name__} {{" + ", ".join(f"{k}: {describe(v)}" for k, v in items) + "}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} (" + ", ".join(describe(v) for v in out) + ")"
    return type(out).__name__


def layout(out: Any) -> Any:
    """The structure of ``out`` with each tensor replaced by its shape: equal layouts, same structure."""
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape))
    if (items := _named_items(out)) is not None:
        return (type(out).__name__, tuple((k, layout(v)) for k, v in items))
    if isinstance(out, (tuple, list)):
        return (type(out).__name__, tuple(layout(v) for v in out))
    return (type(out).__name__,)


def select(out: Any, which: int | str | None) -> torch.Tensor:
    """The tensor that evaluation and distillation read.

    Args:
        out: the model's output.
        which: None (the first tensor), an index into a tuple / list / namedtuple / dataclass, or a dict
            key or a namedtuple or dataclass field (``evaluate.output``).

    Raises:
        ModelError: the output holds no tensor, or ``which`` does not name a tensor in it.
    """
    if which is None:
        for _, t in named_tensors(out):
            return t
        raise ModelError(f"the model returns {describe(out)}, which holds no tensor; specprune needs a "
                         "forward that returns a tensor, or a tuple/list/dict of them")
    if isinstance(out, torch.Tensor):
        raise ConfigError(f"evaluate.output is {which!r} but the model returns a single tensor; remove "
                          "evaluate.output (it picks one tensor of a tuple, list or dict output)")
    items = _named_items(out)
    if items is not None:
        keys = [k for k, _ in items]
        if isinstance(which, int) and not isinstance(out, Mapping) and which < len(keys):
            which = keys[which]  # a namedtuple's or dataclass's field by position
        value = dict(items).get(which) if which in keys else None
        valid = ", ".join(str(k) for k in keys)
    elif isinstance(out, (tuple, list)):
        value = out[which] if isinstance(which, int) and which < len(out) else None
        valid = f"an index from 0 to {len(out) - 1}"
    else:
        value, valid = None, "nothing: the output is not a tuple, list or dict"
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"evaluate.output is {which!r} but the model returns {describe(out)}; set "
                          f"evaluate.output to the tensor to evaluate: {valid}")
    return value


def check_same_layout(got: Any, want: Any, what: str) -> None:
    """A ModelError unless ``got`` has the structure and tensor shapes of ``want``."""
    if layout(got) != layout(want):
        raise ModelError(f"{what} returns {describe(got)}, expected {describe(want)}")


def nonfinite(out: Any) -> str | None:
    """Where ``out`` holds NaN or Inf, as "12 of 40 values of output logits" (None when all are finite)."""
    for name, t in named_tensors(out):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int(t.numel() - torch.isfinite(t).sum())
            return f"{bad} of {t.numel()} values" + ("" if name == "output" else f" of output {name}")
    return None


def check_signature(model: nn.Module, forward_kwargs: Mapping[str, Any]) -> None:
    """The model's forward must take one tensor plus ``forward_kwargs``.

    Raises:
        ModelError: forward needs more than one tensor argument (several inputs are not supported).
        ConfigError: ``forward_kwargs`` names an argument forward does not take.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C-level forward: nothing to check
        return
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in forward_kwargs if k not in names and not var_kw]
    if unknown:
        raise ConfigError(f"model.forward_kwargs names {', '.join(unknown)}, which {type(model).__name__}."
                          f"forward does not take (it takes {', '.join(names) or 'no named arguments'})")
    required = [p.name for p in params if p.default is p.empty and p.name not in forward_kwargs
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(required) > 1:
        raise ModelError(f"{type(model).__name__}.forward needs {len(required)} arguments "
                         f"({', '.join(required)}); specprune calls it with one input tensor. Several input "
                         "tensors are not supported: wrap the model in a module whose forward takes one "
                         "tensor, or give the others fixed values in model.forward_kwargs")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode while the block runs; each gets its own mode back after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@dataclass(frozen=True)
class ModelCall:
    """How specprune calls a model: the fixed keyword arguments, and which output tensor it evaluates.

    Attributes:
        forward_kwargs: ``model.forward_kwargs``, passed to every call.
        output: ``evaluate.output``: see :func:`select`.
    """

    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)
    output: int | str | None = None

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Any:
        """The model's whole output on ``x``."""
        return model(x, **self.forward_kwargs)

    def evaluated(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The output tensor that evaluation and distillation read."""
        return select(self(model, x), self.output)

    def bound(self, model: nn.Module) -> nn.Module:
        """``model`` with ``forward_kwargs`` fixed: a module called with the input alone (for exporters)."""
        return _Bound(model, dict(self.forward_kwargs)) if self.forward_kwargs else model


class _Bound(nn.Module):
    """A model with its forward keyword arguments fixed."""

    def __init__(self, model: nn.Module, forward_kwargs: dict[str, Any]):
        super().__init__()
        self.model, self.forward_kwargs = model, forward_kwargs

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x, **self.forward_kwargs)


def random_batch(example: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random inputs shaped like ``example`` at ``batch_size``: normal values for floating inputs; for
    integer inputs (token ids) values drawn from the example's own range, so an embedding sees valid
    indices; random flags for bool inputs."""
    shape = (batch_size, *example.shape[1:])
    if example.is_floating_point() or example.is_complex():
        x = torch.randn(shape, generator=generator, dtype=example.dtype)
    elif example.dtype == torch.bool:
        x = torch.rand(shape, generator=generator) < 0.5
    else:
        lo, hi = (int(example.min()), int(example.max())) if example.numel() else (0, 0)
        x = torch.randint(lo, hi + 1, shape, generator=generator, dtype=example.dtype)
    return x.to(example.device)
