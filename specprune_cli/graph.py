"""Finding prunable units in a captured model (docs/method.md §1).

A *unit* is a set of channels created by one or more producers (Conv1d/2d/3d and ConvTranspose with
``groups == 1``, Linear), followed through everything that keeps channel identity (norms, element-wise
activations, dropout, pooling, padding, interpolation, depthwise convolution, and any data movement:
view, reshape, flatten, permute, transpose, squeeze, slicing...) up to the channel-mixing layers that
read them (the *consumers*). What arrives at a consumer's input is its *tap*: the signal the
reconstruction must reproduce. For each consumer, ``Consumer.columns`` records exactly which input
columns belong to which channel, found by running the data movement on labelled tensors
(``layout.py``), never by assuming a channel-major ``flatten``.

The model is captured by ``capture.py`` (module names survive: plans, surgery and ``exclude`` use
them); ``propagate.py`` follows each producer's channels; ``joins.py`` decides what spaces that meet
become. This module puts the units together: one per producer, or one per residual stream. Anything
that cannot be pruned safely is listed in ``UnitGraph.skipped`` with the reason; nothing here raises
on a model that runs.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from specprune_cli.capture import Capture, capture
from specprune_cli.joins import Space, anchor_blocks, resolve_joins, stream_unit
from specprune_cli.layers import layer_kind
from specprune_cli.ops import FUNCTIONAL_LAYERS, listed
from specprune_cli.propagate import Propagator
from specprune_cli.units import Consumer, Follower, Producer, ShapeAttr, Skipped, Unit, UnitGraph

# The data model lives in units.py; importing it from here keeps working.
__all__ = ["Consumer", "Follower", "Producer", "ShapeAttr", "Skipped", "Unit", "UnitGraph", "find_units"]


def find_units(model: nn.Module, example_input: torch.Tensor, exclude: Callable[[str], bool] | None = None,
               forward_kwargs: Mapping[str, Any] | None = None) -> UnitGraph:
    """Capture ``model`` and find its prunable units.

    Args:
        model: the network (left unchanged; the returned GraphModule shares its leaf modules, and
            reads its int attributes live, so surgery on the model is seen by both).
        example_input: a batch the model accepts (its first sample is used to capture the graph).
        exclude: predicate on producer names to leave unpruned (reported as skipped).
        forward_kwargs: values for ``forward``'s non-tensor arguments (``model.forward_kwargs``);
            others keep their defaults.

    Returns:
        A UnitGraph. If the model cannot be captured at all, ``gm`` is None and the reason is in
        ``skipped``.

    Raises:
        ConfigError: ``forward_kwargs`` does not fit the model's ``forward``.
    """
    cap = capture(model, example_input, forward_kwargs)
    if cap.gm is None:
        return UnitGraph(None, [], [Skipped("<model>", f"{cap.failure}; nothing pruned")], replayable=False,
                         opaque=cap.opaque)
    try:
        units, skipped = _Finder(model, cap).run(exclude)
    except Exception as exc:  # noqa: BLE001 - a bug here must not stop the run: report it, prune nothing
        reason = f"internal error while finding units ({type(exc).__name__}: {exc}); please report it"
        return UnitGraph(cap.gm, [], [Skipped("<model>", reason)], replayable=cap.replayable,
                         opaque=cap.opaque)
    return UnitGraph(cap.gm, units, skipped, replayable=cap.replayable, opaque=cap.opaque,
                     int_attrs=dict(cap.int_attrs))


class _Finder:
    """Unit assembly on one capture: producers, their propagated spaces, joins, and what is skipped."""

    def __init__(self, model: nn.Module, cap: Capture):
        assert cap.gm is not None
        self.model, self.cap, self.gm = model, cap, cap.gm
        self.nodes = list(self.gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.propagator = Propagator(model, cap)

    def run(self, exclude: Callable[[str], bool] | None) -> tuple[list[Unit], list[Skipped]]:
        spaces: list[Space] = []
        grouped: list[Skipped] = []
        seen: set[str] = set()
        for n in self.nodes:
            if n.op != "call_module" or str(n.target) in seen:
                continue  # a module called again (shared weights) is one entry
            seen.add(str(n.target))
            mod = self.gm.get_submodule(str(n.target))
            kind = layer_kind(mod)
            if kind is None or not kind.producer:
                continue
            if not kind.dense(mod):
                groups = getattr(mod, "groups", 1)
                if 1 < groups < kind.out_channels(mod) or groups != getattr(mod, "in_channels", groups):
                    grouped.append(Skipped(str(n.target), f"its output channels come from a grouped "
                                           f"convolution (groups={groups}), which needs group-aware pruning, "
                                           "not supported yet; kept whole"))
                continue
            sp = Space(n, kind.out_channels(mod), kind)
            if self.propagator.calls[str(n.target)] > 1:
                sp.failure = "module is called more than once (shared weights)"
            elif sp.width < 2:
                sp.failure = "it has a single output channel"
            else:
                self.propagator.propagate(sp)
            spaces.append(sp)
        owner: dict[fx.Node, Space] = {}
        for sp in spaces:
            for node in sp.nodes:
                owner.setdefault(node, sp)
        streams = resolve_joins(spaces, owner)
        units, skipped = [], []
        for group in streams:
            if len(group) > 1:
                unit, skip = stream_unit(group, self.index, exclude)
                units.extend([unit] if unit is not None else [])
                skipped.extend(skip)
                continue
            sp = group[0]
            name = str(sp.producer.target)
            if sp.failure == "gate":
                continue  # its rows are sliced by the unit it gates; not a unit of its own
            if sp.failure is None and not sp.consumers:
                sp.failure = "no consumer reads its channels"
            if sp.failure is None and exclude is not None and exclude(name):
                sp.failure = "excluded by config (prune.exclude)"
            if sp.failure is not None:
                skipped.append(Skipped(name, sp.failure))
                continue
            units.append(Unit(
                name=name, kind="linear" if sp.kind.name == "linear" else "conv", width=sp.width,
                channel_dim=sp.nodes[sp.producer].cdim, followers=list(sp.followers),
                consumers=[c for c, _ in sp.consumers], position=self.index[sp.producer],
                end_position=max(self.index[cn] for _, cn in sp.consumers),
                channel_nodes={n.name: lay for n, lay in sp.nodes.items()},
                shape_attrs=list(sp.shape_attrs.values())))
        units.sort(key=lambda u: u.position)
        units, unordered = anchor_blocks(units)
        skipped.extend(unordered)
        skipped.extend(grouped)
        skipped.extend(self._hidden_producers())
        skipped.extend(self._functional_layers())
        return units, skipped

    def _functional_layers(self) -> list[Skipped]:
        """Layers written as ``F.conv2d(x, self.weight)``: their weights are listed as kept whole."""
        out = []
        for n in self.nodes:
            if n.op != "call_function" or not listed(n.target, FUNCTIONAL_LAYERS):
                continue
            label = getattr(n.target, "__name__", str(n.target))
            for arg in n.all_input_nodes:
                if arg.op == "get_attr":
                    out.append(Skipped(str(arg.target), f"a weight of the functional layer `{label}` "
                                       f"(`{n.name}`); write it as {FUNCTIONAL_LAYERS[n.target]} to "
                                       "prune it"))
        return out

    def _hidden_producers(self) -> list[Skipped]:
        """Producers inside modules that could not be captured: listed so the user sees them."""
        out = []
        for name, why in self.cap.opaque.items():
            for sub, mod in self.model.get_submodule(name).named_modules():
                kind = layer_kind(mod)
                if kind is not None and kind.dense(mod):
                    out.append(Skipped(f"{name}.{sub}" if sub else name,
                                       f"inside {name}, which specprune cannot trace ({why}); kept whole"))
        return out
