"""Where the trace stops, and what it does to the modules it traces into (docs/method.md §1).

A leaf is a module the trace keeps whole, as one node: the layers specprune reads and slices, and
torch's own modules (fx's rule), except the blocks in ``TRACED_TORCH``. The modules traced into have
their plain int attributes (``self.flat_dim``) swapped for ``AttrInt`` while the trace runs, so the
graph reads the attribute rather than copying its value, and surgery can rewrite it. Whatever the
model's own code stores on its modules during the trace is put back afterwards (``python_state_kept``).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from torch import fx, nn

#: Module classes always kept as leaves: the layers specprune reads and slices. A user subclass of
#: nn.Conv2d lives outside torch.nn, and fx would otherwise trace into its forward and lose the module.
LEAF_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase,
                                nn.GroupNorm, nn.LayerNorm, nn.PReLU, nn.Embedding, nn.MultiheadAttention,
                                nn.RNNBase)

#: Modules of torch.nn that are traced into, not kept as leaves: blocks written in Python over layers
#: specprune reads (a TransformerEncoderLayer's feed-forward Linears). In a trace their forward takes
#: its plain path, since a proxy turns off the fused fast path.
TRACED_TORCH: tuple[type, ...] = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                                  nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def is_torch_leaf(mod: nn.Module) -> bool:
    """fx's own rule (modules of torch.nn are leaves, except Sequential), less ``TRACED_TORCH``."""
    return mod.__module__.startswith(("torch.nn", "torch.ao.nn")) and \
        not isinstance(mod, (nn.Sequential, *TRACED_TORCH))


class AttrInt(int):
    """An int attribute of a traced module, remembering where it lives (see ``int_attributes``)."""

    owner: str
    attr: str


@contextlib.contextmanager
def int_attributes(model: nn.Module, leaves: set[str]) -> Iterator[None]:
    """Swap the plain int attributes of the modules being traced for ``AttrInt`` while the block runs.

    fx reads ``self.flat_dim`` as a literal; an ``AttrInt`` still behaves as the int but tells the
    tracer where it came from, so the graph reads the attribute instead of copying its value.
    """
    swapped: list[tuple[nn.Module, str, int]] = []
    try:
        for name, mod in model.named_modules():
            if name in leaves or isinstance(mod, LEAF_TYPES) or is_torch_leaf(mod):
                continue
            for attr, value in list(vars(mod).items()):
                if type(value) is int and not attr.startswith("_"):
                    wrapped = AttrInt(value)
                    wrapped.owner, wrapped.attr = name, attr
                    object.__setattr__(mod, attr, wrapped)
                    swapped.append((mod, attr, value))
        yield
    finally:
        for mod, attr, value in swapped:
            if type(vars(mod).get(attr)) is AttrInt:  # the forward may have assigned a new value
                object.__setattr__(mod, attr, value)


def _holds_proxy(value: Any, depth: int = 0) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth < 3 and isinstance(value, (list, tuple)):
        return any(_holds_proxy(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return any(_holds_proxy(v, depth + 1) for v in value.values())
    return False


@contextlib.contextmanager
def python_state_kept(model: nn.Module) -> Iterator[None]:
    """Put back, when the block ends, every module attribute the model's code set to a traced value.

    A forward may cache what it computes on its module: torchvision's AnchorGenerator stores
    ``self.cell_anchors``. Set during the trace, that holds proxies, and every later forward of the
    model would read them. Lists and dicts are remembered by a copy, since a cache fills them in place.
    """
    before = {mod: {k: copy.copy(v) if isinstance(v, (list, dict)) else v for k, v in vars(mod).items()}
              for mod in model.modules()}
    try:
        yield
    finally:
        for mod, attrs in before.items():
            for k, v in list(vars(mod).items()):
                if not _holds_proxy(v):
                    continue
                if k in attrs and not _holds_proxy(attrs[k]):
                    object.__setattr__(mod, k, attrs[k])
                else:
                    object.__delattr__(mod, k)
