"""Where a unit's channels sit in each tensor that carries them (docs/method.md §1).

A ``Layout`` says which dimension of a tensor carries the unit's channels and, when that dimension
also holds other coordinates (after ``flatten``, ``permute`` + ``reshape`` to time-major order, ...),
which channel each index along it belongs to. Operations that move data around (view, reshape,
flatten, permute, transpose, squeeze, unsqueeze, slicing, chunk, ...) are not modelled case by case:
they are run on index-labelled tensors (each element holds its channel number, a second one its
sample number) and ``locate`` reads the result. So a Linear after any chain of them knows exactly
which of its input columns belong to which channel, and a chain that scatters a channel over several
dimensions, merges it with the batch, or drops some channels is recognised and refused.

``OpCall`` is what a rule of the operation registry (``ops.py``) sees of one use of such a tensor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn


class Unsupported(Exception):
    """The channels cannot be followed through this operation; the message is the skip reason."""


@dataclass(eq=False)
class Layout:
    """Where the channels of a unit sit in one tensor (shapes as in the capture, batch of 2).

    Attributes:
        cdim: the one dimension that carries the channel coordinate.
        labels: channel of each index along ``cdim``; None when index i is channel i.
        bdim: the dimension that carries the batch coordinate.
        blabels: sample of each index along ``bdim``; None when index i is sample i.
        parts: for a tuple or list of tensors (``chunk``, ``split``), the layout of each element; the
            other fields are then unused.
        block: after a concatenation along the channels, where the unit's entries sit among other
            tensors' entries (``Block``); None when ``cdim`` holds only the unit's channels. ``labels``
            then describe the block's entries alone.
    """

    cdim: int
    labels: torch.Tensor | None = None
    bdim: int = 0
    blabels: torch.Tensor | None = None
    parts: tuple["Layout", ...] | None = field(default=None)
    block: Block | None = None

    @property
    def plain(self) -> bool:
        """Channel i at index i of ``cdim``, nothing else merged into it."""
        return self.labels is None and self.parts is None and self.block is None

    def extent(self, width: int) -> int:
        """Entries along ``cdim`` in the unpruned network, for a unit of ``width`` plain channels."""
        return width if self.block is None else self.block.lead + self.block.own + self.block.trail

    def channels(self, size: int) -> torch.Tensor:
        """Channel of each of the unit's ``size`` indices along ``cdim`` (its block's, after a
        concatenation)."""
        return torch.arange(size) if self.labels is None else self.labels

    def keep(self, value: Any, keep: torch.Tensor) -> Any:
        """``value`` with only the channels ``keep`` (sorted): what the pruned network computes there.
        Entries of other tensors concatenated with the channels stay."""
        if self.parts is not None:
            return type(value)(p.keep(v, keep) for p, v in zip(self.parts, value))
        index = keep if self.labels is None else torch.isin(self.labels, keep).nonzero().flatten()
        if self.block is not None:
            index = self.block.expand(index, value.shape[self.cdim])
        return value.index_select(self.cdim, index)

    def tensors(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full tensors of ``shape`` holding each element's channel and sample number (channel -1 for the
        entries of other tensors concatenated with the channels)."""
        def full(dim: int, vec: torch.Tensor) -> torch.Tensor:
            view = [1] * len(shape)
            view[dim] = -1
            return vec.to(torch.int32).view(view).expand(*shape).contiguous()
        lead, trail = (self.block.lead, self.block.trail) if self.block is not None else (0, 0)
        own = self.channels(shape[self.cdim] - lead - trail)
        channels = torch.cat([torch.full((lead,), -1), own.to(torch.long), torch.full((trail,), -1)])
        batch = torch.arange(shape[self.bdim]) if self.blabels is None else self.blabels
        return full(self.cdim, channels), full(self.bdim, batch)

    def shifted(self, by: int) -> "Layout":
        """The same layout in a tensor with ``by`` more leading dimensions (broadcasting)."""
        return replace(self, cdim=self.cdim + by, bdim=self.bdim + by)


@dataclass(frozen=True)
class Block:
    """Where a unit's entries sit along a dimension they share with other tensors' (a concatenation).

    Attributes:
        lead, own, trail: entries before the unit's, the unit's, and after them, in the unpruned
            network. Until the unit itself is pruned it keeps its ``own`` entries.
        anchor: "start" if the entries before the unit's keep their number until the unit is pruned
            (the block starts at ``lead``), "end" if those after it do (it ends ``trail`` before the
            end). ``graph.find_units`` sets it from the order in which units are pruned.
    """

    lead: int
    own: int
    trail: int
    anchor: str = "start"

    def start(self, size: int) -> int:
        """First index of the block in a dimension of ``size`` entries (the unit not yet pruned)."""
        return self.lead if self.anchor == "start" else size - self.trail - self.own

    def narrow(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The unit's entries of ``t`` along ``dim``."""
        return t.narrow(dim, self.start(t.shape[dim]), self.own)

    def expand(self, index: torch.Tensor, size: int) -> torch.Tensor:
        """``index`` into the block as indices into the whole dimension, every other entry kept."""
        start = self.start(size)
        return torch.cat([torch.arange(start), index.to(torch.long) + start,
                          torch.arange(start + self.own, size)])


def locate(channels: torch.Tensor, batch: torch.Tensor, width: int, what: str) -> Layout:
    """Read a Layout off labelled tensors (see ``Layout.tensors``).

    Raises:
        Unsupported: the channels are spread over several dimensions, merged with the batch, not all
            present, or interleaved with other tensors' entries.
    """
    cdims = _varying(channels)
    bdims = _varying(batch)
    if width > 1 and len(cdims) != 1:
        raise Unsupported(f"{what} spreads each channel over {len(cdims) or 'no'} dimensions")
    if len(bdims) != 1:
        raise Unsupported(f"{what} does not keep the batch in one dimension")
    cdim = cdims[0] if cdims else channels.dim() - 1
    if cdim == bdims[0]:
        raise Unsupported(f"{what} merges the channels with the batch dimension")
    labels = _along(channels, cdim).to(torch.long)
    own = (labels >= 0).nonzero().flatten()
    block = None
    if own.numel() and own.numel() < labels.numel():
        first, last = int(own[0]), int(own[-1])
        if last - first + 1 != own.numel():
            raise Unsupported(f"{what} interleaves the channels with the entries of other tensors")
        block = Block(first, own.numel(), labels.numel() - last - 1)
        labels = labels[first:last + 1]
    counts = torch.bincount(labels.clamp(min=0), minlength=width)
    if counts.numel() != width or bool((counts == 0).any()) or bool((labels < 0).any()):
        raise Unsupported(f"{what} keeps only some of the channels")
    blabels = _along(batch, bdims[0]).to(torch.long)
    return Layout(cdim, None if torch.equal(labels, torch.arange(width)) else labels, bdims[0],
                  None if torch.equal(blabels, torch.arange(blabels.numel())) else blabels, block=block)


def _varying(t: torch.Tensor) -> list[int]:
    return [d for d in range(t.dim()) if t.shape[d] > 1 and bool((t.diff(dim=d) != 0).any())]


def _along(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)[:, 0] if t.numel() else t.new_zeros(0)


@dataclass
class OpCall:
    """One use of a channel-carrying tensor ``src`` by ``node``, as a rule sees it.

    Attributes:
        shape_entries: filled by rules that take sizes: (size argument as written in the graph, or a
            ``ModuleEntry``; channels' share of that size per channel; entries of other tensors in it)
            for the dimension that carries the channels, which must follow a pruned width.
    """

    node: fx.Node
    src: fx.Node
    layout: Layout
    width: int
    module: nn.Module | None = None
    shape_entries: list[tuple[Any, int, int]] = field(default_factory=list)

    @property
    def label(self) -> str:
        t = self.node.target
        if self.module is not None:
            return f"{t} ({type(self.module).__name__})"
        return f"`{t if isinstance(t, str) else getattr(t, '__name__', str(t))}`"

    @property
    def in_shape(self) -> tuple[int, ...]:
        return shape_of(self.src)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return shape_of(self.node)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument ``index`` (counting ``src`` as 0 for functions and methods) or keyword ``name``,
        as a concrete value."""
        args = self.node.args
        raw = args[index] if index < len(args) else self.node.kwargs.get(name, default)
        return concrete(raw)


@dataclass(frozen=True)
class ModuleEntry:
    """A size held by a module attribute (``nn.Unflatten.unflattened_size[index]``)."""

    module: str
    attr: str
    index: int | None


def is_tensor(node: Any) -> bool:
    """True if the graph node's value in the capture was one tensor."""
    return isinstance(node, fx.Node) and hasattr(node.meta.get("tensor_meta"), "shape")


def is_tensors(node: Any) -> bool:
    """True if the graph node's value in the capture was a tuple or list of tensors."""
    return isinstance(node, fx.Node) and type(node.meta.get("tensor_meta")) is tuple


def shape_of(node: Any) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    if shape is None:
        raise Unsupported(f"the shape of `{getattr(node, 'name', node)}` is unknown")
    return tuple(shape)


def concrete(a: Any) -> Any:
    """The value of a graph argument in the capture: recorded Python values, and for tensors other
    than the channels a zero tensor of their shape (only shapes matter to the rules that take one)."""
    if isinstance(a, fx.Node):
        if "value" in a.meta:
            return a.meta["value"]
        if not is_tensor(a):
            raise Unsupported(f"the value of `{a.name}` is unknown")
        return torch.zeros(shape_of(a), dtype=torch.int32)
    if isinstance(a, (tuple, list)):
        return type(a)(concrete(x) for x in a)
    if isinstance(a, dict):
        return {k: concrete(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(concrete(a.start), concrete(a.stop), concrete(a.step))
    return a


def reads_shape_of(node: fx.Node, tensors: Mapping[fx.Node, Layout]) -> bool:
    """True if ``node`` (a computation on shapes) reads the shape of one of ``tensors``."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in tensors:
            return True
        if n in seen or (n is not node and (is_tensor(n) or is_tensors(n))):
            continue  # stop at other tensors: their contents are not shapes
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def resized_value(node: Any, tensors: Mapping[fx.Node, Layout], width: int, new_width: int) -> Any:
    """The value ``node`` (a computation on shapes) would have if ``tensors`` carried ``new_width``
    channels instead of ``width``: the small graph of shape reads and arithmetic is evaluated again
    with their channels' dimension resized.

    Raises:
        Unsupported: the computation reads tensor contents or something unknown.
    """
    def again(a: Any) -> Any:
        return resized_value(a, tensors, width, new_width)

    if not isinstance(node, fx.Node):
        return type(node)(again(a) for a in node) if isinstance(node, (tuple, list)) else node
    attribute = node.args[1] if node.target is getattr else None
    reads = node.op == "call_method" and node.target in ("size", "dim", "numel")
    if reads or attribute in ("shape", "ndim"):
        shape = list(shape_of(node.args[0]))
        lay = tensors.get(node.args[0])
        if lay is not None and lay.parts is None:
            own = lay.block.own if lay.block is not None else shape[lay.cdim]
            shape[lay.cdim] += own // width * new_width - own
        if node.target == "numel":
            return int(torch.Size(shape).numel())
        if node.target == "dim" or attribute == "ndim":
            return len(shape)
        dim = node.args[1] if node.op == "call_method" and len(node.args) > 1 else node.kwargs.get("dim")
        return torch.Size(shape) if dim is None or attribute == "shape" else shape[dim]
    if node.op == "get_attr" or is_tensor(node) or is_tensors(node):
        if "value" in node.meta and not isinstance(node.meta["value"], torch.Tensor):
            return node.meta["value"]
        raise Unsupported(f"`{node.name}` is not a shape")
    args = [again(a) for a in node.args]
    kwargs = {k: again(v) for k, v in node.kwargs.items()}
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    raise Unsupported(f"`{node.name}` is not a shape computation")
