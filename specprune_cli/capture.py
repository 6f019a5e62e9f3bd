"""Capturing a model as an fx graph of its own leaf modules, whatever Python its forward runs.

See docs/method.md §1.

Unit finding, surgery and the sequential statistics all speak in module names and replay the graph
node by node, so the capture is an ``fx.GraphModule`` whose ``call_module`` nodes are the model's own
leaf modules (convolutions, linears, norms, activations) and whose other nodes are the torch-level
functions and tensor methods the forward calls.

``torch.fx.symbolic_trace`` alone fails on ordinary code: ``if x.dim() == 4``, ``for i in
range(x.size(1))``, a ``mask=None`` argument. Here the tracer carries the *value* of every node along
with its proxy (one real forward pass on the example input) and answers Python's questions from the
values: a branch on a shape or a flag takes the path the example takes, and the graph records that
path. Shapes that flow into operations stay symbolic (``x.view(x.size(0), -1)`` keeps working at any
batch size). Two things are never guessed:

* a branch on tensor *values* (``if x.sum() > 0``): another input could take the other path. The
  innermost module whose forward does this is kept whole (an opaque leaf) and the trace restarts; if
  the model's own forward does it, nothing is captured and the reason says where;
* an exception while tracing a submodule (code that rejects proxies, say): that module becomes an
  opaque leaf the same way.

Non-tensor forward arguments are fixed to their defaults, or to ``forward_kwargs``. Non-bool int
attributes of the traced modules are read through ``get_attr`` nodes bound to the live attribute, so
surgery can rewrite a width held in ``self.flat_dim`` and the graph sees it.

The graph is checked against the model: on the example batch and on a batch of another size the
two must give the same outputs. A graph that only differs at the other batch size (a branch on the
batch size) is kept with ``replayable=False``: its units are right, but it must not be replayed on
other batches.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import operator
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _orig_module_call
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from specprune_cli.errors import ConfigError

#: Module classes always kept as leaves: the layers specprune reads and slices. A user subclass of
#: nn.Conv2d lives outside torch.nn, and fx would otherwise trace into its forward and lose the module.
LEAF_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase,
                                nn.GroupNorm, nn.LayerNorm, nn.PReLU, nn.Embedding, nn.MultiheadAttention,
                                nn.RNNBase)

#: Reading these off a tensor gives a shape, not data: Python may branch on them.
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
_MAX_ATTEMPTS = 64
_PLAIN = (int, float, bool, str, torch.Size, torch.dtype, torch.device, type(None))


@dataclass
class Capture:
    """What ``capture`` returns.

    Attributes:
        gm: the graph (None if nothing could be captured: see ``failure``). It shares the model's leaf
            modules; int attributes read by the graph are live views of the model's attributes.
        opaque: module name -> why it is kept whole (its code could not be captured).
        failure: why nothing was captured, or None.
        replayable: the graph gives the model's outputs on batches of other sizes too.
        int_attrs: ``get_attr`` target in ``gm`` -> (owner module name, attribute name) of an int
            attribute the forward reads (``""`` is the model itself).
        guards: node name -> "len" or "value" for the nodes Python read (a branch, a loop count,
            ``int()``; "len" where only the length was read, by ``len()`` or iteration): the
            graph is specialised to those values.
    """

    gm: fx.GraphModule | None
    opaque: dict[str, str] = field(default_factory=dict)
    failure: str | None = None
    replayable: bool = True
    int_attrs: dict[str, tuple[str, str]] = field(default_factory=dict)
    guards: dict[str, str] = field(default_factory=dict)


class _Untraceable(Exception):
    """Python asked for a value the capture must not specialise on (a tensor's content)."""


class _AttrInt(int):
    """An int attribute of a traced module, remembering where it lives (see ``_int_attributes``)."""

    owner: str
    attr: str


def forward_arguments(model: nn.Module, forward_kwargs: Mapping[str, Any] | None = None
                      ) -> tuple[str | None, dict[str, Any]]:
    """The name of ``forward``'s input and the fixed values of its other arguments.

    Args:
        model: the network.
        forward_kwargs: values for non-tensor arguments (``model.forward_kwargs``); others keep their
            defaults.

    Returns:
        (input argument name, {argument: value} for every other named argument); the name is None
        when ``forward`` takes only ``*args``.

    Raises:
        ConfigError: ``forward_kwargs`` names an argument ``forward`` does not take, or ``forward``
            needs a second argument that has no default and is not given.
    """
    forward_kwargs = dict(forward_kwargs or {})
    params = list(inspect.signature(model.forward).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    if not named or (params[0].kind == params[0].VAR_POSITIONAL):
        if forward_kwargs:
            raise ConfigError(f"model.forward_kwargs is set but {type(model).__name__}.forward takes no "
                              "named arguments; remove model.forward_kwargs")
        return None, {}
    first, rest = named[0], named[1:]
    unknown = [k for k in forward_kwargs if k not in {p.name for p in rest}]
    if unknown and not takes_any:
        names = [p.name for p in rest]
        hint = difflib.get_close_matches(unknown[0], names, n=1)
        takes = ", ".join(names) or "only the input"
        tail = f"; did you mean {hint[0]!r}?" if hint else f"; it takes {takes}"
        raise ConfigError(f"model.forward_kwargs names {unknown[0]!r}, which {type(model).__name__}.forward "
                          f"does not take{tail}")
    values: dict[str, Any] = {}
    for p in rest:
        if p.name in forward_kwargs:
            values[p.name] = forward_kwargs[p.name]
        elif p.default is not p.empty:
            values[p.name] = p.default
        else:
            raise ConfigError(f"{type(model).__name__}.forward needs argument {p.name!r}, which has no "
                              "default; specprune feeds one input tensor: set it in model.forward_kwargs if "
                              "it is not a tensor, or wrap the model in a module whose forward(x) supplies "
                              "it")
    values.update({k: v for k, v in forward_kwargs.items() if k not in values})
    return first.name, values


@contextlib.contextmanager
def _int_attributes(model: nn.Module, leaves: set[str]) -> Iterator[None]:
    """Swap the plain int attributes of the modules being traced for ``_AttrInt`` while the block runs.

    fx reads ``self.flat_dim`` as a literal; an ``_AttrInt`` still behaves as the int but tells the
    tracer where it came from, so the graph reads the attribute instead of copying its value.
    """
    swapped: list[tuple[nn.Module, str, int]] = []
    try:
        for name, mod in model.named_modules():
            if name in leaves or isinstance(mod, LEAF_TYPES) or _is_torch_leaf(mod):
                continue
            for attr, value in list(vars(mod).items()):
                if type(value) is int and not attr.startswith("_"):
                    wrapped = _AttrInt(value)
                    wrapped.owner, wrapped.attr = name, attr
                    object.__setattr__(mod, attr, wrapped)
                    swapped.append((mod, attr, value))
        yield
    finally:
        for mod, attr, value in swapped:
            if type(vars(mod).get(attr)) is _AttrInt:  # the forward may have assigned a new value
                object.__setattr__(mod, attr, value)


def _is_torch_leaf(mod: nn.Module) -> bool:
    """fx's own rule: modules of torch.nn are leaves, except Sequential."""
    return mod.__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(mod, nn.Sequential)


def _where(frames: traceback.StackSummary | None = None) -> str:
    """file:line of the innermost user frame (not torch, not this file), for messages."""
    stack = frames if frames is not None else traceback.extract_stack()
    for frame in reversed(stack):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("specprune_cli/capture.py"):
            return f"{path.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "unknown location"


class _ValueProxy(fx.Proxy):
    """A proxy that answers Python's questions from the node's value (see ``_ValueTracer.python_value``).

    It also answers ``isinstance`` as its value would: code that checks ``isinstance(x, torch.Tensor)``
    (einops, input normalisation) takes the path the real tensor takes.
    """

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        own = vars(self)  # not self.node: an Attribute creates its node lazily, through isinstance checks
        tracer, node = own.get("tracer"), own.get("node")
        value = tracer.values.get(node) if isinstance(tracer, _ValueTracer) and node is not None else None
        return type(value) if type(value) is torch.Tensor or type(value) is nn.Parameter else type(self)

    def __getattr__(self, k: str) -> "_ValueAttribute":
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        return len(self.tracer.python_value(self, "len()", length_only=True))

    def __index__(self) -> int:
        return operator.index(self.tracer.python_value(self, "an integer conversion"))

    def __int__(self) -> int:
        return int(self.tracer.python_value(self, "int()"))

    def __float__(self) -> float:
        return float(self.tracer.python_value(self, "float()"))


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    pass


class _ValueTracer(fx.Tracer):
    """fx tracing that also computes every node's value on the example input (see the module docstring)."""

    def __init__(self, example: torch.Tensor, leaves: set[str]):
        super().__init__()
        self.example = example
        self.leaves = leaves
        self.values: dict[fx.Node, Any] = {}
        self.tainted: set[fx.Node] = set()  # nodes whose value depends on tensor contents
        self.guards: dict[fx.Node, str] = {}
        self.int_attrs: dict[tuple[str, str], fx.Node] = {}
        self.arg_nodes: list[fx.Node] = []  # nodes fx makes for the fixed arguments (removed later)
        self.input_node: fx.Node | None = None
        self.output: Any = None  # the value the traced run returned
        self._building_args = False
        self._concrete = 0  # > 0 while a value is being computed: modules and attributes act normally

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or isinstance(m, LEAF_TYPES) or \
            super().is_leaf_module(m, module_qualified_name)

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            self.output = self._value(args[0])
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        self._building_args = True
        try:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        finally:
            self._building_args = False

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._concrete:
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "specprune_module"):  # the innermost module whose code failed
                exc.specprune_module = self.path_of_module(m)  # type: ignore[attr-defined]
                where = _where(traceback.extract_tb(exc.__traceback__))
                exc.specprune_where = where  # type: ignore[attr-defined]
            raise

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._concrete:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        if issubclass(type(a), fx.Proxy):  # first: a proxy claims its value's class to isinstance
            return a.node
        if isinstance(a, _AttrInt):
            key = (a.owner, a.attr)
            if key not in self.int_attrs:
                target = f"{a.owner}.{a.attr}" if a.owner else a.attr
                node = self.create_node("get_attr", target, (), {})
                self.values[node] = int(a)
                node.meta["value"] = int(a)
                self.int_attrs[key] = node
            return self.int_attrs[key]
        return super().create_arg(a)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if self._building_args:
            if kind == "placeholder" and self.input_node is None:
                self.input_node = node
                self._record(node, self.example, tainted=True)
            else:
                self.arg_nodes.append(node)
            return proxy
        value = self._evaluate(kind, target, args, kwargs)
        shape_read = (kind == "call_method" and target in _SHAPE_METHODS) or (
            kind == "call_function" and target is getattr and len(args) > 1 and args[1] in _SHAPE_ATTRIBUTES)
        tainted = isinstance(value, torch.Tensor) or (
            not shape_read and any(n in self.tainted for n in node.all_input_nodes))
        self._record(node, value, tainted)
        return proxy

    def _record(self, node: fx.Node, value: Any, tainted: bool) -> None:
        self.values[node] = value
        if tainted:
            self.tainted.add(node)
        record_meta(node, value)

    def _value(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            return self.values[a.node]
        if isinstance(a, fx.Node):
            if a not in self.values and a.op == "get_attr":  # a constant fx stored without a proxy
                return self._evaluate("get_attr", a.target, (), {})
            return self.values[a]
        if isinstance(a, tuple) and hasattr(a, "_fields"):
            return type(a)(*(self._value(x) for x in a))
        if isinstance(a, (tuple, list)):
            return type(a)(self._value(x) for x in a)
        if isinstance(a, dict):
            return {k: self._value(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self._value(a.start), self._value(a.stop), self._value(a.step))
        return a

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        a, k = self._value(tuple(args)), self._value(dict(kwargs))
        self._concrete += 1
        try:
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                return _orig_module_call(self.root.get_submodule(target), *a, **k)
            if kind == "get_attr":
                obj: Any = self.root
                for part in str(target).split("."):
                    obj = getattr(obj, part)
                return obj
            raise RuntimeError(f"unexpected fx node kind {kind}")
        finally:
            self._concrete -= 1

    def python_value(self, proxy: fx.Proxy, use: str, *, length_only: bool = False) -> Any:
        """The value behind ``proxy`` for Python to use, if it does not depend on tensor contents."""
        node = proxy.node
        if node in self.tainted:
            raise _Untraceable(f"its forward uses a tensor's values in Python ({use} at {_where()})")
        if self.guards.get(node) != "value":
            self.guards[node] = "len" if length_only else "value"
        return self.values[node]

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.python_value(obj, "`if`/`while`/`and`/`or` on a tensor"))

    def iter(self, obj: fx.Proxy) -> Iterator:  # type: ignore[override]
        value = self.values[obj.node]
        if isinstance(value, torch.Tensor):
            count = value.shape[0]  # iterating a tensor: its first dimension, a shape
        else:
            count = len(self.python_value(obj, "iteration", length_only=True))
        if obj.node not in self.guards:
            self.guards[obj.node] = "len"
        return (obj[i] for i in range(count))

    def keys(self, obj: fx.Proxy) -> Any:
        return list(self.python_value(obj, "keys()").keys())


def record_meta(node: fx.Node, value: Any) -> None:
    """Store what unit finding needs about ``value`` on ``node.meta``: ``tensor_meta`` for a tensor (as
    ShapeProp does), a tuple of them for a sequence of tensors, ``value`` for small Python values and
    small integer tensors (indices)."""
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(value)
        if not value.is_floating_point() and value.numel() <= 4096:
            node.meta["value"] = value.detach().clone()
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        node.meta["tensor_meta"] = tuple(_extract_tensor_metadata(v) for v in value)
    elif isinstance(value, _PLAIN) or (isinstance(value, (tuple, list))
                                       and all(isinstance(v, _PLAIN) for v in value)):
        node.meta["value"] = value


def _batch(example: torch.Tensor, n: int) -> torch.Tensor:
    x = example[:1]
    return x.expand(n, *x.shape[1:]).clone()


def capture(model: nn.Module, example_input: torch.Tensor, forward_kwargs: Mapping[str, Any] | None = None
            ) -> Capture:
    """Capture ``model`` as an fx graph on ``example_input`` (see the module docstring).

    The model is traced in eval mode on a batch of two copies of the first sample (unit finding needs
    a batch dimension it can tell apart) and restored to its mode afterwards.

    Args:
        model: the network.
        example_input: a batch it accepts; only its first sample is used.
        forward_kwargs: values for ``forward``'s non-tensor arguments (others keep their defaults).

    Returns:
        A Capture; ``gm`` is None with ``failure`` set if nothing could be captured.

    Raises:
        ConfigError: ``forward_kwargs`` does not fit ``forward`` (see ``forward_arguments``).
    """
    input_name, fixed = forward_arguments(model, forward_kwargs)
    if input_name is None:
        return Capture(None, failure=f"{type(model).__name__}.forward takes its input through *args, which "
                                     "specprune cannot capture; give forward a named input argument")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _capture(model, example_input, fixed)
    finally:
        model.train(was_training)


def _capture(model: nn.Module, example: torch.Tensor, fixed: dict[str, Any]) -> Capture:
    x2 = _batch(example, 2)
    try:
        expected = model(_batch(example, 1), **fixed)
    except Exception as exc:  # noqa: BLE001 - report, never raise on the user's model
        return Capture(None, failure=f"the model fails on its example input ({_short(exc)})")
    opaque: dict[str, str] = {}
    for name, mod in model.named_modules():
        if name and isinstance(mod, torch.jit.ScriptModule) and not any(name.startswith(o + ".") for o in opaque):
            opaque[name] = "it is a TorchScript module (torch.jit.script or trace), whose code fx cannot read"
    for _ in range(_MAX_ATTEMPTS):
        tracer = _ValueTracer(x2, set(opaque))
        constants_before = set(vars(model))
        try:
            with _int_attributes(model, set(opaque)):
                graph = tracer.trace(model, concrete_args=_concrete_args(model, fixed))
        except Exception as exc:  # noqa: BLE001 - decide which module to keep whole, then retry
            _drop_constants(model, constants_before)
            culprit = getattr(exc, "specprune_module", "")
            while culprit in opaque or (culprit and _is_leaf(tracer, model, culprit)):
                culprit = culprit.rpartition(".")[0]  # a leaf cannot fail on its own: blame its parent
            reason = str(exc) if isinstance(exc, _Untraceable) else \
                f"torch.fx cannot trace it: {_short(exc)} at {getattr(exc, 'specprune_where', None) or '?'}"
            if not culprit:
                return Capture(None, opaque,
                               failure=f"specprune cannot capture {type(model).__name__}.forward: {reason}")
            opaque[culprit] = reason
            continue
        try:
            gm, int_attrs = _build(model, graph, tracer)
        except Exception as exc:  # noqa: BLE001 - e.g. a constant Python code cannot spell
            return Capture(None, opaque, failure=f"specprune could not build the graph of "
                                                 f"{type(model).__name__} ({_short(exc)})")
        finally:
            _drop_constants(model, constants_before)
        guards = {n.name: use for n, use in tracer.guards.items()}
        result = Capture(gm, opaque, int_attrs=int_attrs, guards=guards)
        _check(result, model, example, fixed, expected, tracer.output)
        return result
    return Capture(None, opaque, failure=f"specprune cannot capture {type(model).__name__}: too many "
                                         "submodules fail to trace")


def _drop_constants(model: nn.Module, before: set[str]) -> None:
    """fx parks tensors created in forward on the traced module; the GraphModule has its own copies."""
    for attr in set(vars(model)) - before:
        if attr.startswith("_tensor_constant"):
            delattr(model, attr)


def _is_leaf(tracer: _ValueTracer, model: nn.Module, name: str) -> bool:
    return tracer.is_leaf_module(model.get_submodule(name), name)


def _concrete_args(model: nn.Module, fixed: dict[str, Any]) -> dict[str, Any]:
    """fx's ``concrete_args`` for the named arguments; extra keys go through ``**kwargs``."""
    params = inspect.signature(model.forward).parameters
    out = {k: v for k, v in fixed.items() if k in params}
    extra = {k: v for k, v in fixed.items() if k not in params}
    for p in params.values():
        if p.kind == p.VAR_POSITIONAL:
            out["*" + p.name] = ()
        elif p.kind == p.VAR_KEYWORD:
            out["**" + p.name] = extra
    return out


def _build(model: nn.Module, graph: fx.Graph, tracer: _ValueTracer) -> tuple[fx.GraphModule, dict]:
    """The GraphModule, without fx's placeholders and checks for the fixed arguments, reading int
    attributes live from the model."""
    for node in reversed(tracer.arg_nodes):
        graph.erase_node(node)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    int_attrs: dict[str, tuple[str, str]] = {}
    for i, ((owner, attr), node) in enumerate(sorted(tracer.int_attrs.items(), key=lambda kv: kv[1].name)):
        target = f"_specprune_int_{i}"
        holder = model.get_submodule(owner)
        # GraphModule creates one class per instance, so the property is seen by this gm only.
        setattr(type(gm), target, property(lambda _self, m=holder, a=attr: getattr(m, a)))
        node.target = target
        int_attrs[target] = (owner, attr)
    gm.recompile()
    return gm, int_attrs


def _check(result: Capture, model: nn.Module, example: torch.Tensor, fixed: dict[str, Any],
           expected: Any, traced: Any) -> None:
    """The traced run (``traced``: what the tracer computed on two copies of the sample) must give the
    model's outputs (``expected``: the model on one copy), so the graph follows the path the model
    takes; run on one copy, the graph must give them too, or it is marked not replayable. Only when
    the first check fails does the model run on two copies, to tell a graph that took another path
    from a model whose path depends on the batch size. Models are big: forward passes are counted."""
    gm = result.gm
    assert gm is not None
    first = torch.utils._pytree.tree_map(
        lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 2 else t, traced)
    if _same(first, expected, loose=True):
        try:
            result.replayable = _same(gm(_batch(example, 1)), expected, loose=True)
        except Exception:  # noqa: BLE001 - a graph that fails at another batch size is not replayable
            result.replayable = False
        return
    try:
        same = _same(traced, model(_batch(example, 2), **fixed))
    except Exception:  # noqa: BLE001 - the model itself fails on two samples: nothing to compare
        same = False
    result.replayable = False
    if not same:
        result.gm = None
        result.failure = (f"the captured graph of {type(model).__name__} does not reproduce its outputs "
                          "(its forward depends on something torch.fx cannot see, such as isinstance checks "
                          "on the input)")


def _same(a: Any, b: Any, loose: bool = False) -> bool:
    """Same structure and values. ``loose`` for runs at different batch sizes, whose kernels may sum
    in another order: a path that differs changes outputs by far more than 1e-3 of their scale. An
    OrderedDict and a dict with the same keys in the same order are the same structure (fx builds a
    plain dict where the model returns an OrderedDict, as torchvision's segmentation models do)."""
    fa, sa = torch.utils._pytree.tree_flatten(_plain_dicts(a))
    fb, sb = torch.utils._pytree.tree_flatten(_plain_dicts(b))
    if sa != sb or len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            scale = float(y.detach().abs().max()) if y.numel() and y.is_floating_point() else 1.0
            rtol, atol = (1e-3, 1e-3 * max(scale, 1e-6)) if loose else (1e-5, 1e-6)
            if x.is_floating_point() and not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
                return False
            if not x.is_floating_point() and not torch.equal(x, y):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return False
    return True


def _plain_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_dicts(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_plain_dicts(v) for v in value)
    return value


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
