"""Capturing a model as an fx graph of its leaf modules, whatever Python its forward runs
(docs/method.md §1).

Unit finding, surgery and the sequential statistics all speak in module names and replay the graph
node by node, so the capture is an ``fx.GraphModule`` whose ``call_module`` nodes are the model's own
leaf modules (convolutions, linears, norms, activations) and whose other nodes are the torch-level
functions and tensor methods the forward calls.

The tracer (``tracer.py``) computes every node's value on the example input, so a branch on a shape
or a flag takes the example's path and int attributes stay live; non-tensor forward arguments are
fixed to their defaults, or to ``forward_kwargs``. Two things are never guessed:

* a branch on tensor *values* (``if x.sum() > 0``): another input could take the other path. The
  innermost module whose forward does this is kept whole (an opaque leaf) and the trace restarts; if
  the model's own forward does it, nothing is captured and the reason says where;
* an exception while tracing a submodule (code that rejects proxies, say): that module becomes an
  opaque leaf the same way.

The graph is checked against the model: on the example batch and on a batch of another size the
two must give the same outputs. A graph that only differs at the other batch size (a branch on the
batch size) is kept with ``replayable=False``: its units are right, but it must not be replayed on
other batches.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from specprune_cli.errors import ConfigError
from specprune_cli.leaves import int_attributes, python_state_kept
from specprune_cli.tracer import Untraceable, ValueTracer

_MAX_ATTEMPTS = 64


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
        if (name and isinstance(mod, torch.jit.ScriptModule)
                and not any(name.startswith(o + ".") for o in opaque)):
            opaque[name] = "it is a TorchScript module (torch.jit.script or trace), whose code fx cannot read"
    for _ in range(_MAX_ATTEMPTS):
        tracer = ValueTracer(x2, set(opaque))
        constants_before = set(vars(model))
        try:
            with int_attributes(model, set(opaque)), python_state_kept(model):
                graph = tracer.trace(model, concrete_args=_concrete_args(model, fixed))
        except Exception as exc:  # noqa: BLE001 - decide which module to keep whole, then retry
            _drop_constants(model, constants_before)
            culprit = getattr(exc, "specprune_module", "")
            while culprit in opaque or (culprit and _is_leaf(tracer, model, culprit)):
                culprit = culprit.rpartition(".")[0]  # a leaf cannot fail on its own: blame its parent
            reason = str(exc) if isinstance(exc, Untraceable) else \
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


def _is_leaf(tracer: ValueTracer, model: nn.Module, name: str) -> bool:
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


def _build(model: nn.Module, graph: fx.Graph, tracer: ValueTracer) -> tuple[fx.GraphModule, dict]:
    """The GraphModule, without fx's placeholders and checks for the fixed arguments, reading int
    attributes live from the model."""
    for node in reversed(tracer.arg_nodes):
        graph.erase_node(node)
    if isinstance(graph._codegen, fx.graph._PyTreeCodeGen):
        # fx flattens the arguments through pytree when a fixed one is a container (the `**kwargs`
        # dict), and its forward then wants every argument back; the graph takes its input alone, and
        # returns the leaves of the output in a list (see _same).
        graph._codegen = fx.graph.CodeGen()
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
        try:  # fx prints the generated code of a failing graph to stderr: not the user's concern here
            with contextlib.redirect_stderr(io.StringIO()):
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
    plain dict where the model returns an OrderedDict, as torchvision's segmentation models do). So is
    a container registered with pytree and its leaves in a list: fx returns Hugging Face's ModelOutput
    flattened."""
    fa, sa = torch.utils._pytree.tree_flatten(_plain_dicts(a))
    fb, sb = torch.utils._pytree.tree_flatten(_plain_dicts(b))
    if len(fa) != len(fb) or (sa != sb and not (_flattened(a, b) or _flattened(b, a))):
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


def _flattened(a: Any, b: Any) -> bool:
    """``a`` is the list fx makes of ``b``, a container of a class registered with pytree."""
    return (type(a) is list and type(b) in torch.utils._pytree.SUPPORTED_NODES
            and type(b) is not dict and not isinstance(b, (list, tuple)))


def _plain_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_dicts(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_plain_dicts(v) for v in value)
    return value


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
