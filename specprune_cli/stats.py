"""Streaming second moments at the units' taps (SPEC §2, §6).

Two ways to gather them:

* ``observe`` + ``collect_oneshot``: forward pre-hooks on the consumers of every unit, one pass over
  the calibration data through the unmodified network.
* ``SegmentRunner``: the sequential order. The traced graph is executed node by node over the cached
  calibration batches; the values alive at the current cut are kept, so after a unit is pruned the run
  resumes at its producer instead of starting from the input again, and it stops at the unit's taps
  (the consumers' inputs, read as they are computed) instead of running the consumers. Each layer is
  computed about twice in all (once to gather a unit's statistics, once more after its surgery), not
  once per unit.

Hooks always live in a context manager and are removed in ``finally``.
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from specprune_cli.errors import StatisticsError
from specprune_cli.graph import Unit
from specprune_cli.spectral import SecondMoment

TapKey = tuple[str, str]  # (unit name, tap node name)

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


def tap_rows(x: torch.Tensor, unit: Unit, spatial: int) -> torch.Tensor:
    """Reshape a consumer's input into the layout ``SecondMoment.update`` expects (N, C, *positions).

    Args:
        x: the tensor arriving at the consumer.
        unit: the unit whose channels it carries.
        spatial: H*W features per channel for a Linear after flatten, else 1.
    """
    x = x.detach()
    if spatial > 1:  # flatten -> Linear: channel c owns `spatial` consecutive features
        return x.reshape(x.shape[0], -1, spatial)
    if unit.kind == "linear" or x.dim() == 2:
        return x.reshape(-1, x.shape[-1])
    return x


def tap_reader(unit: Unit, tap: str, acc: SecondMoment) -> Callable[[torch.Tensor], None]:
    """A function that adds the value of ``unit``'s ``tap`` (a consumer's input) to ``acc``."""
    consumer = next(c for c in unit.consumers if c.tap == tap)

    def read(x: torch.Tensor) -> None:
        try:
            acc.update(tap_rows(x, unit, consumer.spatial))
        except StatisticsError as exc:
            raise StatisticsError(f"at the input of {consumer.module} (unit {unit.name}): {exc}") from None

    return read


def new_moments(units: Sequence[Unit], *, max_positions: int | None, seed: int) -> dict[TapKey, SecondMoment]:
    """One empty accumulator per (unit, tap)."""
    out: dict[TapKey, SecondMoment] = {}
    for u in units:
        for tap in u.taps:
            out[(u.name, tap)] = SecondMoment(u.width, max_positions=max_positions, seed=seed)
    return out


@contextlib.contextmanager
def observe(gm: fx.GraphModule, units: Sequence[Unit], moments: dict[TapKey, SecondMoment]) -> Iterator[None]:
    """Accumulate each unit's taps while the block is active, with pre-hooks on one consumer per tap.

    The hooks are removed when the block exits, also on error.
    """
    handles = []
    try:
        for u in units:
            for tap in u.taps:
                consumer = next(c for c in u.consumers if c.tap == tap)
                read = tap_reader(u, tap, moments[(u.name, tap)])
                handles.append(gm.get_submodule(consumer.module).register_forward_pre_hook(
                    lambda _mod, args, read=read: read(args[0])))
        yield
    finally:
        for h in handles:
            h.remove()


def collect_oneshot(gm: fx.GraphModule, units: Sequence[Unit], batches: Iterable[torch.Tensor], *,
                    max_positions: int | None, seed: int, progress: Any = None) -> dict[TapKey, SecondMoment]:
    """All units' statistics from the unmodified network in one pass (SPEC §6 ``oneshot``)."""
    moments = new_moments(units, max_positions=max_positions, seed=seed)
    with observe(gm, units, moments), torch.no_grad():
        for x in batches:
            gm(x)
            if progress is not None:
                progress.update(1)
    return moments


class SegmentRunner:
    """Run a traced graph stretch by stretch over cached batches, keeping the values alive at the cut.

    Attributes:
        position: index of the first graph node not yet computed for the cached state.
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[torch.Tensor]):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in self.nodes}
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
        start = self.position
        if snapshot_at is not None and not start <= snapshot_at <= stop:
            raise ValueError(f"snapshot {snapshot_at} outside [{start}, {stop}]")
        new_cache: list[dict[fx.Node, Any]] = []
        with torch.no_grad():
            for b, env0 in enumerate(self.cache):
                env = dict(env0)
                snap = None
                for i in range(start, stop):
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
                new_cache.append(snap if snap is not None else env0)
        if snapshot_at is not None:
            self.cache = new_cache
            self.position = snapshot_at

    def _run_node(self, node: fx.Node, env: dict[fx.Node, Any], b: int) -> Any:
        if node.op == "placeholder":
            return self.inputs[b]
        if node.op == "output":
            return None
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
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
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        raise RuntimeError(f"unknown fx node kind {node.op}")
