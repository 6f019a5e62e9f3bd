"""Finding prunable units in a traced model (SPEC §1).

A *unit* is the set of output channels of one producer (a ``Conv2d`` with ``groups == 1`` or a
``Linear``), followed through every layer that keeps channel identity (BatchNorm, element-wise
activations, dropout, pooling, depthwise convolution, flatten) up to the channel-mixing layers that
read them (the *consumers*). The signal the reconstruction must reproduce is what arrives at a
consumer's input: that node is the consumer's *tap*.

We trace with ``torch.fx.symbolic_trace`` rather than the autograd graph because fx keeps module
names (the plan, the surgery and the user's ``exclude`` patterns all speak in module names) and gives
the call order of modules, which the sequential statistics need. Modules whose own code cannot be
traced are kept as opaque leaves; channels that flow into them are reported, not pruned.

Anything that cannot be pruned safely is listed in ``UnitGraph.skipped`` with the reason; nothing here
raises on a model that runs.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.ops import stochastic_depth

# -- registry of layers that keep channel identity -------------------------------------------------

#: role of a module type on the channel path: "elementwise" (no parameters per channel),
#: "spatial" (pooling: needs channels on dim 1), "batchnorm" (per-channel parameters, dim 1).
CHANNELWISE_MODULES: dict[type, str] = {}


def register_channelwise(role: str) -> Callable[[type], type]:
    """Class decorator / function registering a module type that keeps channel identity.

    Args:
        role: "elementwise", "spatial" or "batchnorm".

    Returns:
        A decorator that records the class and returns it unchanged.
    """
    if role not in ("elementwise", "spatial", "batchnorm"):
        raise ValueError(f"unknown role {role!r}; supported: elementwise, spatial, batchnorm")

    def decorate(cls: type) -> type:
        CHANNELWISE_MODULES[cls] = role
        return cls

    return decorate


for _cls in (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
             nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
             nn.Dropout2d, nn.AlphaDropout, nn.Hardtanh, nn.SELU, nn.CELU):
    register_channelwise("elementwise")(_cls)
for _cls in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
    register_channelwise("spatial")(_cls)
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d):
    register_channelwise("batchnorm")(_cls)

_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish,
    F.softplus, F.dropout, F.hardtanh, F.selu, F.celu, torch.relu, torch.sigmoid, torch.tanh,
    F.sigmoid, F.tanh, torch.nn.functional.dropout2d, stochastic_depth, torch.relu_, F.relu_, F.leaky_relu_,
    F.elu_, F.hardtanh_,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone"}
_SPATIAL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_BINARY_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv, operator.iadd,
                     operator.imul, torch.add, torch.mul, torch.sub, torch.div}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "div"}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_IGNORED_USERS_METHODS = {"size", "dim"}  # read shape only: no channel flows through them


@dataclass(frozen=True)
class Consumer:
    """A channel-mixing layer that reads a unit's channels.

    Attributes:
        module: qualified module name.
        kind: "conv" or "linear".
        tap: name of the fx node that is the consumer's input (where statistics are taken).
        spatial: for a Linear after flatten, the number of consecutive features each channel owns
            (H*W); 1 otherwise.
    """

    module: str
    kind: str
    tap: str
    spatial: int = 1


@dataclass(frozen=True)
class Follower:
    """A layer whose per-channel parameters are sliced with the unit: role "batchnorm",
    "depthwise" (conv with groups == channels) or "rows" (a gate producer, e.g. SE's second conv)."""

    module: str
    role: str


@dataclass
class Unit:
    """One prunable unit: a producer, the layers that follow its channels, and its consumers.

    Attributes:
        position: index of the producer's node in the traced graph.
        end_position: index of the last consumer's node.
        channel_nodes: fx node name -> (channel dim, features per channel after a flatten, else None)
            for every node that carries the unit's channels, the producer included: slicing such a
            value to the kept channels gives what the pruned network computes, as long as its inputs
            were unchanged or sliced alike (``SegmentRunner`` relies on this).
    """

    name: str
    kind: str
    width: int
    channel_dim: int
    followers: list[Follower] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    position: int = 0
    end_position: int = 0
    channel_nodes: dict[str, tuple[int, int | None]] = field(default_factory=dict)

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
    """The traced model with its units (in topological order) and the producers it skipped."""

    gm: fx.GraphModule | None
    units: list[Unit]
    skipped: list[Skipped]

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)


class _LeafTracer(fx.Tracer):
    """The default tracer, plus extra modules kept opaque because their code does not trace."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> tuple[fx.GraphModule, set[str]]:
    """Symbolically trace ``model``; modules whose code does not trace become opaque leaves.

    Returns:
        The GraphModule and the set of module names kept opaque.

    Raises:
        torch.fx.proxy.TraceError and friends if even the top level does not trace.
    """
    try:
        return fx.symbolic_trace(model), set()
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to finding the culprits
        pass
    leaves: set[str] = set()
    # Bottom-up: a module fails if its own forward does not trace with the failing children as leaves.
    names = [n for n, _ in model.named_modules() if n]
    for name in sorted(names, key=lambda n: -n.count(".")):
        sub = model.get_submodule(name)
        if fx.Tracer().is_leaf_module(sub, name):
            continue
        prefix = name + "."
        inner = {n[len(prefix):] for n in leaves if n.startswith(prefix)}
        try:
            _LeafTracer(inner).trace(sub)
        except Exception:  # noqa: BLE001 - this module's python control flow is not traceable
            leaves.add(name)
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(model)
    return fx.GraphModule(model, graph), leaves


def _meta_shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


@dataclass
class _Space:
    """Propagation state of one producer's channels through the graph."""

    producer: fx.Node
    width: int
    kind: str
    nodes: dict[fx.Node, tuple[int, int | None]] = field(default_factory=dict)  # node -> (cdim, flat)
    followers: list[Follower] = field(default_factory=list)
    consumers: list[tuple[Consumer, fx.Node]] = field(default_factory=list)
    joins: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (op node, other operand)
    failure: str | None = None


def find_units(model: nn.Module, example_input: torch.Tensor,
               exclude: Callable[[str], bool] | None = None) -> UnitGraph:
    """Trace ``model`` and find its prunable units.

    Args:
        model: the network (left unchanged; the returned GraphModule shares its leaf modules, so
            surgery on those modules is seen by both).
        example_input: a batch the model accepts (used for shape propagation only).
        exclude: predicate on producer names to leave unpruned (reported as skipped).

    Returns:
        A UnitGraph. If the model cannot be traced at all, ``gm`` is None and the reason is in
        ``skipped``.
    """
    try:
        gm, opaque = trace(model)
    except Exception as exc:  # noqa: BLE001 - untraceable: report, never raise on a model that runs
        return UnitGraph(None, [], [Skipped("<model>", f"not traceable by torch.fx ({type(exc).__name__}: "
                                                        f"{str(exc).splitlines()[0][:200]}); nothing pruned")])
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    finally:
        gm.train(was_training)

    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    module_calls: dict[str, int] = {}
    for n in nodes:
        if n.op == "call_module":
            module_calls[str(n.target)] = module_calls.get(str(n.target), 0) + 1

    spaces: list[_Space] = []
    skipped: list[Skipped] = []
    for n in nodes:
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, nn.Conv2d) and mod.groups == 1:
            sp = _Space(n, mod.out_channels, "conv")
        elif isinstance(mod, nn.Linear):
            sp = _Space(n, mod.out_features, "linear")
        else:
            continue
        if module_calls[str(n.target)] > 1:
            sp.failure = "module is called more than once (shared weights)"
        else:
            _propagate(gm, sp, module_calls, opaque)
        spaces.append(sp)

    owner: dict[fx.Node, _Space] = {}
    for sp in spaces:
        for node in sp.nodes:
            owner.setdefault(node, sp)
    _resolve_joins(spaces, owner)

    units: list[Unit] = []
    for sp in spaces:
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
        cdim = next(iter(sp.nodes.values()))[0]
        units.append(Unit(
            name=name, kind=sp.kind, width=sp.width, channel_dim=cdim,
            followers=list(sp.followers), consumers=[c for c, _ in sp.consumers],
            position=index[sp.producer], end_position=max(index[cn] for _, cn in sp.consumers),
            channel_nodes={n.name: where for n, where in sp.nodes.items()}))
    return UnitGraph(gm, units, skipped)


def _propagate(gm: fx.GraphModule, sp: _Space, module_calls: dict[str, int], opaque: set[str]) -> None:
    """Follow the producer's channels forward, filling ``sp`` (or setting ``sp.failure``)."""
    shape = _meta_shape(sp.producer)
    if shape is None:
        sp.failure = "output shape unknown after tracing"
        return
    cdim = 1 if sp.kind == "conv" else len(shape) - 1
    sp.nodes[sp.producer] = (cdim, None)
    frontier = [sp.producer]
    while frontier and sp.failure is None:
        node = frontier.pop(0)
        node_cdim, flat = sp.nodes[node]
        for user in list(node.users):
            if user in sp.nodes:
                continue
            out = _step(gm, sp, node, user, node_cdim, flat, module_calls, opaque)
            if sp.failure is not None:
                return
            if out is not None:
                sp.nodes[user] = out
                frontier.append(user)


def _fail(sp: _Space, reason: str) -> None:
    if sp.failure is None:
        sp.failure = reason


def _step(gm: fx.GraphModule, sp: _Space, src: fx.Node, user: fx.Node, cdim: int, flat: int | None,
          module_calls: dict[str, int], opaque: set[str]) -> tuple[int, int | None] | None:
    """Classify one use of a channel tensor. Returns the user's (cdim, flat) if channels flow on."""
    op = user.op
    if op == "output":
        _fail(sp, "its channels reach the model output")
        return None
    if op == "call_module":
        name = str(user.target)
        mod = gm.get_submodule(name)
        if name in opaque:
            _fail(sp, f"channels flow into {name} ({type(mod).__name__}), whose code torch.fx cannot trace")
            return None
        if module_calls.get(name, 0) > 1 and any(True for _ in mod.parameters(recurse=False)):
            _fail(sp, f"channels flow into {name}, which is called more than once (shared weights)")
            return None
        if user.args[0] is not src:
            _fail(sp, f"channels enter {name} as a secondary argument")
            return None
        spatial_ok = flat is None and cdim == 1
        if isinstance(mod, nn.Conv2d):
            if not spatial_ok:
                _fail(sp, f"{name} reads a reshaped tensor")
            elif mod.groups == 1:
                sp.consumers.append((Consumer(name, "conv", src.name), user))
            elif mod.groups == mod.in_channels == mod.out_channels:
                sp.followers.append(Follower(name, "depthwise"))
                return (cdim, None)
            else:
                _fail(sp, f"grouped convolution {name} (groups={mod.groups}) needs group-aware pruning, "
                          "not supported yet")
            return None
        if isinstance(mod, nn.Linear):
            ndim = len(_meta_shape(src) or ())
            if cdim != ndim - 1:
                _fail(sp, f"{name} (Linear) reads a dimension other than the channels")
            else:
                sp.consumers.append((Consumer(name, "linear", src.name, flat or 1), user))
            return None
        if isinstance(mod, nn.Flatten):
            return _flatten(sp, src, user, cdim, flat, mod.start_dim, mod.end_dim)
        role = CHANNELWISE_MODULES.get(type(mod))
        if role == "elementwise":
            return (cdim, flat)
        if role in ("spatial", "batchnorm") and spatial_ok:
            if role == "batchnorm":
                sp.followers.append(Follower(name, "batchnorm"))
            return (cdim, flat)
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters == 1:
                return (cdim, flat)
            if spatial_ok:
                sp.followers.append(Follower(name, "prelu"))
                return (cdim, flat)
        _fail(sp, f"channels flow into {name} ({type(mod).__name__}), which does not keep channel identity "
                  "or is not supported")
        return None
    if op in ("call_function", "call_method"):
        target = user.target
        label = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if op == "call_method" and target in _IGNORED_USERS_METHODS:
            return None
        if op == "call_function" and target is getattr:
            return None  # x.shape and friends
        if (op == "call_function" and target in _ELEMENTWISE_FUNCTIONS) or \
                (op == "call_method" and target in _ELEMENTWISE_METHODS):
            if user.args[0] is not src:
                _fail(sp, f"channels enter {label} as a secondary argument")
                return None
            return (cdim, flat)
        if op == "call_function" and target in _SPATIAL_FUNCTIONS:
            if flat is None and cdim == 1 and user.args[0] is src:
                return (cdim, flat)
        if (op == "call_function" and target in _FLATTEN_FUNCTIONS) or \
                (op == "call_method" and target in _FLATTEN_METHODS):
            if user.args[0] is src:
                return _flatten(sp, src, user, cdim, flat, None, None)
        if (op == "call_function" and target in _BINARY_FUNCTIONS) or \
                (op == "call_method" and target in _BINARY_METHODS):
            return _binary(sp, src, user, cdim, flat, label)
        _fail(sp, f"channels flow into `{label}`, which is not known to keep channel identity")
        return None
    _fail(sp, f"channels flow into an fx node of kind {op}")
    return None


def _flatten(sp: _Space, src: fx.Node, user: fx.Node, cdim: int, flat: int | None,
             start_dim: int | None, end_dim: int | None) -> tuple[int, int | None] | None:
    """Accept a flatten that turns (N, C, *spatial) into (N, C * prod(spatial)), channel-major."""
    in_shape, out_shape = _meta_shape(src), _meta_shape(user)
    if flat is not None or cdim != 1 or in_shape is None or out_shape is None or len(out_shape) != 2:
        _fail(sp, f"channels are reshaped by `{user.name}` in a way not supported")
        return None
    per_channel = 1
    for s in in_shape[2:]:
        per_channel *= s
    if out_shape[0] != in_shape[0] or out_shape[1] != in_shape[1] * per_channel:
        _fail(sp, f"channels are reshaped by `{user.name}` into {list(out_shape)}, not flattened per sample")
        return None
    return (1, per_channel)


def _binary(sp: _Space, src: fx.Node, user: fx.Node, cdim: int, flat: int | None, label: str
            ) -> tuple[int, int | None] | None:
    """An element-wise binary op: scalars and broadcast per-sample constants keep channels; a tensor
    of the same width from elsewhere is a join (residual add, or a squeeze-excitation gate)."""
    others = [a for a in list(user.args) + list(user.kwargs.values()) if a is not src]
    if any(a is src for a in others):
        return (cdim, flat)
    tensor_others = [a for a in others if isinstance(a, fx.Node) and _meta_shape(a) is not None]
    for other in tensor_others:
        oshape = _meta_shape(other) or ()
        sshape = _meta_shape(src) or ()
        channel_size = None
        if oshape and len(oshape) == len(sshape):
            channel_size = oshape[cdim]
        elif oshape and len(oshape) < len(sshape) and len(sshape) - cdim <= len(oshape):
            channel_size = oshape[len(oshape) - (len(sshape) - cdim)]
        if channel_size in (None, 1) or not oshape:
            continue  # broadcast along channels: identity kept
        if other.op == "get_attr":
            _fail(sp, f"channels are scaled per channel by parameter `{other.target}` in `{user.name}`")
            return None
        sp.joins.append((user, other))
        if _per_sample(sshape) == sp.width and _per_sample(oshape) > sp.width:
            return None  # src is a per-channel gate (squeeze-excitation): its channels end here
    return (cdim, flat)


def _per_sample(shape: tuple[int, ...]) -> int:
    total = 1
    for s in shape[1:]:
        total *= s
    return total


def _resolve_joins(spaces: list[_Space], owner: dict[fx.Node, _Space]) -> None:
    """Decide every join: a squeeze-excitation gate is absorbed; anything else leaves both unpruned."""
    for sp in spaces:
        for op_node, other in sp.joins:
            if other in sp.nodes:
                continue
            gate = owner.get(other)
            if gate is not None and gate is not sp and _is_gate(gate, other, op_node):
                continue
            if gate is not None and gate is not sp and _is_gate(sp, _operand_in(sp, op_node), op_node):
                # sp itself is the gate of `gate`: the gated space absorbs it in its own turn.
                sp.failure = "gate"
                continue
            if sp.failure in (None,):
                what = f"the output of {gate.producer.target}" if gate is not None else f"`{other.name}`"
                sp.failure = (f"residual stream: its channels are joined with {what} by `{op_node.name}`; "
                              "group-aware pruning is not supported yet")
            if gate is not None and gate.failure is None:
                gate.failure = (f"residual stream: its channels are joined with the output of "
                                f"{sp.producer.target} by `{op_node.name}`; group-aware pruning is not "
                                "supported yet")
    for sp in spaces:
        if sp.failure is not None:
            continue
        for op_node, other in sp.joins:
            gate = owner.get(other)
            if other in sp.nodes or gate is None or gate is sp:
                continue
            sp.followers.append(Follower(str(gate.producer.target), "rows"))
            sp.followers.extend(gate.followers)
            gate.failure = "gate"


def _operand_in(sp: _Space, op_node: fx.Node) -> fx.Node | None:
    for a in op_node.args:
        if isinstance(a, fx.Node) and a in sp.nodes:
            return a
    return None


def _is_gate(sp: _Space, operand: fx.Node | None, op_node: fx.Node) -> bool:
    """True if ``sp`` only exists to scale another space per channel (squeeze-excitation): it has no
    consumers, its single join is ``op_node``, and its tensor is one value per (sample, channel)."""
    if operand is None or sp.consumers or len(sp.joins) != 1 or sp.joins[0][0] is not op_node:
        return False
    if sp.failure not in (None, "gate"):
        return False
    return _per_sample(_meta_shape(operand) or ()) == sp.width and sp.kind == "conv"
