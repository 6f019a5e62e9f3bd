"""What the tracer patches in Python and torch while it runs (``ValueTracer.trace``), and puts back.

fx alone fails on ordinary model code in three places, each fixed here for the length of one trace:

- torch's factories given a size from the input (``torch.zeros(x.size(0), 16)``,
  ``torch.arange(x.shape[-1])``): torch's argument parser wants an int there, and fx's proxies only
  reach functions through a tensor argument. While tracing they are wrapped, and a call with a proxy
  among its arguments becomes a node of the graph.
- ``isinstance(x, torch.Tensor)`` on a traced tensor (einops, input normalisation): true in Python code
  alone, through ``builtins.isinstance``. A proxy must never claim the class through ``__class__``:
  torch's C parser would then take it for a tensor and read its memory (``torch.pow(x, 3.0)``, in
  GPT-2's GELU, crashed the process).
- a decorated root ``forward`` (Hugging Face's ``@can_return_tuple``: ``wrapper(self, *args,
  **kwargs)``): fx reads the arguments off the unwrapped function, then rewrites the wrapper's code to
  that count, which fails; the wrapper is called with them as Python would.

See docs/method.md §1.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx

#: torch's factories that take sizes, wrapped while tracing.
FACTORY_FUNCTIONS = ("zeros", "ones", "empty", "full", "arange", "range", "eye", "linspace", "logspace",
                     "tensor", "as_tensor", "scalar_tensor", "rand", "randn", "randint", "randperm",
                     "normal")

_ISINSTANCE = builtins.isinstance
_PATCH_FUNCTION = fx._symbolic_trace._patch_function


@contextlib.contextmanager
def patched(record: Callable[[Any, tuple, dict], Any | None]) -> Iterator[None]:
    """Apply the three patches while the block runs.

    Args:
        record: called with (factory, args, kwargs) for every factory call; it returns the proxy of a
            new node, or None to let the factory run.
    """
    originals = {name: getattr(torch, name) for name in FACTORY_FUNCTIONS}
    try:
        for name, function in originals.items():
            setattr(torch, name, _factory(function, record))
        builtins.isinstance = _value_isinstance
        fx._symbolic_trace._patch_function = _patch_wrapped
        yield
    finally:
        fx._symbolic_trace._patch_function = _PATCH_FUNCTION
        builtins.isinstance = _ISINSTANCE
        for name, function in originals.items():
            setattr(torch, name, function)


def _factory(function: Any, record: Callable[[Any, tuple, dict], Any | None]) -> Any:
    @functools.wraps(function)
    def factory(*args: Any, **kwargs: Any) -> Any:
        proxy = record(function, args, kwargs)
        return function(*args, **kwargs) if proxy is None else proxy
    return factory


def _value_isinstance(obj: Any, cls: Any) -> bool:
    """``isinstance`` while tracing: a proxy of a tensor is also an instance of its value's class (the
    tracer's proxies say which through ``value_type``)."""
    if _ISINSTANCE(obj, cls):
        return True
    value_type = getattr(type(obj), "value_type", None) if _ISINSTANCE(obj, fx.Proxy) else None
    kind = value_type(obj) if value_type is not None else None
    return kind is not None and issubclass(kind, cls)


def _patch_wrapped(fn: Any, nargs: int) -> Any:
    """fx's ``_patch_function``, which also takes a decorated function (see the module docstring)."""
    inner = inspect.unwrap(fn)
    if inner is fn:
        return _PATCH_FUNCTION(fn, nargs)
    code = inner.__code__
    named = code.co_argcount + code.co_kwonlyargcount
    keyword_only = code.co_varnames[code.co_argcount:named]
    var_args = bool(code.co_flags & inspect.CO_VARARGS)

    def call(*args: Any) -> Any:
        rest = args[named:]
        extra = rest[0] if var_args else ()
        kwargs = dict(zip(keyword_only, args[code.co_argcount:named]))
        if code.co_flags & inspect.CO_VARKEYWORDS:
            kwargs.update(rest[-1])
        return fn(*args[:code.co_argcount], *extra, **kwargs)
    return call
