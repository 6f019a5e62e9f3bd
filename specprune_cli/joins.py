"""Joins of channel spaces (docs/method.md §1): each producer's channels are followed separately
(``propagate.py``); where two of them meet element-wise, this module decides what they become. A squeeze-
excitation gate is absorbed by the space it scales; spaces added together (a residual stream) become
one unit whose producers lose the same rows and whose every reader is a tap; any other join leaves
both unpruned, with the reason. Spaces concatenated along the channels stay apart: each is a block of
the concatenation, and ``anchor_blocks`` says where the block is found when its unit is pruned.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx

from specprune_cli.layer_kind import LayerKind
from specprune_cli.layout import Block, Layout, Unsupported, concrete, is_tensor, shape_of
from specprune_cli.ops import CONCATS, listed
from specprune_cli.units import Consumer, Follower, Producer, ShapeAttr, Skipped, Unit


@dataclass
class Space:
    """Propagation state of one producer's channels through the graph."""

    producer: fx.Node
    width: int
    kind: LayerKind
    nodes: dict[fx.Node, Layout] = field(default_factory=dict)
    followers: list[Follower] = field(default_factory=list)
    consumers: list[tuple[Consumer, fx.Node]] = field(default_factory=list)
    # (op node, the other operand, its own operand) of every element-wise op with another tensor
    joins: list[tuple[fx.Node, fx.Node, fx.Node]] = field(default_factory=list)
    shape_attrs: dict[tuple[str, str, int | None], ShapeAttr] = field(default_factory=dict)
    attr_nodes: list[fx.Node] = field(default_factory=list)  # get_attr nodes of int attributes it rewrites
    failure: str | None = None


def fail(sp: Space, reason: str) -> None:
    if sp.failure is None:
        sp.failure = reason


def per_sample(shape: tuple[int, ...]) -> int:
    total = 1
    for s in shape[1:]:
        total *= s
    return total


def resolve_joins(spaces: list[Space], owner: dict[fx.Node, Space]) -> list[list[Space]]:
    """Decide every join: a squeeze-excitation gate is absorbed; spaces added (a residual) or
    multiplied (a gated MLP: SwiGLU's ``act(gate(x)) * up(x)``) together element by element form one
    stream; anything else leaves both unpruned. Returns the spaces grouped by stream (a
    group of one for a space joined with no other)."""
    parent = {id(sp): sp for sp in spaces}

    def root(sp: Space) -> Space:
        while parent[id(sp)] is not sp:
            parent[id(sp)] = parent[id(parent[id(sp)])]
            sp = parent[id(sp)]
        return sp

    for sp in spaces:
        for op_node, other, own in sp.joins:
            if other in sp.nodes:
                if not _aligned(sp, own, other, op_node):
                    fail(sp, f"`{op_node.name}` combines its channels in two different orders")
                continue
            gate = owner.get(other)
            if gate is not None and gate is not sp and _is_gate(gate, other, op_node):
                continue
            if gate is not None and gate is not sp and _is_gate(sp, _operand_in(sp, op_node), op_node):
                sp.failure = "gate"  # sp itself is the gate of `gate`: the gated space absorbs it
                continue
            if (gate is not None and gate is not sp and _elementwise(op_node) and gate.width == sp.width
                    and _same_layout(sp, gate, own, other)):
                # one stream: channel c of the result reads channel c of both, and nothing else
                parent[id(root(sp))] = root(gate)
                continue
            if sp.failure is None:
                what = f"the output of {gate.producer.target}" if gate is not None else f"`{other.name}`"
                sp.failure = (f"its channels are joined with {what} by `{op_node.name}`, which specprune "
                              "cannot prune as one residual stream")
            if gate is not None and gate.failure is None:
                gate.failure = (f"its channels are joined with the output of {sp.producer.target} by "
                                f"`{op_node.name}`, which specprune cannot prune as one residual stream")
    for sp in spaces:
        if sp.failure is not None:
            continue
        for op_node, other, own in sp.joins:
            gate = owner.get(other)
            if other in sp.nodes or gate is None or gate is sp or root(gate) is root(sp):
                continue
            # Gating a concatenation (CSPNeXt's squeeze-excitation over cat([main, short])), the gate's
            # rows and followers hold every segment's channels: only this unit's block is cut.
            block = sp.nodes[own].block
            sp.followers.append(Follower(str(gate.producer.target), "rows", block=block))
            sp.followers.extend(f if f.block is not None else replace(f, block=block) for f in gate.followers)
            gate.failure = "gate"
    groups: dict[int, list[Space]] = {}
    for sp in spaces:
        groups.setdefault(id(root(sp)), []).append(sp)
    return [g for g in groups.values() if not (len(g) > 1 and all(sp.failure == "gate" for sp in g))]


def _elementwise(op_node: fx.Node) -> bool:
    """An element-wise sum, difference, product or quotient of two tensors of the same shape."""
    return op_node.target in _ELEMENTWISE and sum(is_tensor(a) for a in op_node.args) == 2


_ELEMENTWISE = (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_",
                "sub", "sub_", operator.mul, operator.imul, torch.mul, "mul", "mul_", operator.truediv,
                operator.itruediv, torch.div, "div", "div_")


def _same_layout(a: Space, b: Space, own: fx.Node, other: fx.Node) -> bool:
    """The two operands carry their channels the same plain way (same shape, same channel dimension)."""
    la, lb = a.nodes.get(own), b.nodes.get(other)
    return (la is not None and lb is not None and la.plain and lb.plain and la.cdim == lb.cdim
            and shape_of(own) == shape_of(other))


def _aligned(sp: Space, a: fx.Node, b: fx.Node, op_node: fx.Node) -> bool:
    """Two tensors of the same unit meet element-wise: each element must hold the same channel in both."""
    la, lb = sp.nodes[a], sp.nodes[b]
    if la.parts is not None or lb.parts is not None:
        return False
    out = shape_of(op_node)
    ca = la.shifted(len(out) - len(shape_of(a))).tensors(out)[0] if shape_of(a) == out else None
    cb = lb.shifted(len(out) - len(shape_of(b))).tensors(out)[0] if shape_of(b) == out else None
    return ca is not None and cb is not None and torch.equal(ca, cb)


def _operand_in(sp: Space, op_node: fx.Node) -> fx.Node | None:
    for a in op_node.args:
        if isinstance(a, fx.Node) and a in sp.nodes:
            return a
    return None


def _is_gate(sp: Space, operand: fx.Node | None, op_node: fx.Node) -> bool:
    """True if ``sp`` only exists to scale another space per channel (squeeze-excitation): it has no
    consumers, its single join is ``op_node``, and its tensor is one value per (sample, channel)."""
    if operand is None or sp.consumers or len(sp.joins) != 1 or sp.joins[0][0] is not op_node:
        return False
    if sp.failure not in (None, "gate"):
        return False
    return per_sample(shape_of(operand)) == sp.width and sp.kind.name == "conv"


def stream_unit(group: list[Space], index: Mapping[fx.Node, int], exclude: Callable[[str], bool] | None
                ) -> tuple[Unit | None, list[Skipped]]:
    """One unit for the producers whose channels are added together (a residual stream,
    docs/method.md §1): every producer loses the same rows, every consumer of the stream is a tap."""
    group = sorted(group, key=lambda sp: index[sp.producer])
    names = [str(sp.producer.target) for sp in group]
    label = f"residual stream of {', '.join(names)}"
    failure = next((f"{n}: {sp.failure}" for n, sp in zip(names, group) if sp.failure is not None), None)
    if failure is None and exclude is not None and any(exclude(n) for n in names):
        failure = "a producer is excluded by config (prune.exclude)"
    nodes: dict[fx.Node, Layout] = {}
    for sp in group:
        for node, lay in sp.nodes.items():
            if failure is None and node in nodes and nodes[node].cdim != lay.cdim:
                failure = f"its channels are on different dimensions at `{node.name}`"
            nodes.setdefault(node, lay)
    consumers: dict[tuple[str, str], tuple[Consumer, fx.Node]] = {}
    followers: dict[Follower, None] = {}
    attrs: dict[Any, ShapeAttr] = {}
    for sp in group:
        for c, cn in sp.consumers:
            consumers.setdefault((c.module, c.tap), (c, cn))
        followers.update(dict.fromkeys(sp.followers))
        attrs.update(sp.shape_attrs)
    if failure is None and not consumers:
        failure = "no consumer reads its channels"
    if failure is not None:
        return None, [Skipped(n, f"{label}: {failure}") for n in names]
    first = group[0]
    return Unit(
        name=names[0], kind="linear" if first.kind.name == "linear" else "conv", width=first.width,
        channel_dim=nodes[first.producer].cdim, followers=list(followers),
        consumers=[c for c, _ in consumers.values()], position=index[first.producer],
        end_position=max(index[cn] for _, cn in consumers.values()),
        channel_nodes={n.name: lay for n, lay in nodes.items()},
        producers=[Producer(n) for n in names], type="stream",
        shape_attrs=list(attrs.values())), []


def anchor_blocks(units: list[Unit]) -> tuple[list[Unit], list[Skipped]]:
    """Say where each concatenated unit's block lies when the unit is pruned (docs/method.md §1).

    Units are pruned in the order of ``units``. A block whose neighbours on one side all belong to
    units pruned later (or to no unit) keeps its offset from that side (``Block.anchor``); a unit with
    blocks between channels of units pruned before it on both sides is kept whole, with the reason.
    Concatenated plain units get type "concat".
    """
    pruned_before: dict[str, list[Block]] = {}
    kept, skipped = [], []
    for u in units:
        mine = {n: lay.block for n, lay in u.channel_nodes.items() if lay.block is not None}
        earlier = [(b, other) for n, b in mine.items() for other in pruned_before.get(n, [])]
        before = any(other.lead < b.lead for b, other in earlier)
        after = any(other.lead > b.lead for b, other in earlier)
        if before and after:
            reason = ("its channels are concatenated between channels of units pruned before it, on both "
                      "sides; specprune cannot place them; kept whole")
            skipped.extend(Skipped(p.module, reason) for p in u.producers)
            continue
        if mine:
            _set_anchor(u, "end" if before else "start")
        for n, b in mine.items():
            pruned_before.setdefault(n, []).append(b)
        kept.append(u)
    return kept, skipped


def _set_anchor(u: Unit, anchor: str) -> None:
    def anchored(b: Block | None) -> Block | None:
        return None if b is None else replace(b, anchor=anchor)
    u.channel_nodes = {n: replace(lay, block=anchored(lay.block)) for n, lay in u.channel_nodes.items()}
    u.consumers = [replace(c, block=anchored(c.block)) for c in u.consumers]
    u.followers = [replace(f, block=anchored(f.block)) for f in u.followers]
    if u.type == "plain":
        u.type = "concat"


def concat_layout(src: fx.Node, user: fx.Node, layout: Layout) -> Layout:
    """``torch.cat`` along the channels' dimension: the channels become a block among the entries
    of the other tensors (docs/method.md §1); along any other dimension it is a join."""
    tensors = _cat_tensors(user)
    dim = concrete(user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0))
    if layout.parts is not None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        raise Unsupported(f"channels are concatenated by `{user.name}` in a way specprune cannot follow")
    if dim % len(shape_of(user)) != layout.cdim:
        raise Unsupported(f"channels are joined with other tensors along another dimension by "
                          f"`{user.name}`; concatenating along the channels' dimension is supported")
    if sum(t is src for t in tensors) != 1:
        raise Unsupported(f"`{user.name}` concatenates the channels with themselves")
    sizes = [shape_of(t)[layout.cdim] for t in tensors]
    i = next(j for j, t in enumerate(tensors) if t is src)
    block = layout.block or Block(0, sizes[i], 0)
    return replace(layout, block=Block(sum(sizes[:i]) + block.lead, block.own,
                                       block.trail + sum(sizes[i + 1:])))


def check_concats(sp: Space) -> None:
    """A concatenation may carry the channels in one of its tensors only."""
    for node in sp.nodes:
        tensors = _cat_tensors(node) if is_concat(node) else None
        if isinstance(tensors, (list, tuple)) and sum(t in sp.nodes for t in tensors) > 1:
            fail(sp, f"`{node.name}` concatenates the channels with a copy of themselves")
            return


def is_concat(node: fx.Node) -> bool:
    """A ``torch.cat`` (or an alias of it): along the channels' dimension it makes them a block."""
    return node.op == "call_function" and listed(node.target, CONCATS)


def _cat_tensors(node: fx.Node) -> Any:
    """The tensors a concatenation joins, as the call passes them (a list or tuple, if it can be followed)."""
    return node.args[0] if node.args else node.kwargs.get("tensors")
