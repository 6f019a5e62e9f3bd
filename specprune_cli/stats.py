"""Streaming second moments at the units' taps (docs/method.md §2, §6).

Two ways to gather them:

* ``observe`` + ``collect_oneshot``: forward pre-hooks on the consumers of every unit, one pass over
  the calibration data through the unmodified network.
* the sequential order reads a unit's taps while ``runner.SegmentRunner`` replays the graph stretch
  by stretch (``pair_readers``), or, for a graph that cannot be replayed, with hooks during whole
  forward passes of both networks (``collect_paired``).

Hooks always live in a context manager and are removed in ``finally``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from specprune_cli import distributed
from specprune_cli.errors import StatisticsError
from specprune_cli.graph import Unit
from specprune_cli.layers import tap_rows
from specprune_cli.moments import CrossMoment, SecondMoment

TapKey = tuple[str, str]  # (unit name, tap node name)


def tap_reader(unit: Unit, tap: str, acc: SecondMoment) -> Callable[[torch.Tensor], None]:
    """A function that adds the value of ``unit``'s ``tap`` (a consumer's input) to ``acc``."""
    consumer = next(c for c in unit.consumers if c.tap == tap)

    def read(x: torch.Tensor) -> None:
        try:
            acc.update(tap_rows(x, unit, consumer))
        except StatisticsError as exc:
            raise StatisticsError(f"at the input of {consumer.module} (unit {unit.name}): {exc}") from None

    return read


def pair_readers(unit: Unit, moments: Mapping[TapKey, CrossMoment], originals: Mapping[str, torch.Tensor]
                 ) -> dict[str, Callable[[torch.Tensor], None]]:
    """Per tap, a function that adds the pruned network's value x~ there, with the original network's
    value x for the same batch from ``originals`` (tap -> tensor, read when called), to the tap's
    cross moment. A tap missing from ``originals``, or holding the same values, counts x~ as x (then one
    product serves S, S~ and C)."""
    out = {}
    for tap in unit.taps:
        consumer = next(c for c in unit.consumers if c.tap == tap)

        def read(value: torch.Tensor, tap: str = tap, consumer: Any = consumer) -> None:
            try:
                rows = tap_rows(value, unit, consumer)
                original = originals.get(tap)
                target = rows if original is None or torch.equal(original, value) else tap_rows(
                    original, unit, consumer)
                moments[(unit.name, tap)].update(target, rows)
            except StatisticsError as exc:
                raise StatisticsError(f"at the input of {consumer.module} "
                                      f"(unit {unit.name}): {exc}") from None

        out[tap] = read
    return out


def collect_paired(original: nn.Module | None, pruned: nn.Module, unit: Unit, batches: Iterable[torch.Tensor],
                   *, max_positions: int | None, seed: int, forward_kwargs: Mapping[str, Any] | None = None
                   ) -> dict[TapKey, CrossMoment]:
    """``unit``'s cross moments from whole forward passes of both models, with hooks on one consumer per
    tap (for a graph that cannot be replayed). ``original`` None: the pruned model's own signal."""
    kwargs = dict(forward_kwargs or {})
    moments = new_cross_moments(unit, max_positions=max_positions, seed=seed)
    originals: dict[str, torch.Tensor] = {}
    readers = pair_readers(unit, moments, originals)
    handles = []
    try:
        for tap in unit.taps:
            consumer = next(c for c in unit.consumers if c.tap == tap)
            if original is not None:
                handles.append(original.get_submodule(consumer.module).register_forward_pre_hook(
                    lambda _m, args, tap=tap: originals.__setitem__(tap, args[0].detach())))
            handles.append(pruned.get_submodule(consumer.module).register_forward_pre_hook(
                lambda _m, args, tap=tap: readers[tap](args[0])))
        with torch.no_grad():
            for x in batches:
                originals.clear()
                if original is not None:
                    original(x, **kwargs)
                pruned(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return moments


def sharded(moment: CrossMoment) -> CrossMoment:
    """``moment`` drawing its positions by global batch index: under torchrun this process reads
    batches rank, rank + world, ... (``distributed.shard``), so its i-th update is batch rank + world i."""
    moment.draw_offset, moment.draw_stride = distributed.rank(), distributed.world_size()
    return moment


def new_moments(units: Sequence[Unit], *, max_positions: int | None, seed: int) -> dict[TapKey, SecondMoment]:
    """One empty accumulator per (unit, tap)."""
    out: dict[TapKey, SecondMoment] = {}
    for u in units:
        for tap in u.taps:
            out[(u.name, tap)] = sharded(SecondMoment(u.width, max_positions=max_positions, seed=seed))
    return out


def new_cross_moments(unit: Unit, *, max_positions: int | None, seed: int) -> dict[TapKey, CrossMoment]:
    """One empty cross-moment accumulator per tap of ``unit``."""
    return {(unit.name, tap): sharded(CrossMoment(unit.width, unit.width, max_positions=max_positions,
                                                  seed=seed))
            for tap in unit.taps}


@contextlib.contextmanager
def observe(gm: fx.GraphModule, units: Sequence[Unit], moments: dict[TapKey, SecondMoment],
            skip: Container[str] = ()) -> Iterator[None]:
    """Accumulate each unit's taps while the block is active, with pre-hooks on one consumer per tap.

    Units whose name is in ``skip`` (read at each call, so a set may grow meanwhile) are not
    accumulated. The hooks are removed when the block exits, also on error.
    """
    handles = []
    try:
        for u in units:
            for tap in u.taps:
                consumer = next(c for c in u.consumers if c.tap == tap)
                read = tap_reader(u, tap, moments[(u.name, tap)])
                handles.append(gm.get_submodule(consumer.module).register_forward_pre_hook(
                    lambda _mod, args, read=read, name=u.name: None if name in skip else read(args[0])))
        yield
    finally:
        for h in handles:
            h.remove()


def collect_oneshot(gm: fx.GraphModule, units: Sequence[Unit], batches: Iterable[torch.Tensor], *,
                    max_positions: int | None, seed: int, progress: Any = None) -> dict[TapKey, SecondMoment]:
    """All units' statistics from the unmodified network in one pass (docs/method.md §6 ``oneshot``)."""
    moments, _, _ = collect_prefix(gm, units, batches, max_positions=max_positions, seed=seed,
                                   enough=lambda _u, _m, _n: False, progress=progress)
    return moments


def collect_prefix(gm: fx.GraphModule, units: Sequence[Unit], batches: Iterable[torch.Tensor], *,
                   max_positions: int | None, seed: int,
                   enough: Callable[[Unit, Mapping[TapKey, SecondMoment], int], bool], full: bool = False,
                   progress: Any = None
                   ) -> tuple[dict[TapKey, SecondMoment], dict[TapKey, SecondMoment] | None, int]:
    """Each unit's statistics over the fewest leading batches after which ``enough(unit, moments,
    samples)`` holds (all batches if it never does), from the unmodified network.

    A unit's prefix statistics are exactly what ``collect_oneshot`` gives on those batches alone (same
    seed, same order of updates). Without ``full``, a unit that has enough is no longer accumulated and
    the pass stops once every unit has enough. With ``full`` it goes on over every batch and also
    returns the statistics of all of them, so a caller that needs both pays for one pass.

    Returns:
        (prefix moments, all-batch moments or None without ``full``, samples read until every unit
        had enough, or all of them).
    """
    moments = new_moments(units, max_positions=max_positions, seed=seed)
    prefix: dict[TapKey, SecondMoment] = {}
    done: set[str] = set()
    samples, needed = 0, None
    with observe(gm, units, moments, skip=() if full else done), torch.no_grad():
        for x in batches:
            gm(x)
            samples += x.shape[0]
            if progress is not None:
                progress.update(1)
            for u in units:
                if u.name not in done and enough(u, moments, samples):
                    done.add(u.name)
                    # Without `full` the unit is skipped from now on: its accumulators stay as they are.
                    prefix.update({(u.name, t): moments[(u.name, t)].copy() if full else moments[(u.name, t)]
                                   for t in u.taps})
            if needed is None and len(done) == len(units):
                needed = samples
                if not full:
                    break
    for key, m in moments.items():
        prefix.setdefault(key, m)  # a unit that never had enough: every batch there was
    return prefix, (moments if full else None), samples if needed is None else needed
