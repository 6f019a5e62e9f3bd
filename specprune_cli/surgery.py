"""Applying a selection to the modules: a physically smaller network of the same classes (SPEC §4).

Modules are changed in place (their parameters replaced by smaller ones and their size attributes
updated), so the user's model object, its class and its module names stay what they were, and a
GraphModule traced from it sees the same change.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from specprune_cli.errors import ModelError
from specprune_cli.graph import Unit
from specprune_cli.model_io import check_same_layout, describe, nonfinite


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.to(like.dtype).contiguous(), requires_grad=like.requires_grad)


def _slice_rows(mod: nn.Module, keep: torch.Tensor) -> None:
    """Keep output channels ``keep`` of a Conv2d / Linear (weight rows and bias)."""
    mod.weight = _param(mod.weight.detach()[keep], mod.weight)
    if getattr(mod, "bias", None) is not None:
        mod.bias = _param(mod.bias.detach()[keep], mod.bias)
    if isinstance(mod, nn.Conv2d):
        mod.out_channels = int(keep.numel())
    else:
        mod.out_features = int(keep.numel())


def _slice_follower(mod: nn.Module, role: str, keep: torch.Tensor) -> None:
    k = int(keep.numel())
    if role == "rows":
        _slice_rows(mod, keep)
    elif role == "depthwise":
        _slice_rows(mod, keep)
        mod.in_channels = mod.groups = k
    elif role == "batchnorm":
        if mod.weight is not None:
            mod.weight = _param(mod.weight.detach()[keep], mod.weight)
            mod.bias = _param(mod.bias.detach()[keep], mod.bias)
        if mod.running_mean is not None:
            mod.running_mean = mod.running_mean[keep].clone()
            mod.running_var = mod.running_var[keep].clone()
        mod.num_features = k
    elif role == "prelu":
        mod.weight = _param(mod.weight.detach()[keep], mod.weight)
        mod.num_parameters = k
    else:
        raise ValueError(f"unknown follower role {role!r}")


def _fold_consumer(mod: nn.Module, kind: str, spatial: int, a: torch.Tensor) -> None:
    """W' = W A: the consumer reads the kept channels and reconstructs the dropped ones."""
    w = mod.weight.detach().to(torch.float64)
    a = a.to(torch.float64)
    k = a.shape[1]
    if kind == "conv":
        new = torch.einsum("oihw,ik->okhw", w, a)
        mod.in_channels = k
    elif spatial > 1:  # Linear after flatten: the same fold for each spatial position
        new = torch.einsum("ois,ik->oks", w.reshape(w.shape[0], -1, spatial), a).reshape(w.shape[0], k * spatial)
        mod.in_features = k * spatial
    else:
        new = w @ a
        mod.in_features = k
    mod.weight = _param(new, mod.weight)


def prune_unit(model: nn.Module, unit: Unit, keep: torch.Tensor, a_by_tap: Mapping[str, torch.Tensor]) -> None:
    """Remove all channels of ``unit`` but ``keep`` and fold the reconstructions into its consumers.

    Args:
        model: the network (the one ``unit`` was found in, or a GraphModule sharing its modules).
        unit: the unit.
        keep: sorted kept channel indices.
        a_by_tap: tap node name -> reconstruction matrix A (m x k) for the consumers at that tap.
    """
    keep = keep.to(torch.long)
    _slice_rows(model.get_submodule(unit.name), keep)
    for f in unit.followers:
        _slice_follower(model.get_submodule(f.module), f.role, keep)
    for c in unit.consumers:
        _fold_consumer(model.get_submodule(c.module), c.kind, c.spatial, a_by_tap[c.tap])


def selection_matrix(m: int, keep: torch.Tensor) -> torch.Tensor:
    """A = I[:, keep]: plain slicing of the consumers' inputs (no reconstruction)."""
    return torch.eye(m, dtype=torch.float64)[:, keep.to(torch.long)]


def verify_forward(model: nn.Module, example_input: torch.Tensor, expected: Any,
                   forward_kwargs: Mapping[str, Any] | None = None) -> None:
    """Run the pruned model once; its output must be finite and shaped like the original's.

    Args:
        model: the pruned model.
        example_input: one batch.
        expected: the original's output shape (a single tensor), or its whole output on the same batch
            (a tensor or a tuple / list / dict of them: the structure and every tensor's shape must match).
        forward_kwargs: ``model.forward_kwargs``.
    """
    with torch.no_grad():
        try:
            out = model(example_input, **(forward_kwargs or {}))
        except RuntimeError as exc:
            raise ModelError(f"the pruned model failed its check forward pass ({exc}); this is a bug in "
                             "specprune's surgery: please report it with the model architecture") from exc
    if isinstance(expected, torch.Size):
        if not isinstance(out, torch.Tensor) or out.shape != expected:
            raise ModelError(f"the pruned model returns {describe(out)}, expected a tensor "
                             f"{tuple(expected)}; this is a bug in specprune's surgery")
    else:
        try:
            check_same_layout(out, expected, "the pruned model")
        except ModelError as exc:
            raise ModelError(f"{exc}; this is a bug in specprune's surgery") from None
    if nonfinite(out):
        raise ModelError("the pruned model produces NaN/Inf on the example input; try a larger prune.ridge")
