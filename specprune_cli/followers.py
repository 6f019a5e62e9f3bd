"""Layers sliced with a unit: one parameter per channel between a producer and its consumers
(docs/method.md §1, §4).

``FollowerKind`` (``register_follower``), keyed by module class (a user subclass counts if it keeps the
parent's ``forward``): BatchNorm, InstanceNorm, per-channel GroupNorm and PReLU, depthwise convolution,
the producer of a squeeze-excitation gate, and a per-channel parameter. After a concatenation a
follower holds other tensors' channels too (``Follower.block``): only the unit's are cut.

A norm subclass with a forward of its own (timm's ``BatchNormAct2d``: batch norm, dropout, activation)
is a follower only if it is seen to act on each channel alone: a copy cut to every other channel must
give, on those channels, the outputs of the whole layer (``acts_per_channel``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from specprune_cli.layer_kind import LAYER_KINDS, as_parameter
from specprune_cli.layers import require_layer_kind
from specprune_cli.layout import Layout, Unsupported
from specprune_cli.probes import acts_per_channel, registered


class FollowerKind:
    """Layers sliced with a unit. ``role`` names the slicing (``Follower.role``)."""

    role = ""

    def check(self, mod: nn.Module, layout: Layout, width: int) -> str | None:
        """The role if ``mod`` acts per channel on ``layout`` (None: per element, nothing to slice).

        Raises:
            Unsupported: it mixes channels, or reads them on another dimension.
        """
        if layout.parts is not None or layout.labels is not None or layout.cdim != 1:
            raise Unsupported(f"{type(mod).__name__} needs the channels on dimension 1")
        return self.role

    def size(self, mod: nn.Module, follower: Any) -> int:
        """The number of channels ``mod`` holds now (the unit's, and others' after a concatenation)."""
        raise NotImplementedError

    def slice(self, mod: nn.Module, keep: torch.Tensor, follower: Any) -> None:
        raise NotImplementedError


FOLLOWER_KINDS: dict[type, FollowerKind] = {}
FOLLOWER_ROLES: dict[str, FollowerKind] = {}


def register_follower(*classes: type) -> Callable[[type[FollowerKind]], type[FollowerKind]]:
    """Class decorator registering a follower kind for ``classes`` (and for its role name)."""
    def decorate(kind_cls: type[FollowerKind]) -> type[FollowerKind]:
        kind = kind_cls()
        FOLLOWER_ROLES[kind.role] = kind
        for c in classes:
            FOLLOWER_KINDS[c] = kind
        return kind_cls
    return decorate


def follower_kind(mod: nn.Module) -> FollowerKind | None:
    """The kind of ``mod``, or None (not a per-channel layer specprune knows, or a subclass with its own
    forward that is not probed, or whose probe finds it mixing channels)."""
    return registered(mod, FOLLOWER_KINDS, lambda cls, kind: cls in _PROBED and acts_per_channel(mod, kind))


def _slice_attr(mod: nn.Module, name: str, keep: torch.Tensor, dim: int = 0) -> None:
    value = getattr(mod, name, None)
    if value is None:
        return
    new = value.detach().index_select(dim, keep)
    if isinstance(value, nn.Parameter):
        setattr(mod, name, as_parameter(new, value))
    else:
        setattr(mod, name, new.clone())


@register_follower(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
class Norm(FollowerKind):
    """BatchNorm / InstanceNorm: weight, bias and running statistics per channel (any of them may be None)."""

    role = "batchnorm"

    def size(self, mod, follower):
        return mod.num_features

    def slice(self, mod, keep, follower):
        for name in ("weight", "bias", "running_mean", "running_var"):
            _slice_attr(mod, name, keep)
        mod.num_features = int(keep.numel())


@register_follower(nn.GroupNorm)
class PerChannelGroupNorm(FollowerKind):
    """GroupNorm with one channel per group normalises each channel alone; with fewer groups it mixes them."""

    role = "groupnorm"

    def check(self, mod, layout, width):
        if mod.num_groups != mod.num_channels:
            raise Unsupported(f"GroupNorm with {mod.num_groups} groups mixes the channels of each group")
        return super().check(mod, layout, width)

    def size(self, mod, follower):
        return mod.num_channels

    def slice(self, mod, keep, follower):
        _slice_attr(mod, "weight", keep)
        _slice_attr(mod, "bias", keep)
        mod.num_groups = mod.num_channels = int(keep.numel())


#: Kinds whose subclasses with a forward of their own are probed (``acts_per_channel``).
_PROBED = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)


@register_follower(nn.PReLU)
class PReLU(FollowerKind):
    role = "prelu"

    def check(self, mod, layout, width):
        if mod.num_parameters == 1:
            return None
        return super().check(mod, layout, width)

    def size(self, mod, follower):
        return mod.num_parameters

    def slice(self, mod, keep, follower):
        _slice_attr(mod, "weight", keep)
        mod.num_parameters = int(keep.numel())


@register_follower(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class Depthwise(FollowerKind):
    """A convolution with groups == in == out channels filters each channel alone."""

    role = "depthwise"

    def check(self, mod, layout, width):
        if not (mod.groups == mod.in_channels == mod.out_channels == layout.extent(width)):
            raise Unsupported(f"grouped convolution (groups={mod.groups}) needs group-aware pruning, "
                              "not supported yet")
        return super().check(mod, layout, width)

    def size(self, mod, follower):
        return mod.out_channels

    def slice(self, mod, keep, follower):
        LAYER_KINDS[nn.Conv2d].slice_out(mod, keep)
        mod.in_channels = mod.groups = int(keep.numel())


@register_follower()
class GateRows(FollowerKind):
    """The producer of a squeeze-excitation gate: its output rows scale the unit's channels one to one."""

    role = "rows"

    def size(self, mod, follower):
        return require_layer_kind(mod).out_channels(mod)

    def slice(self, mod, keep, follower):
        require_layer_kind(mod).slice_out(mod, keep)


@register_follower()
class ChannelParameter(FollowerKind):
    """A parameter or buffer of a module that scales or shifts the channels (``x * self.gamma``)."""

    role = "param"

    def size(self, mod, follower):
        return getattr(mod, follower.attr).shape[follower.dim]

    def slice(self, mod, keep, follower):
        _slice_attr(mod, follower.attr, keep, follower.dim)


def slice_follower(mod: nn.Module, follower: Any, keep: torch.Tensor) -> None:
    """Slice ``mod`` to the channels ``keep`` in the way ``follower.role`` says."""
    kind = FOLLOWER_ROLES.get(follower.role)
    if kind is None:
        raise ValueError(f"unknown follower role {follower.role!r}; supported: "
                         f"{', '.join(sorted(FOLLOWER_ROLES))}")
    if getattr(follower, "block", None) is not None:
        keep = follower.block.expand(keep, kind.size(mod, follower))
    kind.slice(mod, keep, follower)
