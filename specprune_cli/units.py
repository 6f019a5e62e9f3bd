"""The unit data model: producers, followers, consumers and the int attributes surgery rewrites.

``graph.find_units`` fills it; ``surgery``, ``stats``, ``plan`` and the reports read it. Everything is
named by module and graph-node name, so a plan written from it applies to a fresh instance of the
architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from specprune_cli.layout import Block, Layout


@dataclass(frozen=True)
class Producer:
    """A layer whose output rows are unit channels: unit channel c is its output row c - offset."""

    module: str
    offset: int = 0


@dataclass(frozen=True)
class Consumer:
    """A channel-mixing layer that reads a unit's channels.

    Attributes:
        module: qualified module name.
        kind: the ``LayerKind`` name: "conv", "conv_transpose" or "linear".
        tap: name of the fx node that is the consumer's input (where statistics are taken).
        spatial: for a Linear, the number of input columns each channel owns (H*W after a flatten,
            F of a time-major (B, T, C*F) input); 1 otherwise.
        columns: for a Linear whose columns are not channel-major blocks (channel c owning columns
            c*spatial ... c*spatial + spatial - 1), the (m, spatial) column indices of each channel.
        block: where the unit's entries sit in the consumer's input when they are concatenated with
            other tensors' (``columns`` then index into the block); None otherwise.
    """

    module: str
    kind: str
    tap: str
    spatial: int = 1
    columns: torch.Tensor | None = field(default=None, compare=False, hash=False)
    block: Block | None = None


@dataclass(frozen=True)
class Follower:
    """A layer sliced with the unit. ``role``: "batchnorm", "groupnorm", "prelu", "depthwise", "rows"
    (a gate producer, e.g. squeeze-excitation's second conv) or "param" (parameter ``attr`` of
    ``module`` along dimension ``dim``). It holds unit channels ``offset ... offset + width - 1``
    (width None: all of them), at ``block`` among other tensors' channels after a concatenation."""

    module: str
    role: str
    offset: int = 0
    width: int | None = None
    attr: str | None = None
    dim: int = 0
    block: Block | None = None


@dataclass(frozen=True)
class ShapeAttr:
    """An int module attribute (or entry ``index`` of a tuple attribute) that sizes the channels'
    dimension in a reshape: surgery sets it to ``per_channel`` * kept channels."""

    module: str
    attr: str
    per_channel: int
    index: int | None = None


@dataclass
class Unit:
    """One prunable unit: its producers, the layers that follow its channels, and its consumers.

    Attributes:
        position: index of the (first) producer's node in the captured graph.
        end_position: index of the last consumer's node.
        channel_nodes: fx node name -> Layout of every node that carries the unit's channels, the
            producer included: slicing such a value with ``Layout.keep`` gives what the pruned network
            computes, as long as its inputs were unchanged or sliced alike (``SegmentRunner`` relies
            on this).
        producers: the layers whose output rows are the unit's channels (one, at offset 0, for a
            plain unit).
        type: "plain" (one producer), "stream" (a residual stream: several producers added together)
            or "concat" (one producer whose channels are concatenated with other tensors').
        shape_attrs: int attributes to rewrite after surgery.
    """

    name: str
    kind: str
    width: int
    channel_dim: int
    followers: list[Follower] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    position: int = 0
    end_position: int = 0
    channel_nodes: dict[str, Layout] = field(default_factory=dict)
    producers: list[Producer] = field(default_factory=list)
    type: str = "plain"
    shape_attrs: list[ShapeAttr] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.producers:
            self.producers = [Producer(self.name)]

    @property
    def taps(self) -> list[str]:
        """Tap node names in order of first appearance."""
        seen: list[str] = []
        for c in self.consumers:
            if c.tap not in seen:
                seen.append(c.tap)
        return seen


@dataclass(frozen=True)
class Skipped:
    """A producer left unpruned, and why."""

    name: str
    reason: str


@dataclass
class UnitGraph:
    """The captured model with its units (in graph order) and the producers it skipped.

    Attributes:
        replayable: the graph may be replayed node by node on batches of any size (``stats``); when
            False, gather statistics with hooks and whole forward passes of the model.
        opaque: modules kept whole because their code could not be captured, with the reason.
        int_attrs: ``get_attr`` target in ``gm`` -> (owner module, attribute) of an int attribute of
            the model read by the graph (a width in a reshape), so a copy of the model can be replayed.
    """

    gm: fx.GraphModule | None
    units: list[Unit]
    skipped: list[Skipped]
    replayable: bool = True
    opaque: dict[str, str] = field(default_factory=dict)
    int_attrs: dict[str, tuple[str, str]] = field(default_factory=dict)

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)
