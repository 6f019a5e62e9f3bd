"""A known layer subclassed with a forward of its own, and how its class is looked up (docs/method.md §1).

``registered`` is the one lookup of a module's class in a table of kinds or rules: the nearest class in
its MRO that the table holds, and, for a subclass that replaces that class's forward, only what the
caller's probe accepts. Such a subclass's meaning cannot be read off its class, so it is run: a
Conv/Linear subclass counts as its parent if its forward gives the parent's outputs (timm's ``Linear``,
which only casts the weight), and a norm subclass is sliced with a unit if a copy cut to every other
channel gives the whole layer's outputs on those channels (timm's ``BatchNormAct2d``: batch norm, then
an activation). Both run on copies in eval mode, on seeded random inputs; the module itself is never run.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn


T = TypeVar("T")

_SEEN: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
_PER_CHANNEL: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def overrides_forward(mod: nn.Module, base: type) -> bool:
    """True if ``mod``'s class replaces ``base.forward`` (its meaning is then unknown)."""
    return type(mod).forward is not base.forward


def registered(mod: nn.Module, table: Mapping[Any, T],
               own_forward: Callable[[type, T], bool] | None = None) -> T | None:
    """``table``'s entry for the nearest class in ``mod``'s MRO, or None.

    Where ``mod``'s class replaces that class's forward, the entry holds only if ``own_forward(cls,
    entry)`` says so (a probe); without one, such a subclass is refused: timm's LayerNorm2d is an
    nn.LayerNorm that normalises dim 1.
    """
    for cls in type(mod).__mro__:
        if cls in table:
            entry = table[cls]
            if not overrides_forward(mod, cls):
                return entry
            return entry if own_forward is not None and own_forward(cls, entry) else None
    return None


def computes_base(mod: nn.Module, base: type) -> bool:
    """Whether ``mod``'s own forward gives what ``base.forward`` gives, on two random inputs (on a copy,
    in eval mode; remembered per module). Conv2dSame's padding, say, does not."""
    if mod not in _SEEN:
        _SEEN[mod] = _same_outputs(copy.deepcopy(mod).eval(), base)
    return _SEEN[mod]


def _same_outputs(mod: nn.Module, base: type) -> bool:
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return False  # (a recurrent layer has no ``weight``: its subclasses are not probed)
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        if isinstance(mod, nn.Linear):
            shape: tuple[int, ...] = (batch, mod.in_features)
        else:
            reach = [d * (k - 1) + 1 for k, d in zip(mod.kernel_size, mod.dilation)]
            shape = (batch, mod.in_channels, *(r + 2 * s + 3 for r, s in zip(reach, mod.stride)))
        x = torch.randn(*shape, generator=gen).to(device=weight.device, dtype=weight.dtype)
        try:
            with torch.no_grad():
                got, want = mod(x), base.forward(mod, x)
        except Exception:  # noqa: BLE001 - it does not take what its parent takes
            return False
        if not (isinstance(got, torch.Tensor) and got.shape == want.shape
                and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5))):
            return False
    return True


def acts_per_channel(mod: nn.Module, kind: Any) -> bool:
    """Whether ``mod``, cut by ``kind`` (a ``followers.FollowerKind``) to every other channel, gives the
    whole layer's outputs on those channels (in eval mode, on random inputs of 2 to 5 dims, whichever its
    forward takes; ``mod`` itself is not run; remembered per module)."""
    if mod not in _PER_CHANNEL:
        _PER_CHANNEL[mod] = _cut_matches(mod, kind)
    return _PER_CHANNEL[mod]


def _cut_matches(mod: nn.Module, kind: Any) -> bool:
    channels = kind.size(mod, None)
    if channels < 2:
        return False
    keep = torch.arange(0, channels, 2)
    whole = copy.deepcopy(mod).eval()
    cut = copy.deepcopy(mod).eval()
    kind.slice(cut, keep, None)
    ref = next(iter(whole.parameters()), None)
    if ref is None:
        ref = next(iter(whole.buffers()), torch.empty(0))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    for spatial in ((5, 4), (6,), (), (3, 3, 2)):
        x = torch.randn(3, channels, *spatial, generator=gen).to(device=ref.device, dtype=dtype)
        try:
            with torch.no_grad():
                want, got = whole(x), cut(x[:, keep])
        except Exception:  # noqa: BLE001 - this input's dims are not the layer's: try the next
            continue
        if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
            return False
        want = want[:, keep]
        return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5))
    return False
