"""Applying a selection to the modules: a physically smaller network of the same classes (SPEC §4).

Modules are changed in place (their parameters replaced by smaller ones and their size attributes
updated), so the user's model object, its class and its module names stay what they were, and a
GraphModule traced from it sees the same change.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from specprune_cli.errors import CheckpointError, ModelError
from specprune_cli.graph import Unit, find_units
from specprune_cli.plan import PLAN_FORMAT


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


def apply_plan_shapes(model: nn.Module, plan: Mapping, example_input: torch.Tensor) -> nn.Module:
    """Resize a fresh instance of the original architecture to a plan's widths, in place.

    The values are placeholders (plain slicing); load the pruned state_dict afterwards.

    Raises:
        CheckpointError: the plan does not fit this architecture.
    """
    if plan.get("format") != PLAN_FORMAT:
        raise CheckpointError(f"the plan has format {plan.get('format')!r}, expected {PLAN_FORMAT!r}; "
                              "the file was not written by this version of specprune")
    graph = find_units(model, example_input)
    by_name = {u.name: u for u in graph.units}
    missing = [e["name"] for e in plan["units"] if e["name"] not in by_name]
    if missing:
        raise CheckpointError(f"the plan names units this architecture does not have: {missing[:5]}; "
                              "check model.arch and model.kwargs match the model that was pruned")
    for entry in plan["units"]:
        unit = by_name[entry["name"]]
        if unit.width != entry["width"]:
            raise CheckpointError(f"unit {unit.name} has {unit.width} channels here but {entry['width']} "
                                  "in the plan; check model.kwargs")
        keep = torch.tensor(entry["indices"], dtype=torch.long)
        prune_unit(model, unit, keep, {t: selection_matrix(unit.width, keep) for t in unit.taps})
    return model


def verify_forward(model: nn.Module, example_input: torch.Tensor, expected_shape: torch.Size) -> None:
    """Run the pruned model once; its output must be finite and shaped like the original's."""
    with torch.no_grad():
        try:
            out = model(example_input)
        except RuntimeError as exc:
            raise ModelError(f"the pruned model failed its check forward pass ({exc}); this is a bug in "
                             "specprune's surgery: please report it with the model architecture") from exc
    if not isinstance(out, torch.Tensor) or out.shape != expected_shape:
        raise ModelError(f"the pruned model returns {getattr(out, 'shape', type(out))}, expected "
                         f"{tuple(expected_shape)}; this is a bug in specprune's surgery")
    if not torch.isfinite(out).all():
        raise ModelError("the pruned model produces NaN/Inf on the example input; try a larger prune.ridge")
