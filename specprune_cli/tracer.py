"""The fx tracer behind ``capture.py``: every node carries its value on the example input.

See docs/method.md §1.

``torch.fx.symbolic_trace`` alone fails on ordinary code: ``if x.dim() == 4``, ``for i in
range(x.size(1))``, a ``mask=None`` argument. ``ValueTracer`` carries the *value* of every node along
with its proxy (one real forward pass on the example input) and answers Python's questions from the
values: a branch on a shape or a flag takes the path the example takes, and the graph records that
path (``ValueTracer.guards``). So does a branch on a tensor that only shapes and constants made (a
causal mask built from ``x.size(1)`` and compared with another). Shapes that flow into operations stay
symbolic (``x.view(x.size(0), -1)`` keeps working at any batch size). A question about the values of a
tensor made from the data, the weights or chance (``if x.sum() > 0``) raises ``Untraceable``:
``capture.py`` decides which module to keep whole.

Non-bool int attributes of the traced modules are read through ``get_attr`` nodes bound to the live
attribute (``leaves.int_attributes``), so surgery can rewrite a width held in ``self.flat_dim`` and the
graph sees it.
"""
from __future__ import annotations

import itertools
import operator
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _orig_module_call
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from specprune_cli import trace_patches
from specprune_cli.leaves import LEAF_TYPES, AttrInt, is_torch_leaf
from specprune_cli.ops import SHAPE_ATTRIBUTES, SHAPE_FUNCTIONS, SHAPE_READS, listed

#: Tensors that chance makes: never read in Python, even when only shapes made them.
RANDOM_FUNCTIONS = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.bernoulli,
                    torch.multinomial, torch.poisson, torch.rand_like, torch.randn_like, torch.randint_like}
RANDOM_METHODS = {"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_",
                  "log_normal_", "bernoulli", "multinomial"}

#: The capture's own code, never named as the place a model's forward fails.
_CAPTURE_FILES = ("specprune_cli/capture.py", "specprune_cli/tracer.py", "specprune_cli/leaves.py",
                  "specprune_cli/trace_patches.py")
#: Python values a proxy may hash as (``_ValueProxy.__hash__``).
_HASHABLE = (int, str, torch.Size, torch.dtype, torch.device)
#: Values small enough to keep on ``node.meta`` (``record_meta``).
_PLAIN = (int, float, bool, str, torch.Size, torch.dtype, torch.device, type(None))


class Untraceable(Exception):
    """Python asked for a value the capture must not specialise on (a tensor's content)."""


def _where(frames: traceback.StackSummary | None = None) -> str:
    """file:line of the innermost user frame (not torch, not the capture), for messages."""
    stack = frames if frames is not None else traceback.extract_stack()
    for frame in reversed(stack):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith(_CAPTURE_FILES):
            return f"{path.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "unknown location"


class _ValueProxy(fx.Proxy):
    """A proxy that answers Python's questions from the node's value (see ``ValueTracer.python_value``).

    It also answers ``isinstance`` as its value would, while ``ValueTracer.trace`` runs: code that
    checks ``isinstance(x, torch.Tensor)`` (einops, input normalisation) takes the path the real tensor
    takes. That is done in Python's ``isinstance`` alone (``trace_patches``, through ``value_type``).
    """

    def _own(self, make_node: bool = False) -> tuple[Any, Any]:
        """(the node, its value), or (None, None) for a proxy no ValueTracer made. An Attribute
        (``x.ndim``) makes its node lazily: only with ``make_node``, else it has none yet."""
        own = vars(self)
        tracer = own.get("tracer")
        node = self.node if make_node and type(tracer) is ValueTracer else own.get("node")
        if type(tracer) is not ValueTracer or node is None:
            return None, None
        return node, tracer.values.get(node)

    def value_type(self) -> type | None:
        """The class of the node's value if it is a tensor or a parameter, else None."""
        value = self._own()[1]
        return type(value) if type(value) is torch.Tensor or type(value) is nn.Parameter else None

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

    def __hash__(self) -> int:
        """A shape or a flag hashes as its value, so it can look up a dict (einops: ``recipes[x.ndim]``;
        the lookup's ``==`` then reads the value, as a branch does). Anything else hashes as itself."""
        node, value = self._own(make_node=True)
        if isinstance(value, _HASHABLE) and node not in self.tracer.tainted:
            return hash(self.tracer.python_value(self, "a dict lookup"))
        return object.__hash__(self)


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    pass


class ValueTracer(fx.Tracer):
    """fx tracing that also computes every node's value on the example input (see the module docstring)."""

    def __init__(self, example: torch.Tensor, leaves: set[str]):
        super().__init__()
        # A buffer read in forward is a node, as a parameter is: `self.position_ids[:, :n].expand(b, n)`
        # (Hugging Face's embeddings) calls methods with proxy sizes, which only a proxy can take.
        self.proxy_buffer_attributes = True
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

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with trace_patches.patched(self._factory_call):
            return super().trace(root, concrete_args)

    def _factory_call(self, function: Any, args: tuple, kwargs: dict) -> fx.Proxy | None:
        """A torch factory called with a proxy among its arguments becomes a node (see trace_patches)."""
        if self._concrete or not any(isinstance(a, fx.Proxy)
                                     for a in torch.utils._pytree.tree_leaves((args, kwargs))):
            return None
        return self.create_proxy("call_function", function, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or isinstance(m, LEAF_TYPES) or is_torch_leaf(m)

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
        if self.submodule_paths is not None and m not in self.submodule_paths:
            # made in forward (`nn.ReLU()(x)`, as DistilBERT does): without parameters or buffers it is
            # plain code, traced as such; with them, no graph could refer to its weights
            if next(itertools.chain(m.parameters(), m.buffers()), None) is not None:
                raise Untraceable(f"its forward builds the layer {type(m).__name__} with weights as it runs "
                                  f"(at {_where()}); make it an attribute in __init__")
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
        if isinstance(a, AttrInt):
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
        shape_read = (kind == "call_method" and target in SHAPE_READS) or (
            kind == "call_function" and listed(target, SHAPE_FUNCTIONS)) or (
            kind == "call_function" and target is getattr and len(args) > 1 and args[1] in SHAPE_ATTRIBUTES)
        from_input = any(n in self.tainted for n in node.all_input_nodes)
        # A tensor depends on the data, the weights or chance unless only shapes and constants made it
        # (a causal mask from x.size(1)): that one Python may read, as it reads a shape.
        # A buffer (position ids, a mask, an index table) is state, not weights: Python may read it too,
        # as it could before buffers were traced as nodes (see __init__).
        readable = (kind in ("call_function", "call_method") and not from_input and not (
            listed(target, RANDOM_FUNCTIONS) or listed(target, RANDOM_METHODS))) or (
            kind == "get_attr" and not isinstance(value, nn.Parameter))
        tainted = (isinstance(value, torch.Tensor) and not readable) or (not shape_read and from_input)
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
        """The value behind ``proxy`` for Python to use, if it does not depend on tensor contents. A
        length is a shape: a tensor's is its first dimension, and how many tensors an op returned
        (``chunk``, ``split``, ``unbind``) follows from the shapes and arguments it was given."""
        node = proxy.node
        if node in self.tainted and not (length_only and _is_tensors(self.values[node])):
            raise Untraceable(f"its forward uses a tensor's values in Python ({use} at {_where()})")
        if self.guards.get(node) != "value":
            self.guards[node] = "len" if length_only else "value"
        return self.values[node]

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.python_value(obj, "`if`/`while`/`and`/`or` on a tensor"))

    def iter(self, obj: fx.Proxy) -> Iterator:  # type: ignore[override]
        value = self.values[obj.node]
        if isinstance(value, torch.Tensor):
            count = value.shape[0]  # iterating a tensor: its first dimension, a shape
        else:  # `list(x.chunk(2, 1))`, `for y in x.split(16, 1)`
            count = len(self.python_value(obj, "iteration", length_only=True))
        if obj.node not in self.guards:
            self.guards[obj.node] = "len"
        return (obj[i] for i in range(count))

    def keys(self, obj: fx.Proxy) -> Any:
        return list(self.python_value(obj, "keys()").keys())


def _is_tensors(value: Any) -> bool:
    """A tensor, or a tuple or list of them (what ``chunk``, ``split`` or ``unbind`` return)."""
    return isinstance(value, torch.Tensor) or (
        isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value))


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
