"""Replaying the captured graph stretch by stretch, for the sequential order (docs/method.md §6).

The traced graph is executed node by node over the cached calibration batches, keeping the values
alive at the current cut. A unit's stretch runs from its producer to its taps (the consumers' inputs,
read as they are computed; the consumers do not run). After the unit is pruned, the cached values that
carry its channels are sliced to the kept ones, which is exactly what the pruned producer and its
per-channel followers would compute, so the run goes on from there and each layer is computed once in
all. Where a value alive at the cut was changed by the pruning in another way (a consumer's output
read before the taps, a gate fed by a consumer, a shape read off the channels), the cut moves back to
where nothing changed yet, at worst to the producer, which then runs again.
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from specprune_cli.graph import Unit

# The runner replays stretches of the graph on cached tensors; an in-place op would change a cached
# value and the replay would apply it twice (x += y). Replays use the out-of-place form instead.
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}


@contextlib.contextmanager
def no_inplace_modules(model: nn.Module) -> Iterator[None]:
    """Turn off ``inplace`` on modules (ReLU(inplace=True), ...) while the block runs; restored after."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    try:
        for m in changed:
            m.inplace = False
        yield
    finally:
        for m in changed:
            m.inplace = True


class SegmentRunner:
    """Run a traced graph stretch by stretch over cached batches, keeping the values alive at the cut.

    Attributes:
        position: index of the first graph node not yet computed for the cached state.
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[torch.Tensor], *, root: nn.Module | None = None,
                 int_attrs: Mapping[str, tuple[str, str]] | None = None):
        """Args:
            gm: the captured graph.
            batches: the cached inputs.
            root: the modules to run the graph's nodes on, if not ``gm``'s own: the model the graph was
                captured from, whose parameters surgery replaces (``gm`` keeps its own references to
                those read by get_attr), or a copy of it (the untouched original beside the pruned
                network).
            int_attrs: with ``root``, the graph's int attributes (``UnitGraph.int_attrs``), read from
                ``root``'s modules.
        """
        self.gm = gm
        self.root = root if root is not None else gm
        self.int_attrs = dict(int_attrs or {}) if root is not None else {}
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=self.index[n]) for n in self.nodes}
        self.position = 0
        self.cache: list[dict[fx.Node, Any]] = [{} for _ in batches]
        self.inputs = list(batches)

    def run(self, stop: int, *, snapshot_at: int | None = None,
            visit: Mapping[str, Callable[[Any], None]] | None = None) -> None:
        """Compute nodes ``[position, stop)`` for every batch (hooks on modules fire as usual).

        Args:
            stop: index after the last node to run.
            snapshot_at: if given (``position <= snapshot_at <= stop``), the values alive just before
                node ``snapshot_at`` become the new cache and ``position`` moves there; otherwise
                the state is left where it was (the run only served the hooks).
            visit: node name -> function called with that node's value for each batch, as it is
                computed (how the sequential order reads a tap without running its consumers).
        """
        self.check(stop, snapshot_at)
        self.commit(snapshot_at, [self.run_batch(b, stop, snapshot_at=snapshot_at, visit=visit)
                                  for b in range(len(self.cache))])

    def check(self, stop: int, snapshot_at: int | None) -> None:
        """Raise ValueError unless ``position <= snapshot_at <= stop``."""
        if snapshot_at is not None and not self.position <= snapshot_at <= stop:
            raise ValueError(f"snapshot {snapshot_at} outside [{self.position}, {stop}]")

    def run_batch(self, b: int, stop: int, *, snapshot_at: int | None = None,
                  visit: Mapping[str, Callable[[Any], None]] | None = None) -> dict[fx.Node, Any]:
        """``run`` for batch ``b`` alone, without moving the cut: returns that batch's new cache entry,
        for ``commit`` once every batch ran (two runners can so go batch by batch in lockstep)."""
        env0 = self.cache[b]
        env = dict(env0)
        snap = None
        with torch.no_grad():
            for i in range(self.position, stop):
                if i == snapshot_at:
                    snap = {n: v for n, v in env.items() if self.last_use[n] >= i}
                node = self.nodes[i]
                env[node] = self._run_node(node, env, b)
                if visit and node.name in visit:
                    visit[node.name](env[node])
                for arg in node.all_input_nodes:
                    if self.last_use[arg] <= i:
                        env.pop(arg, None)
        if snapshot_at == stop:
            snap = {n: v for n, v in env.items() if self.last_use[n] >= stop}
        return snap if snap is not None else env0

    def commit(self, snapshot_at: int | None, cache: list[dict[fx.Node, Any]]) -> None:
        """Make ``cache`` (one ``run_batch`` result per batch) current, the cut at ``snapshot_at``
        (None: the run only served its visitors and the state stays)."""
        if snapshot_at is not None:
            self.cache = cache
            self.position = snapshot_at

    def resume_point(self, unit: Unit, limit: int) -> int:
        """The latest cut in ``[unit.position, limit]`` at which ``narrow(unit, keep)`` makes the cache
        exactly what the pruned network computes.

        A value computed from the producer on is *sliced* if it carries the unit's channels and its
        inputs are unchanged or sliced themselves; anything else computed from the producer's output is
        *changed* (a consumer's output, a gate fed by one, a shape read off the channels). A cut works
        if no changed value is alive across it.
        """
        sliced: set[fx.Node] = set()
        changed: set[fx.Node] = set()
        for i in range(unit.position, limit):
            node = self.nodes[i]
            if i == unit.position:
                sliced.add(node)
                continue
            inputs = node.all_input_nodes
            if not any(n in sliced or n in changed for n in inputs):
                continue  # does not depend on the producer
            if node.name in unit.channel_nodes and not any(n in changed for n in inputs):
                sliced.add(node)
            else:
                changed.add(node)
        for cut in range(limit, unit.position, -1):
            if not any(self.index[n] < cut <= self.last_use[n] for n in changed):
                return cut
        return unit.position

    def narrow(self, unit: Unit, keep: torch.Tensor) -> None:
        """Slice the cached values that carry ``unit``'s channels to ``keep`` (after its surgery)."""
        for env in self.cache:
            for node, value in env.items():
                where = unit.channel_nodes.get(node.name)
                if where is not None:
                    env[node] = where.keep(value, keep)

    def _run_node(self, node: fx.Node, env: dict[fx.Node, Any], b: int) -> Any:
        if node.op == "placeholder":
            return self.inputs[b]
        if node.op == "output":
            return None
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "get_attr":
            target = str(node.target)
            if target in self.int_attrs:
                owner, attr = self.int_attrs[target]
                return getattr(self.root.get_submodule(owner), attr)
            try:
                return _attribute(self.root, target)
            except AttributeError:  # a constant fx made on the graph module itself
                return _attribute(self.gm, target)
        if node.op == "call_function":
            if kwargs.get("inplace") is True:
                kwargs = {**kwargs, "inplace": False}
            return _OUT_OF_PLACE.get(node.target, node.target)(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            name = str(node.target)
            if name.endswith("_") and not name.endswith("__") and hasattr(self_obj, name[:-1]):
                name = name[:-1]
            return getattr(self_obj, name)(*rest, **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        raise RuntimeError(f"unknown fx node kind {node.op}")


def _attribute(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
