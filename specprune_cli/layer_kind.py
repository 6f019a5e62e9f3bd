"""The interface every kind of channel-mixing layer implements, its registry, and the helpers kinds share
(docs/method.md §1, §3, §4). The kinds themselves are in ``layers.py``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from specprune_cli.layout import Block, Layout

if TYPE_CHECKING:
    from specprune_cli.units import Consumer


def as_parameter(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """``t`` as a parameter replacing ``like`` (same dtype and requires_grad)."""
    return nn.Parameter(t.to(like.dtype).contiguous(), requires_grad=like.requires_grad)


def unit_entries(t: torch.Tensor, dim: int, block: Block | None) -> torch.Tensor:
    """The unit's entries of ``t`` along ``dim`` (all of them unless it is concatenated with others)."""
    return t if block is None else block.narrow(t, dim)


def with_unit_entries(t: torch.Tensor, dim: int, block: Block | None, own: torch.Tensor) -> torch.Tensor:
    """``t`` with the unit's entries along ``dim`` replaced by ``own`` (the other tensors' entries stay)."""
    if block is None:
        return own
    start = block.start(t.shape[dim])
    end = start + block.own
    return torch.cat([t.narrow(dim, 0, start), own.to(t.dtype), t.narrow(dim, end, t.shape[dim] - end)], dim)


class LayerKind:
    """A family of channel-mixing layers (see the module docstring). Subclasses set ``name``."""

    name = ""
    base: type = nn.Module
    producer = True  # its output channels can be a unit

    def dense(self, mod: nn.Module) -> bool:
        """Every output reads every input channel (no groups)."""
        return True

    def out_channels(self, mod: nn.Module) -> int:
        raise NotImplementedError

    def out_layout(self, out_shape: tuple[int, ...]) -> Layout:
        raise NotImplementedError

    def slice_out(self, mod: nn.Module, keep: torch.Tensor) -> None:
        """Keep output channels ``keep`` (weights and bias)."""
        raise NotImplementedError

    def consumer(self, mod: nn.Module, layout: Layout, in_shape: tuple[int, ...], width: int
                 ) -> tuple[int, torch.Tensor | None]:
        """(entries per channel, column map or None) for reading a unit laid out as ``layout``.

        Raises:
            Unsupported: the layer reads a dimension other than the channels.
        """
        raise NotImplementedError

    def matrix(self, mod: nn.Module, consumer: "Consumer") -> torch.Tensor:
        """The weight as Z, float64, one column per unit channel."""
        raise NotImplementedError

    def input_weight_count(self, mod: nn.Module) -> int:
        """How many weights read the layer's input (a tap's share of a unit's loss)."""
        return mod.weight.numel()

    def fold(self, mod: nn.Module, consumer: "Consumer", a: torch.Tensor, keep: torch.Tensor) -> None:
        """W' = W A: read the kept channels and reconstruct the dropped ones."""
        raise NotImplementedError

    def rows(self, x: torch.Tensor, consumer: "Consumer") -> torch.Tensor:
        """The consumer's input as statistics rows: (N, C, *positions) or (rows, C)."""
        raise NotImplementedError


LAYER_KINDS: dict[type, LayerKind] = {}
LAYER_KINDS_BY_NAME: dict[str, LayerKind] = {}  # "conv", "linear", ... as units record their consumers


def register_layer(*classes: type) -> Callable[[type[LayerKind]], type[LayerKind]]:
    """Class decorator: instances of ``classes`` (and subclasses keeping their forward) are of this kind."""
    def decorate(kind_cls: type[LayerKind]) -> type[LayerKind]:
        for c in classes:
            kind = kind_cls()
            kind.base = c
            LAYER_KINDS[c] = kind
            LAYER_KINDS_BY_NAME[kind.name] = kind
        return kind_cls
    return decorate
