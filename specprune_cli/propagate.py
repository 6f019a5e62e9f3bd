"""Following one producer's channels forward through a captured graph, node by node (docs/method.md §1).

Each use of a channel-carrying tensor is classified: a dense layer that reads the channels is a
consumer (its input is the tap); a per-channel layer or parameter is a follower, sliced with the
unit; an element-wise op with a tensor from elsewhere is a join, recorded for ``joins.py`` to decide;
a registered operation (``ops.py``) carries the channels on in the layout it returns. Anything else
fails the space, with the reason. Sizes an operation gives the channels' dimension must follow a
pruned width, and Python that read the channel count (``Capture.guards``) fails the space too:
the pruned model would take another path.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from specprune_cli.capture import Capture
from specprune_cli.followers import follower_kind
from specprune_cli.joins import Space, check_concats, concat_layout, fail, is_concat, per_sample
from specprune_cli.layers import layer_kind
from specprune_cli.layout import (Layout, ModuleEntry, OpCall, Unsupported, is_tensor, is_tensors,
                                  reads_shape_of, resized_value, shape_of)
from specprune_cli.ops import (BINARY, FUNCTIONAL_LAYERS, JOINS, NEW_FROM, SHAPE_ATTRIBUTES, SHAPE_FROM_OTHER,
                               SHAPE_READS, listed, rule_for)
from specprune_cli.units import Consumer, Follower, ShapeAttr


class Propagator:
    """Follows producers' channels through one capture.

    Attributes:
        calls: module name -> how many ``call_module`` nodes call it (more than one: shared weights).
    """

    def __init__(self, model: nn.Module, cap: Capture):
        assert cap.gm is not None
        self.model, self.cap, self.gm = model, cap, cap.gm
        self.by_name = {n.name: n for n in self.gm.graph.nodes}
        self.calls: dict[str, int] = {}
        for n in self.gm.graph.nodes:
            if n.op == "call_module":
                self.calls[str(n.target)] = self.calls.get(str(n.target), 0) + 1

    def propagate(self, sp: Space) -> None:
        """Follow the producer's channels forward, filling ``sp`` (or setting ``sp.failure``)."""
        try:
            sp.nodes[sp.producer] = sp.kind.out_layout(shape_of(sp.producer))
        except Unsupported as exc:
            sp.failure = str(exc)
            return
        frontier = [sp.producer]
        while frontier and sp.failure is None:
            node = frontier.pop(0)
            for user in list(node.users):
                if user in sp.nodes:
                    continue
                try:
                    out = self._step(sp, node, user)
                except Unsupported as exc:
                    fail(sp, str(exc))
                except Exception as exc:  # noqa: BLE001 - a bug here must not stop the run: skip the unit
                    fail(sp, f"internal error while following its channels through `{user.name}` "
                              f"({type(exc).__name__}: {exc}); please report it")
                    return
                else:
                    if out is not None and sp.failure is None:
                        sp.nodes[user] = out
                        frontier.append(user)
                if sp.failure is not None:
                    return
        if sp.failure is None:
            self._check_guards(sp)
            self._check_attr_uses(sp)
            check_concats(sp)

    def _step(self, sp: Space, src: fx.Node, user: fx.Node) -> Layout | None:
        """Classify one use of a channel tensor. Returns the user's layout if channels flow on."""
        layout = sp.nodes[src]
        if user.op == "output":
            raise Unsupported("its channels reach the model output")
        if user.op == "call_module":
            return self._module(sp, src, user, layout)
        if user.op not in ("call_function", "call_method"):
            raise Unsupported(f"channels flow into an fx node of kind {user.op}")
        target = user.target
        label = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if (user.op == "call_method" and target in _NO_CHANNELS) or (
                target is getattr and user.args[1] in SHAPE_ATTRIBUTES):
            # a shape read, or a new tensor with src's dtype: no channels flow on (the uses of a shape
            # are checked by _check_guards)
            return None
        if listed(target, FUNCTIONAL_LAYERS) and any(
                isinstance(a, fx.Node) and a.op == "get_attr" for a in user.all_input_nodes):
            raise Unsupported(f"channels flow into the functional layer `{label}` (`{user.name}`) whose "
                              f"weights are module parameters; write it as {FUNCTIONAL_LAYERS[target]} to "
                              "prune it")
        if is_concat(user):
            return concat_layout(src, user, layout)
        if listed(target, JOINS):
            raise Unsupported(f"channels are joined with other tensors by `{label}` (`{user.name}`); "
                              "concatenation needs group-aware pruning, not supported yet")
        if listed(target, BINARY) or (label in ("max", "min") and _two_tensors(user)):
            return self._binary(sp, src, user, layout)
        if user.op == "call_method" and target in SHAPE_FROM_OTHER:
            if user.args[0] is not src:
                return None  # src only lends its shape or dtype
            if target != "type_as" and (len(user.args) < 2 or user.args[1] not in sp.nodes):
                raise Unsupported(f"`{user.name}` takes its shape from a tensor that does not carry the "
                                  "channels")
        rule = rule_for(user, None)
        if rule is None:
            raise Unsupported(f"channels flow into `{label}` (`{user.name}`), which is not known to keep "
                              "channel identity")
        first = user.args[0] if user.args else user.kwargs.get("input")
        if first is not src:  # rules describe what happens to their main tensor, not to the others
            raise Unsupported(f"channels enter `{label}` (`{user.name}`) as a secondary argument")
        return self._apply(sp, rule, OpCall(user, src, layout, sp.width))

    def _module(self, sp: Space, src: fx.Node, user: fx.Node, layout: Layout) -> Layout | None:
        name = str(user.target)
        mod = self.gm.get_submodule(name)
        what = f"{name} ({type(mod).__name__})"
        if name in self.cap.opaque:
            raise Unsupported(f"channels flow into {what}, which specprune cannot trace "
                              f"({self.cap.opaque[name]}); it is kept whole")
        if self.calls.get(name, 0) > 1 and any(True for _ in mod.parameters(recurse=False)):
            raise Unsupported(f"channels flow into {name}, which is called more than once (shared weights)")
        if not user.args or user.args[0] is not src:
            raise Unsupported(f"channels enter {name} as a secondary argument")
        kind = layer_kind(mod)
        if kind is not None and kind.dense(mod):
            try:
                per, columns = kind.consumer(mod, layout, shape_of(src), sp.width)
            except Unsupported as exc:
                raise Unsupported(f"{name}: {exc}") from None
            sp.consumers.append((Consumer(name, kind.name, src.name, per, columns, layout.block), user))
            return None
        if kind is not None and not mod.groups == mod.in_channels == mod.out_channels:
            raise Unsupported(f"grouped convolution {name} (groups={mod.groups}) needs group-aware pruning, "
                              "not supported yet")
        fkind = follower_kind(mod)
        if fkind is not None:
            try:
                role = fkind.check(mod, layout, sp.width)
            except Unsupported as exc:
                raise Unsupported(f"{what}: {exc}") from None
            if role is not None:
                sp.followers.append(Follower(name, role, block=layout.block))
            return layout
        rule = rule_for(user, mod)
        if rule is not None:
            return self._apply(sp, rule, OpCall(user, src, layout, sp.width, mod))
        if layer_kind(mod) is None and isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            raise Unsupported(f"channels flow into {what}, which subclasses {type(mod).__mro__[1].__name__} "
                              "with its own forward that does not compute its parent's; it is kept whole")
        raise Unsupported(f"channels flow into {what}, which does not keep channel identity or is not "
                          "supported")

    def _apply(self, sp: Space, rule: Callable[[OpCall], Layout], call: OpCall) -> Layout:
        out = rule(call)
        for entry, per, others in call.shape_entries:
            self._size_entry(sp, call.node, entry, per, others)
        return out

    def _size_entry(self, sp: Space, node: fx.Node, entry: Any, per: int, others: int) -> None:
        """The size an op gives the channels' dimension must follow a pruned width (``others``: entries
        of tensors concatenated with the channels, which stay)."""
        fixed = not isinstance(entry, fx.Node) or (entry.op == "get_attr"
                                                   and str(entry.target) in self.cap.int_attrs)
        if others and fixed and entry != -1:
            raise Unsupported(f"`{node.name}` sizes a dimension that holds the channels and other tensors' "
                              "entries with a fixed number; compute it from the tensor's shape or use -1")
        if isinstance(entry, ModuleEntry):
            self._add_attr(sp, ShapeAttr(entry.module, entry.attr, per, entry.index))
            return
        if entry == -1 and not isinstance(entry, fx.Node):
            return
        if isinstance(entry, fx.Node) and entry.op == "get_attr" and str(entry.target) in self.cap.int_attrs:
            owner, attr = self.cap.int_attrs[str(entry.target)]
            self._add_attr(sp, ShapeAttr(owner, attr, per))
            sp.attr_nodes.append(entry)
            return
        if isinstance(entry, fx.Node):
            width = sp.width - 1
            if resized_value(entry, sp.nodes, sp.width, width) == per * width + others:
                return  # computed from the channels' own shape: it follows the pruned width
            raise Unsupported(f"`{node.name}` sizes the channels' dimension with `{entry.name}`, which "
                              "does not scale with the channel count; compute it from the tensor's shape or "
                              "use -1")
        raise Unsupported(f"`{node.name}` sizes the channels' dimension with the literal {entry!r}; use -1, "
                          "compute it from x.shape, or keep it in an int attribute of the module so "
                          "specprune can rewrite it")

    def _add_attr(self, sp: Space, attr: ShapeAttr) -> None:
        key = (attr.module, attr.attr, attr.index)
        if key in sp.shape_attrs and sp.shape_attrs[key] != attr:
            raise Unsupported(f"attribute {attr.module or '<model>'}.{attr.attr} sizes the channels in two "
                              "different ways")
        sp.shape_attrs[key] = attr

    def _check_attr_uses(self, sp: Space) -> None:
        """An int attribute rewritten for this unit must size nothing else."""
        for node in sp.attr_nodes:
            others = [u for u in node.users if u not in sp.nodes]
            if others:
                owner, attr = self.cap.int_attrs[str(node.target)]
                fail(sp, f"the int attribute {owner or '<model>'}.{attr} sizes this unit's channels and is "
                          f"also used by `{others[0].name}`; specprune cannot rewrite it")

    def _check_guards(self, sp: Space) -> None:
        """Python that read the channel count (a branch, a loop, ``int(x.size(1))``) would not follow a
        pruned width: the captured graph is specialised to it."""
        for name, use in self.cap.guards.items():
            node = self.by_name.get(name)
            if node is None or not reads_shape_of(node, sp.nodes):
                continue
            if use == "len" and is_tensor(node):
                # A tensor's length is its first dimension: it follows the width if the channels are there.
                lay = sp.nodes.get(node)
                changed = lay is not None and lay.parts is None and lay.cdim == 0
            elif use == "len" and is_tensors(node):
                # How many pieces `chunk`/`split`/`unbind` gave: it follows the width only if they cut
                # along the channels.
                changed = not _cut_beside_channels(node, sp.nodes)
            elif use == "len":
                continue  # only the length of a shape or a list was read: it does not follow the width
            else:
                value = node.meta.get("value")
                try:
                    changed = any(resized_value(node, sp.nodes, sp.width, w) != value
                                  for w in {sp.width - 1, sp.width // 2, 1})
                except Unsupported:
                    changed = True
            if changed:
                fail(sp, f"Python code reads its channel count (`{node.name}`, in a branch, loop or int()); "
                          "the pruned model would take another path")
                return

    def _binary(self, sp: Space, src: fx.Node, user: fx.Node, layout: Layout) -> Layout | None:
        """An element-wise binary op: scalars and tensors broadcast along the channels keep them; a
        per-channel parameter is sliced with the unit; a tensor of the same width from elsewhere is a
        join (residual add, or a squeeze-excitation gate)."""
        others = [a for a in list(user.args) + list(user.kwargs.values()) if a is not src]
        if layout.parts is not None:
            raise Unsupported(f"`{user.name}` combines a tuple of tensors")
        sshape, oshape_out = shape_of(src), shape_of(user)
        shift = len(oshape_out) - len(sshape)
        result = layout.shifted(shift)
        for other in others:
            if not is_tensor(other):
                continue
            oshape = shape_of(other)
            pos = result.cdim - (len(oshape_out) - len(oshape))
            if not 0 <= pos < len(oshape) or oshape[pos] == 1:
                continue  # broadcast along the channels: identity kept
            if other.op == "get_attr":
                self._channel_parameter(sp, user, other, layout, pos)
                continue
            sp.joins.append((user, other, src))
            if per_sample(sshape) == sp.width and per_sample(oshape) > sp.width:
                return None  # src is a per-channel gate (squeeze-excitation): its channels end here
        return result

    def _channel_parameter(self, sp: Space, user: fx.Node, other: fx.Node, layout: Layout, dim: int) -> None:
        target = str(other.target)
        owner, _, attr = target.rpartition(".")
        holder = self.gm.get_submodule(owner)
        value = getattr(holder, attr, None)
        sliceable = isinstance(value, torch.Tensor) and value.shape[dim] == sp.width
        if target.startswith("_tensor_constant") or not layout.plain or not sliceable:
            raise Unsupported(f"channels are scaled per channel by `{target}` in `{user.name}`, which "
                              "specprune cannot slice")
        if len(other.users) > 1:
            raise Unsupported(f"the per-channel parameter `{target}` is used by more than `{user.name}`")
        if value is not getattr(self.model.get_submodule(owner), attr, None):
            raise Unsupported(f"`{target}` is not a parameter of the model")
        sp.followers.append(Follower(owner, "param", attr=attr, dim=dim))


#: methods after which no channels flow: shape reads, and new tensors that take only src's dtype
_NO_CHANNELS = SHAPE_READS | NEW_FROM
#: ops that cut their first argument into pieces along one dimension: the position of that argument
_PIECES_DIM = {"chunk": 2, "split": 2, "tensor_split": 2, "split_with_sizes": 2, "unbind": 1}


def _cut_beside_channels(node: fx.Node, tensors: Mapping[fx.Node, Layout]) -> bool:
    """``node`` cuts a tensor of the unit into pieces along a dimension that does not carry the
    channels (so how many pieces there are does not follow the width)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    position = _PIECES_DIM.get(name) if isinstance(name, str) else None
    if position is None or not node.args or not is_tensor(node.args[0]):
        return False
    lay = tensors.get(node.args[0])
    if lay is None or lay.parts is not None:
        return False
    try:  # `dim=self.dim` (an int attribute) reads as its value too
        dim = OpCall(node, node.args[0], lay, 0).arg(position, "dim", 0)
    except Unsupported:
        return False
    return isinstance(dim, int) and dim % len(shape_of(node.args[0])) != lay.cdim


def _two_tensors(node: fx.Node) -> bool:
    return len(node.args) > 1 and is_tensor(node.args[1])
