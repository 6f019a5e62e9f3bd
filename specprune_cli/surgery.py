"""Applying a selection to the modules: a physically smaller network of the same classes (docs/method.md §4).

Modules are changed in place (their parameters replaced by smaller ones and their size attributes
updated), so the user's model object, its class and its module names stay what they were, and a
GraphModule traced from it sees the same change.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from specprune_cli.errors import ModelError
from specprune_cli.graph import Unit
from specprune_cli.followers import slice_follower
from specprune_cli.layer_kind import LAYER_KINDS_BY_NAME
from specprune_cli.layers import require_layer_kind
from specprune_cli.model_io import check_same_layout, describe, nonfinite


def _local(keep: torch.Tensor, offset: int, width: int) -> torch.Tensor:
    """The kept unit channels that fall in ``[offset, offset + width)``, as indices into that range."""
    inside = keep[(keep >= offset) & (keep < offset + width)]
    return inside - offset


def prune_unit(model: nn.Module, unit: Unit, keep: torch.Tensor,
               a_by_tap: Mapping[str, torch.Tensor]) -> None:
    """Remove all channels of ``unit`` but ``keep`` and fold the reconstructions into its consumers.

    Every producer loses the rows of the dropped channels, every follower the matching parameters,
    every consumer's weight becomes W A (docs/method.md §4), and the int attributes that size the
    channels in a reshape are set to the new width.

    Args:
        model: the network (the one ``unit`` was found in, or a GraphModule sharing its modules).
        unit: the unit.
        keep: sorted kept channel indices.
        a_by_tap: tap node name -> reconstruction matrix A (m x k) for the consumers at that tap.
    """
    keep = keep.to(torch.long)
    for p in unit.producers:
        mod = model.get_submodule(p.module)
        kind = require_layer_kind(mod)
        kind.slice_out(mod, _local(keep, p.offset, kind.out_channels(mod)))
    for f in unit.followers:
        slice_follower(model.get_submodule(f.module), f, _local(keep, f.offset, f.width or unit.width))
    for c in unit.consumers:
        LAYER_KINDS_BY_NAME[c.kind].fold(model.get_submodule(c.module), c, a_by_tap[c.tap], keep)
    for s in unit.shape_attrs:
        holder = model.get_submodule(s.module)
        size = s.per_channel * int(keep.numel())
        if s.index is None:
            setattr(holder, s.attr, size)
        else:
            sizes = list(getattr(holder, s.attr))
            sizes[s.index] = size
            setattr(holder, s.attr, tuple(sizes))


def selection_matrix(m: int, keep: torch.Tensor) -> torch.Tensor:
    """A = I[:, keep]: plain slicing of the consumers' inputs (no reconstruction)."""
    return torch.eye(m, dtype=torch.float64)[:, keep.to(torch.long)]


def verify_forward(model: nn.Module, example_input: torch.Tensor, expected: Any,
                   forward_kwargs: Mapping[str, Any] | None = None, units: Sequence[Unit] = ()) -> None:
    """Run the pruned model once; its output must be finite and shaped like the original's.

    Args:
        model: the pruned network.
        example_input: one batch it accepts.
        expected: the original's output shape (a single tensor), or its whole output on the same batch
            (a tensor or a tuple / list / dict of them: the structure and every tensor's shape must match).
        forward_kwargs: ``model.forward_kwargs``.
        units: the pruned units; a failure inside one of their layers names the unit.

    Raises:
        ModelError: the forward pass fails, or gives another structure or shape, or non-finite values.
    """
    entered: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, name=name: entered.append(name))
               for name, m in model.named_modules()
               if name and not isinstance(m, torch.jit.ScriptModule)]  # scripted modules take no hooks
    try:
        with torch.no_grad():
            out = model(example_input, **(forward_kwargs or {}))
    except RuntimeError as exc:
        where = _where_failed(entered[-1] if entered else None, units)
        raise ModelError(f"the pruned model failed its check forward pass{where} ({exc}); this is a bug in "
                         "specprune's surgery: please report it with the model architecture") from exc
    finally:
        for h in handles:
            h.remove()
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


def _where_failed(module: str | None, units: Sequence[Unit]) -> str:
    if module is None:
        return ""
    for u in units:
        names = {p.module for p in u.producers} | {f.module for f in u.followers}
        names |= {c.module for c in u.consumers}
        if module in names:
            return f" in {module} (unit {u.name})"
    return f" in {module}"


def absorb_bias(model: nn.Module, consumer: Any, b: torch.Tensor) -> torch.Tensor:
    """The consumer's output shift W b for a constant input b per channel (docs/method.md §4).

    Computed from the weight before the fold: with x ~= A x~_J + b the consumer gives W' x~_J + W b.
    For a convolution this is exact away from zero padding (a padded border sees part of the constant).

    Returns:
        The shift, (out features or out channels,), in the weight's dtype.
    """
    mod = model.get_submodule(consumer.module)
    w = mod.weight.detach().to(torch.float64)
    if consumer.kind == "linear":
        m = b.numel()
        if consumer.columns is not None:
            cols = torch.zeros(w.shape[1], dtype=torch.float64)
            cols[consumer.columns.reshape(-1)] = b.repeat_interleave(consumer.columns.shape[1])
        else:
            cols = b.repeat_interleave(w.shape[1] // m)
        shift = w @ cols
    else:
        shift = w.sum(dim=tuple(range(2, w.dim()))) @ b
    return shift.to(mod.weight.dtype)


def bias_sinks(gm: Any, model: nn.Module, units: Sequence[Unit]) -> dict[str, dict[str, Any]]:
    """Units whose intercept can be absorbed exactly, and for each consumer the function that adds
    its output shift: the consumer's own bias, or the running mean of a BatchNorm that alone reads
    the consumer's output (BN(z + s) with mean mu equals BN(z) with mean mu - s).

    A unit with a consumer that has neither, or a consumer that is not a Linear or an ungrouped
    convolution, fits no intercept.
    """
    readers: dict[str, list[Any]] = {}
    if gm is not None:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                readers[str(node.target)] = list(node.users)
    out: dict[str, dict[str, Any]] = {}
    for u in units:
        sinks: dict[str, Any] = {}
        for c in u.consumers:
            mod = model.get_submodule(c.module)
            if c.kind not in ("linear", "conv") or getattr(mod, "groups", 1) != 1 or c.block is not None:
                break
            if getattr(mod, "bias", None) is not None:
                sinks[c.module] = lambda s, mod=mod: mod.bias.data.add_(s.to(mod.bias.dtype))
                continue
            users = readers.get(c.module, [])
            bn = (gm.get_submodule(str(users[0].target)) if len(users) == 1 and users[0].op == "call_module"
                  else None)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
                break
            sinks[c.module] = lambda s, bn=bn: bn.running_mean.sub_(s.to(bn.running_mean.dtype))
        else:
            out[u.name] = sinks
    return out
