"""What specprune knows about each kind of layer: how it is read and cut (docs/method.md §1, §3, §4).

Registries keyed by module class (a user subclass counts if it keeps the parent's ``forward``, or if its
own forward is seen to compute the parent's: timm's ``Linear``, which only casts the weight):

* ``LayerKind`` (the interface and ``register_layer`` are in ``layer_kind.py``; the kinds are here):
  channel-mixing layers, the producers and consumers of units: Conv1d/2d/3d, ConvTranspose1d/2d/3d,
  Linear; and RNN / LSTM / GRU, consumers only (their first layer's input weights read the unit's
  channels as a Linear does). A kind knows how a producer's output channels are sliced, how a
  consumer's weight is seen as a matrix Z with one column per unit channel (the output-aware loss), how
  W' = W A is folded into it, and how its input becomes statistics rows.
* ``FollowerKind`` (``followers.py``): layers with one parameter per channel between a producer and
  its consumers, sliced with the unit.

A consumer's input columns for each unit channel come from ``Consumer.columns`` when they are not the
channel-major blocks of a plain ``flatten``; ``tap_rows`` and ``fold`` read the same map.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from specprune_cli.layer_kind import (LAYER_KINDS, LAYER_KINDS_BY_NAME, LayerKind, as_parameter,
                                      register_layer, unit_entries, with_unit_entries)
from specprune_cli.layout import Layout, Unsupported
from specprune_cli.probes import computes_base, registered

if TYPE_CHECKING:
    from specprune_cli.units import Consumer, Unit


def layer_kind(mod: nn.Module) -> LayerKind | None:
    """The kind of ``mod``, or None (not a channel-mixing layer specprune knows, or a subclass with
    its own forward that does not compute the parent's)."""
    return registered(mod, LAYER_KINDS, lambda cls, kind: computes_base(mod, cls))


def require_layer_kind(mod: nn.Module) -> LayerKind:
    """``layer_kind`` or an error listing what is supported."""
    kind = layer_kind(mod)
    if kind is None:
        names = ", ".join(sorted(c.__name__ for c in LAYER_KINDS))
        raise ValueError(f"{type(mod).__name__} is not a layer specprune can prune; supported: {names}")
    return kind


def _conv_plain(mod: nn.Module, layout: Layout, in_shape: tuple[int, ...], width: int) -> None:
    if layout.parts is not None or layout.cdim != 1 or layout.bdim != 0:
        raise Unsupported(f"{type(mod).__name__} reads a tensor whose channels are not on dimension 1")
    if layout.labels is not None:
        raise Unsupported(f"{type(mod).__name__} reads the channels reordered or merged with other "
                          "coordinates")
    if mod.in_channels != layout.extent(width):
        raise Unsupported(f"{type(mod).__name__} reads {mod.in_channels} channels, not the "
                          f"{layout.extent(width)} of its input")


@register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class Conv(LayerKind):
    """Weight (out, in/groups, *kernel)."""

    name = "conv"

    def dense(self, mod: nn.Module) -> bool:
        return mod.groups == 1

    def out_channels(self, mod: nn.Module) -> int:
        return mod.out_channels

    def out_layout(self, out_shape: tuple[int, ...]) -> Layout:
        return Layout(1)

    def slice_out(self, mod: nn.Module, keep: torch.Tensor) -> None:
        mod.weight = as_parameter(mod.weight.detach()[keep], mod.weight)
        if mod.bias is not None:
            mod.bias = as_parameter(mod.bias.detach()[keep], mod.bias)
        mod.out_channels = int(keep.numel())

    def consumer(self, mod, layout, in_shape, width):
        _conv_plain(mod, layout, in_shape, width)
        return 1, None

    def matrix(self, mod, consumer):
        w = unit_entries(mod.weight.detach(), 1, consumer.block).to(torch.float64)
        return w.movedim(1, -1).reshape(-1, w.shape[1])

    def fold(self, mod, consumer, a, keep):
        full = mod.weight.detach().to(torch.float64)
        w = unit_entries(full, 1, consumer.block)
        folded = (w.movedim(1, -1) @ a.to(torch.float64)).movedim(-1, 1)
        new = with_unit_entries(full, 1, consumer.block, folded)
        mod.in_channels = new.shape[1]
        mod.weight = as_parameter(new, mod.weight)

    def rows(self, x, consumer):
        return unit_entries(x, 1, consumer.block)


@register_layer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTranspose(LayerKind):
    """Weight (in, out/groups, *kernel): rows are inputs, columns outputs, the other way round."""

    name = "conv_transpose"

    def dense(self, mod: nn.Module) -> bool:
        return mod.groups == 1

    def out_channels(self, mod: nn.Module) -> int:
        return mod.out_channels

    def out_layout(self, out_shape: tuple[int, ...]) -> Layout:
        return Layout(1)

    def slice_out(self, mod: nn.Module, keep: torch.Tensor) -> None:
        mod.weight = as_parameter(mod.weight.detach()[:, keep], mod.weight)
        if mod.bias is not None:
            mod.bias = as_parameter(mod.bias.detach()[keep], mod.bias)
        mod.out_channels = int(keep.numel())

    def consumer(self, mod, layout, in_shape, width):
        _conv_plain(mod, layout, in_shape, width)
        return 1, None

    def matrix(self, mod, consumer):
        w = unit_entries(mod.weight.detach(), 0, consumer.block).to(torch.float64)
        return w.reshape(w.shape[0], -1).T

    def fold(self, mod, consumer, a, keep):
        full = mod.weight.detach().to(torch.float64)
        w = unit_entries(full, 0, consumer.block)
        own = (a.to(torch.float64).T @ w.reshape(w.shape[0], -1)).reshape(a.shape[1], *w.shape[1:])
        new = with_unit_entries(full, 0, consumer.block, own)
        mod.in_channels = new.shape[0]
        mod.weight = as_parameter(new, mod.weight)

    def rows(self, x, consumer):
        return unit_entries(x, 1, consumer.block)


@register_layer(nn.Linear)
class Linear(LayerKind):
    """Weight (out, in) over the last dimension; every leading dimension is rows."""

    name = "linear"

    def out_channels(self, mod: nn.Module) -> int:
        return mod.out_features

    def out_layout(self, out_shape: tuple[int, ...]) -> Layout:
        return Layout(len(out_shape) - 1)

    def slice_out(self, mod: nn.Module, keep: torch.Tensor) -> None:
        mod.weight = as_parameter(mod.weight.detach()[keep], mod.weight)
        if mod.bias is not None:
            mod.bias = as_parameter(mod.bias.detach()[keep], mod.bias)
        mod.out_features = int(keep.numel())

    def consumer(self, mod, layout, in_shape, width):
        if layout.parts is not None or layout.cdim != len(in_shape) - 1:
            raise Unsupported("Linear reads a dimension other than the channels")
        labels = layout.channels(layout.block.own if layout.block is not None else in_shape[-1])
        counts = torch.bincount(labels, minlength=width)
        if bool((counts != counts[0]).any()):
            raise Unsupported("Linear reads a different number of columns from each channel")
        per = int(counts[0])
        columns = torch.argsort(labels, stable=True).view(width, per)
        if torch.equal(columns, torch.arange(width * per).view(width, per)):
            return per, None  # channel-major blocks: flatten(1) of (N, C, *spatial), or a plain Linear
        return per, columns

    def matrix(self, mod, consumer):
        return self._matrix(mod.weight, consumer)

    def fold(self, mod, consumer, a, keep):
        new = self._fold(mod.weight, consumer, a, keep)
        mod.in_features = new.shape[1]
        mod.weight = as_parameter(new, mod.weight)

    def rows(self, x, consumer):
        x = unit_entries(x, x.dim() - 1, consumer.block)
        flat = x.reshape(-1, x.shape[-1])
        if consumer.columns is not None:
            return flat[:, consumer.columns]
        if consumer.spatial > 1:
            return flat.reshape(flat.shape[0], -1, consumer.spatial)
        return flat

    @staticmethod
    def _matrix(weight: torch.Tensor, consumer: "Consumer") -> torch.Tensor:
        w = unit_entries(weight.detach(), 1, consumer.block).to(torch.float64)
        m = consumer_width(consumer, w.shape[1])
        if consumer.columns is None:
            blocks = w.reshape(w.shape[0], m, consumer.spatial)
        else:
            blocks = w[:, consumer.columns]
        return blocks.permute(0, 2, 1).reshape(-1, m)

    @staticmethod
    def _fold(weight: torch.Tensor, consumer: "Consumer", a: torch.Tensor,
              keep: torch.Tensor) -> torch.Tensor:
        """W A over the input columns of a (out, in) weight, in float64."""
        full = weight.detach().to(torch.float64)
        w = unit_entries(full, 1, consumer.block)
        a = a.to(torch.float64)
        m, k, per = a.shape[0], a.shape[1], consumer.spatial
        if consumer.columns is None:
            new = torch.einsum("oif,ik->okf", w.reshape(w.shape[0], m, per), a).reshape(w.shape[0], k * per)
        else:
            folded = torch.einsum("oif,ik->okf", w[:, consumer.columns], a)
            # The pruned input keeps the kept channels' columns in their original order.
            kept_columns = consumer.columns[keep]
            position = torch.empty(w.shape[1], dtype=torch.long)
            position[kept_columns.flatten().sort().values] = torch.arange(k * per)
            new = torch.empty(w.shape[0], k * per, dtype=torch.float64)
            new[:, position[kept_columns].flatten()] = folded.reshape(w.shape[0], k * per)
        return with_unit_entries(full, 1, consumer.block, new)


@register_layer(nn.RNN, nn.LSTM, nn.GRU)
class Recurrent(Linear):
    """A consumer only: the first layer's input weights ``weight_ih_l0`` (and ``_reverse``), (gates x
    hidden, input), read the input's last dimension at every step as a Linear does. The unit's
    reconstruction folds into them, so the recurrence itself is untouched; the outputs (hidden states)
    are never a unit."""

    name = "recurrent"
    producer = False

    @staticmethod
    def input_weights(mod: nn.Module) -> list[str]:
        return ["weight_ih_l0", "weight_ih_l0_reverse"][:2 if mod.bidirectional else 1]

    def out_channels(self, mod: nn.Module) -> int:
        raise Unsupported(f"the outputs of {type(mod).__name__} are hidden states, not channels to prune")

    def slice_out(self, mod: nn.Module, keep: torch.Tensor) -> None:
        raise Unsupported(f"the outputs of {type(mod).__name__} are hidden states, not channels to prune")

    def matrix(self, mod, consumer):
        return torch.cat([self._matrix(getattr(mod, n), consumer) for n in self.input_weights(mod)])

    def input_weight_count(self, mod):
        return sum(getattr(mod, n).numel() for n in self.input_weights(mod))

    def fold(self, mod, consumer, a, keep):
        for n in self.input_weights(mod):
            old = getattr(mod, n)
            new = self._fold(old, consumer, a, keep)
            setattr(mod, n, as_parameter(new, old))  # RNNBase.__setattr__ updates its weight list
        mod.input_size = new.shape[1]
        mod.flatten_parameters()


def consumer_width(consumer: "Consumer", columns: int) -> int:
    return consumer.columns.shape[0] if consumer.columns is not None else columns // consumer.spatial


def consumer_matrix(module: nn.Module, consumer: "Consumer") -> torch.Tensor:
    """The consumer's weight as Z (rows x m, float64), one column per unit channel (docs/method.md §3).

    Args:
        module: the consumer module.
        consumer: its entry in the unit (kind and column map).
    """
    return require_layer_kind(module).matrix(module, consumer)


def tap_rows(x: torch.Tensor, unit: "Unit", consumer: "Consumer") -> torch.Tensor:
    """A consumer's input as rows for ``SecondMoment.update``: (N, C, *positions) for a convolution,
    (rows, C, per-channel columns) for a Linear reading several columns per channel, else (rows, C).

    Args:
        x: the tensor arriving at the consumer.
        unit: the unit whose channels it carries.
        consumer: the consumer (its kind and column map).
    """
    return LAYER_KINDS_BY_NAME[consumer.kind].rows(x.detach(), consumer)
